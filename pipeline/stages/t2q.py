"""`python -m pipeline.fit t2q`: train QLIP's T2Q on a scored set, or predict with one.

    python -m pipeline.fit t2q --run-dir runs/t2q                      # trains on runs/t2q/scored
    python -m pipeline.fit t2q --run-dir runs/t2q --predict "a red circle"      # or a .txt file, or '["a", "b"]'
    python -m pipeline.fit t2q --model path/to/sd --clip path/to/clip-vit-large-patch14 --run-dir runs/sd

Writes <run-dir>/t2q/{t2q.safetensors, t2q.json, manifest.json, logs/} and
prints validation MSE / Pearson / Spearman next to the two baselines T2Q must
beat (a constant, and a linear regression on prompt length), the same on the
train and (when the scored set has one) test split, plus the richness table on
the embedded world. Early stopping on the val MSE (--patience) keeps the best
val epoch's head, so the val figures are selected on: the test split's are not.

With --eval-every N --eval-q2b FOLDER, callbacks/evaluation.py measures, every N
epochs, what the T2Q being trained is for: the first --eval-n val prompts
generated through that Q2B on its quantized state with the current T2Q as the
quality source, paired PSNR/SSIM to their FP images and FAB. It logs them,
writes <run-dir>/t2q/evaluation/evaluation.json and keeps the best T2Q by
--eval-monitor in evaluation/best (early stopping still selects on val MSE)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger

from callbacks.evaluation import PairedEvaluationCallback
from data.prompts import draw_prompts, is_source
from data.scored import ScoredDataModule
from pipeline.artifacts import ARTIFACTS, prepare_artifact, write_manifest
from pipeline.engine import StageConfig, check_flags, is_global_zero, make_trainer, stage_device
from pipeline.errors import UserError
from pipeline.models import EMBEDDED, load_pipeline, quantize_pipeline, sampling_defaults
from pipeline.qlip.monitor import EVAL_MONITORS, PairedValidation
from pipeline.qlip.q2b import follow_link, load_q2b, read_q2b_meta
from pipeline.qlip.scoring import check_same_sampler, scored_sampler
from pipeline.qlip.t2q import T2QModule, baselines, baselines_by_split, load_t2q, load_text_tower, save_t2q, t2q_metrics
from pipeline.world.richness import format_richness_table, richness_series, richness_table


@dataclass
class T2QConfig(StageConfig):
    """Settings of the t2q stage."""

    scored: str | None = None
    """a score-stage folder (default <run-dir>/scored)"""
    clip: str | None = None
    """local CLIPTextModelWithProjection folder (needed for SD models: no projection)"""
    epochs: int = 60
    """training epochs"""
    batch_size: int = 64
    """global batch (split over DDP processes)"""
    lr: float = 1e-3
    """AdamW learning rate"""
    weight_decay: float = 1e-4
    """AdamW weight decay of the head"""
    patience: int = 10
    """early stopping: stop after this many epochs without a lower val MSE and keep the best val epoch's head
    (0: train every epoch and keep the last)"""
    norm_quantile: float = 0.01
    """target normalization (data/scored.py)"""
    target: str = "giqa"
    """what the head learns to predict from the text: giqa (QLIP's T2Q: the GIQA quality of the FP image) |
    complexity (a T2C: the FP image's mean gradient magnitude, the text-predicted complexity criterion; its
    folder is a T2Q folder, so `q2b --t2q` takes it)"""
    predict: list[str] | str | None = None
    """a prompt, a prompt source (every prompt of it, unsplit; the syntax of --prompts, docs/prompts.md), or a
    list '["a", "b"]': print T2Q's predicted quality with the trained <run-dir>/t2q (no training)"""
    richness: bool = True
    """print the richness table (embedded world)"""
    richness_scenes: int = 100
    """scenes of the richness table"""
    eval_every: int = 0
    """epochs between paired evaluations while training (0: off; needs --eval-q2b): the first --eval-n val
    prompts generated through --eval-q2b's Q2B with the current T2Q, PSNR/SSIM to FP with 95% intervals and FAB,
    logged and written to <run-dir>/t2q/evaluation/evaluation.json; the best T2Q by --eval-monitor goes to
    evaluation/best"""
    eval_q2b: str | None = None
    """a q2b-stage folder (its quantized state, Q2B, steps and guidance) that the evaluation feeds with the T2Q
    being trained"""
    eval_n: int = 8
    """val prompts of the paired evaluation (--eval-every)"""
    eval_monitor: str = "psnr"
    """what the evaluation's best T2Q is chosen by: psnr | ssim (higher is better)"""


def predict(cfg: T2QConfig) -> list[tuple[str, float]]:
    t2q = load_t2q(Path(cfg.run_dir) / ARTIFACTS["t2q"], model=cfg.model, clip=cfg.clip)
    prompts = []
    for item in [cfg.predict] if isinstance(cfg.predict, str) else cfg.predict:
        prompts += draw_prompts(item, None).prompts if is_source(item) else [item]
    q = t2q.predict(prompts).tolist()
    for p, v in zip(prompts, q):
        print(f"{v:.3f}  {p}")
    return list(zip(prompts, q))


def check_eval_flags(cfg: T2QConfig, scored: Path) -> dict | None:
    """The --eval-* flags beyond their ranges (check_flags), before anything loads: the Q2B folder's meta when
    the evaluation is on. The T2Q being trained learns the quality of `scored`'s sampler, so a Q2B deployed
    under another sampler is refused, as q2b refuses such a T2Q."""
    if cfg.eval_monitor not in EVAL_MONITORS:
        raise ValueError(f"--eval-monitor {cfg.eval_monitor!r}: choose one of {EVAL_MONITORS}")
    if not cfg.eval_every:
        return None
    if not cfg.eval_q2b:
        raise UserError(f"--eval-every {cfg.eval_every} generates through a Q2B fed by the T2Q being trained: pass "
                        f"--eval-q2b, a q2b-stage folder such as runs/x/q2b, or --eval-every 0")
    meta = read_q2b_meta(cfg.eval_q2b, "--eval-q2b", deployed=True)  # the JSON only: the tables load once, later
    if meta["model"] != cfg.model:
        raise UserError(f"--eval-q2b {cfg.eval_q2b} was trained on model {meta['model']!r}, not --model "
                        f"{cfg.model!r}: the T2Q would feed a Q2B of another UNet")
    check_same_sampler(scored_sampler(scored) or {}, meta.get("sampler") or {}, f"the scored set {scored}",
                       f"--eval-q2b {cfg.eval_q2b}")
    return meta


def paired_evaluation(cfg: T2QConfig, meta: dict, prompts: list[str], out: Path, extra) -> tuple:
    """The callback that measures the T2Q being trained through --eval-q2b's Q2B (FP images made first, on the
    unquantized pipeline), and the validation split it measures on."""
    q2b = load_q2b(cfg.eval_q2b, deployed=True)
    validation = PairedValidation(prompts[:cfg.eval_n], meta["steps"], meta["guidance"], cfg.seed)
    pipe = load_pipeline(cfg.model, **cfg.load_options())
    # the sampler the Q2B was trained under, which check_eval_flags matched with the scored set's: the T2Q being
    # trained predicts that sampler's quality, whatever criterion the Q2B was trained on
    sampler = sampling_defaults(pipe, meta["steps"], meta["guidance"]).sampler()
    check_same_sampler(meta.get("sampler") or {}, sampler, f"--eval-q2b {cfg.eval_q2b}", "t2q (--scheduler)")
    validation.record_fp(pipe)
    pipe = quantize_pipeline(pipe, follow_link(cfg.eval_q2b, meta["quant_state"]))
    evaluation = PairedEvaluationCallback(
        lambda m: validation.measure_qlip(pipe, q2b, m), out / "evaluation", cfg.eval_every, cfg.eval_monitor,
        "max", save=lambda m, folder, record: save_t2q(m, folder, extra={**extra(), "evaluation": record}))
    return evaluation, validation


def t2q(cfg: T2QConfig, trainer: dict | None = None):
    check_flags(cfg)  # before anything loads or is written
    if cfg.predict:
        return predict(cfg)
    scored = Path(cfg.scored or Path(cfg.run_dir) / ARTIFACTS["score"])
    eval_meta = check_eval_flags(cfg, scored)
    dm = ScoredDataModule(scored, cfg.batch_size, quantile=cfg.norm_quantile, seed=cfg.seed, target=cfg.target)
    dm.setup()  # a missing image, split or column fails here, before any model is loaded
    out = Path(cfg.run_dir) / ARTIFACTS["t2q"]
    if is_global_zero():
        prepare_artifact(cfg.run_dir, ARTIFACTS["t2q"], cfg.overwrite, cfg.fresh)
    tower = load_text_tower(cfg.model, cfg.clip)
    L.seed_everything(cfg.seed, verbose=False)  # after the tower: the head's init is what the seed fixes
    module = T2QModule(tower, lr=cfg.lr, weight_decay=cfg.weight_decay, patience=cfg.patience)
    # what t2q.json records beside the head, so that a folder (this one, or evaluation/best) deploys on its own
    deployed = lambda: {"normalization": dm.describe()["normalization"], "target": cfg.target,  # noqa: E731
                        "scored": str(scored), "sampler": scored_sampler(scored)}
    evaluation, validation = (None, None) if eval_meta is None else \
        paired_evaluation(cfg, eval_meta, dm.val_set.prompts, out, deployed)
    fitter = make_trainer(trainer, progress=True, forced={"max_epochs": cfg.epochs},
                          defaults={"log_every_n_steps": 1, "logger": CSVLogger(str(out), name="logs", version=""),
                                    "callbacks": [evaluation] if evaluation else None})
    fitter.fit(module, datamodule=dm)
    if not fitter.is_global_zero:
        return out
    selected = module.restore_best()  # early stopping: the best val epoch's head, not the last
    module.to(stage_device(trainer))  # the metric passes too; the Trainer's teardown left it on the CPU
    train, val, test = dm.train_set, dm.val_set, dm.test_set
    splits = {"train": train, "val": val, "test": test}
    metrics = {name: t2q_metrics(module, part.prompts, part.targets) for name, part in splits.items() if len(part)}
    metrics.update(
        baselines=baselines(train.prompts, train.targets, val.prompts, val.targets, module.tokenizer),
        baselines_by_split=baselines_by_split(train.prompts, train.targets,
                                              {k: (v.prompts, v.targets) for k, v in splits.items()},
                                              module.tokenizer),
        early_stopping=selected, history=module.history, memory_bytes=module.memory_bytes(),
        world_size=fitter.world_size)
    if evaluation is not None:
        metrics["evaluation"] = {**evaluation.summary(), "split": validation.describe(), "q2b": cfg.eval_q2b}
    table = None
    if cfg.richness and cfg.model == EMBEDDED:
        table = richness_table(module.predict, richness_series(cfg.richness_scenes, cfg.seed))
        print(format_richness_table(table))
    # the sampler of the targets: q2b and evaluate refuse to deploy this T2Q under another one
    save_t2q(module, out, extra={**deployed(), "metrics": metrics})
    write_manifest(out, "t2q", cfg, metrics, data=dm.describe(), richness=table)
    v, b = metrics["val"], metrics["baselines"]
    stop = f"; best val epoch {selected['best_epoch']} of {selected['epochs_run']}" if selected else ""
    print(f"T2Q on {len(val)} val prompts: MSE {v['mse']:.4f} (constant {b['constant_mse']:.4f}, "
          f"prompt-length regression {b['length_mse']:.4f}), Pearson {v['pearson']:.3f}, "
          f"Spearman {v['spearman']:.3f}{stop}; {metrics['memory_bytes'] / 1e6:.3f} MB -> {out}")
    for name in ("train", "test"):
        if name in metrics:
            nb = metrics["baselines_by_split"][name]
            print(f"  {name} ({len(splits[name])} prompts): MSE {metrics[name]['mse']:.4f} (constant "
                  f"{nb['constant_mse']:.4f}, prompt-length regression {nb['length_mse']:.4f})")
    return out
