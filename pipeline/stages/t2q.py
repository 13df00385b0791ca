"""`python -m pipeline.fit t2q`: train QLIP's T2Q on a scored set, or predict with one.

    python -m pipeline.fit t2q --run-dir runs/t2q                      # trains on runs/t2q/scored
    python -m pipeline.fit t2q --run-dir runs/t2q --predict "a red circle"      # or a .txt file, or '["a", "b"]'
    python -m pipeline.fit t2q --model path/to/sd --clip path/to/clip-vit-large-patch14 --run-dir runs/sd

Writes <run-dir>/t2q/{t2q.safetensors, t2q.json, manifest.json, logs/} and
prints validation MSE / Pearson / Spearman next to the two baselines T2Q must
beat (a constant, and a linear regression on prompt length), plus the
richness table on the embedded world."""
from __future__ import annotations

from pathlib import Path

USES_TRAINER = True


def add_arguments(parser) -> None:
    parser.add_argument("--scored", type=str | None, default=None,
                        help="a score-stage folder (default <run-dir>/scored)")
    parser.add_argument("--clip", type=str | None, default=None,
                        help="local CLIPTextModelWithProjection folder (needed for SD models: no projection)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch (split over DDP processes)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--norm-quantile", type=float, default=0.01, help="target normalization (data/scored.py)")
    parser.add_argument("--predict", type=list[str] | str | None, default=None,
                        help="a prompt, a .txt/.jsonl file, or a list '[\"a\", \"b\"]': print T2Q's predicted "
                             "quality with the trained <run-dir>/t2q (no training)")
    parser.add_argument("--richness", type=bool, default=True, help="print the richness table (embedded world)")
    parser.add_argument("--richness-scenes", type=int, default=100)


def evaluate(module, prompts, targets) -> dict:
    """MSE / Pearson / Spearman of the module on (prompts, targets), torchmetrics' definitions."""
    import torch
    from torchmetrics.functional import mean_squared_error, pearson_corrcoef, spearman_corrcoef

    pred, y = module.predict(prompts), torch.as_tensor(targets, dtype=torch.float32)
    return {"mse": float(mean_squared_error(pred, y)), "pearson": float(pearson_corrcoef(pred, y)),
            "spearman": float(spearman_corrcoef(pred, y))}


def predict(cfg) -> list[tuple[str, float]]:
    from data.prompts import load_prompts
    from pipeline.qlip.t2q import load_t2q

    t2q = load_t2q(Path(cfg.run_dir) / "t2q", model=cfg.model, clip=cfg.clip)
    prompts = []
    for item in [cfg.predict] if isinstance(cfg.predict, str) else cfg.predict:
        prompts += load_prompts(item) if Path(item).is_file() else [item]
    q = t2q.predict(prompts).tolist()
    for p, v in zip(prompts, q):
        print(f"{v:.3f}  {p}")
    return list(zip(prompts, q))


def run(cfg):
    import warnings

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from data.scored import ScoredDataModule
    from pipeline.models import EMBEDDED
    from pipeline.runs import prepare_artifact, write_manifest
    from pipeline.stages.score import is_rank_zero
    from pipeline.qlip.t2q import T2QModule, baselines, load_text_tower, save_t2q

    if cfg.predict:
        return predict(cfg)
    scored = Path(cfg.scored or Path(cfg.run_dir) / "scored")
    dm = ScoredDataModule(scored, cfg.batch_size, quantile=cfg.norm_quantile, seed=cfg.seed)
    dm.setup()  # a missing image, split or column fails here, before any model is loaded
    out = prepare_artifact(cfg.run_dir, "t2q", cfg.overwrite) if is_rank_zero() else Path(cfg.run_dir) / "t2q"
    tower = load_text_tower(cfg.model, cfg.clip)
    L.seed_everything(cfg.seed, verbose=False)
    module = T2QModule(tower, lr=cfg.lr, weight_decay=cfg.weight_decay)
    kwargs = {"enable_checkpointing": False, "enable_model_summary": False, "log_every_n_steps": 1,
              **{k: v for k, v in vars(cfg.trainer).items() if v is not None}}
    kwargs["max_epochs"] = cfg.epochs
    trainer = L.Trainer(logger=CSVLogger(str(out), name="logs", version=""), **kwargs)
    with warnings.catch_warnings():  # the frozen text tower stays in eval mode on purpose
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
        trainer.fit(module, datamodule=dm)
    if not trainer.is_global_zero:
        return out

    train, val = dm.train_set, dm.val_set
    metrics = {"val": evaluate(module, val.prompts, val.targets),
               "train": evaluate(module, train.prompts, train.targets)}
    metrics["baselines"] = baselines(train.prompts, train.targets, val.prompts, val.targets, module.tokenizer)
    metrics["memory_bytes"] = module.memory_bytes()
    metrics["world_size"] = trainer.world_size
    table = None
    if cfg.richness and cfg.model == EMBEDDED:
        from pipeline.world.richness import format_richness_table, richness_series, richness_table

        table = richness_table(module.predict, richness_series(cfg.richness_scenes, cfg.seed))
        print(format_richness_table(table))
    save_t2q(module, out, extra={"normalization": dm.describe()["normalization"], "scored": str(scored),
                                 "metrics": metrics})
    write_manifest(out, "t2q", cfg, metrics, data=dm.describe(), richness=table)
    v, b = metrics["val"], metrics["baselines"]
    print(f"T2Q on {len(val)} val prompts: MSE {v['mse']:.4f} (constant {b['constant_mse']:.4f}, "
          f"prompt-length regression {b['length_mse']:.4f}), Pearson {v['pearson']:.3f}, "
          f"Spearman {v['spearman']:.3f}; {metrics['memory_bytes'] / 1e6:.3f} MB -> {out}")
    return out
