"""`python -m pipeline.fit score`: FP images of prompt splits, their Inception
features and GIQA scores (the T2Q training targets).

    python -m pipeline.fit score --prompts world --limit 2000 --run-dir runs/t2q
    python -m pipeline.fit score --model path/to/sd --prompts coco:captions_val2017.json --reference coco/val2017

Writes <run-dir>/prompts/ (the cached splits) and <run-dir>/scored/{scored.jsonl,
images/*.png, features.safetensors, extremes.png, manifest.json}. Generation
is sharded and resumable (re-run the same command after an interruption);
under `--trainer.strategy ddp` the shards are dealt to the processes."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

USES_TRAINER = True
AUTO = "auto"


def add_arguments(parser) -> None:
    parser.add_argument("--prompts", type=str, default="world",
                        help="world | builtin | coco:FILE|NAME | cc:FILE | parti:FILE | sd-prompts[:FILE] | FILE")
    parser.add_argument("--limit", type=int | None, default=None, help="keep this many prompts (a stable subset)")
    parser.add_argument("--splits", type=str, default="train,val", help="prompt splits to generate and score")
    parser.add_argument("--split-fractions", type=str, default="0.8,0.1,0.1", help="train,val,test")
    parser.add_argument("--steps", type=int | None, default=None, help="default: 25 on the embedded world, else 50")
    parser.add_argument("--guidance", type=float | None, default=None, help="default: 5.0 embedded, else 7.5")
    parser.add_argument("--shard-size", type=int, default=32, help="images per shard (the unit of resuming)")
    parser.add_argument("--reference", type=str, default=AUTO,
                        help="GIQA reference: a folder of real images, or 'world' (renders; auto = world if embedded)")
    parser.add_argument("--n-reference", type=int | None, default=1000,
                        help="reference images (world renders; a folder's first N, None = all)")
    parser.add_argument("--giqa", type=str, default="gmm", help="gmm | knn")
    parser.add_argument("--gmm-components", type=int, default=4)
    parser.add_argument("--pca-dim", type=int | None, default=64, help="PCA before the GMM (None = none)")
    parser.add_argument("--knn-k", type=int, default=5)
    parser.add_argument("--norm-quantile", type=float, default=0.01,
                        help="normalized score = min-max between these train-split quantiles, clipped to [0, 1]")
    parser.add_argument("--inception-batch", type=int, default=32)


def is_rank_zero() -> bool:
    """True in the launching process (a DDP child re-runs the command with a rank set)."""
    return all(int(os.environ.get(v, 0)) == 0 for v in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def sampling_defaults(model: str, steps, guidance) -> tuple[int, float]:
    from pipeline.models import EMBEDDED
    from pipeline.world.models import WORLD_SAMPLING

    world = model == EMBEDDED
    return (steps or (WORLD_SAMPLING["num_inference_steps"] if world else 50),
            guidance if guidance is not None else (WORLD_SAMPLING["guidance_scale"] if world else 7.5))


def resolve_reference(cfg) -> str:
    from data.reference import WORLD
    from pipeline.models import EMBEDDED

    if cfg.reference != AUTO:
        return cfg.reference
    if cfg.model == EMBEDDED:
        return WORLD
    raise ValueError(f"--reference auto means the world's renders, which only fit --model embedded; for "
                     f"{cfg.model!r} pass --reference PATH, a folder of real images (e.g. COCO val2017 photos)")


def refuse_finished(out: Path, overwrite: bool) -> None:
    from pipeline.runs import RunDirError

    if (out / "manifest.json").is_file() and not overwrite:
        raise RunDirError(f"{out} already holds results; pass --overwrite true to replace them, "
                          f"or choose another --run-dir")


def prepare_scored_dir(out: Path, signature: dict, overwrite: bool) -> None:
    """Refuse finished results (unless overwrite); resume unfinished ones only with the same settings."""
    from pipeline.runs import RunDirError

    refuse_finished(out, overwrite)
    meta = out / "meta.json"
    if overwrite and out.exists():
        shutil.rmtree(out)
    if meta.is_file():
        old = json.loads(meta.read_text())
        diff = [k for k in signature if old.get(k) != signature[k]]
        if diff:
            detail = "; ".join(f"{k}: unfinished run {old.get(k)!r} vs now {signature[k]!r}" for k in diff[:4])
            raise RunDirError(f"{out} holds an unfinished score run with other settings ({detail}); pass "
                              f"--overwrite true to start over, or choose another --run-dir")
        print(f"resuming the unfinished score run in {out}")
    out.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(signature, indent=1))


def run(cfg):
    import warnings

    import lightning as L

    from data.prompts import PromptDataModule, dealt_loader
    from data.reference import ReferenceImages
    from pipeline.metrics.giqa import make_giqa
    from pipeline.models import load_pipeline
    from pipeline.quant.state import model_fingerprint
    from pipeline.qlip.scoring import FPFeatures

    t0 = time.time()
    giqa = make_giqa(cfg.giqa, cfg.gmm_components, cfg.pca_dim, cfg.knn_k, cfg.seed)  # validates early
    reference = resolve_reference(cfg)
    steps, guidance = sampling_defaults(cfg.model, cfg.steps, cfg.guidance)
    splits = [s.strip() for s in cfg.splits.split(",") if s.strip()]
    try:
        fractions = [float(f) for f in cfg.split_fractions.split(",")]
    except ValueError:
        raise ValueError(f"--split-fractions {cfg.split_fractions!r} must be three numbers such as "
                         f"0.8,0.1,0.1") from None
    rank_zero = is_rank_zero()
    out = Path(cfg.run_dir) / "scored"
    if rank_zero:
        refuse_finished(out, cfg.overwrite)  # before loading anything
    dm = PromptDataModule(cfg.prompts, cfg.run_dir, cfg.limit, fractions, seed=cfg.seed, overwrite=cfg.overwrite,
                          predict_splits=splits, shard_size=cfg.shard_size)
    if rank_zero:
        dm.prepare_data()
    shards = dm.generation_shards()  # an empty split fails here, before anything is generated
    pipe = load_pipeline(cfg.model, allow_download=cfg.allow_download)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    ref = ReferenceImages(reference, cfg.n_reference, side, cfg.shard_size, cfg.seed)
    giqa.check_reference(ref.n, f"--reference {reference}")  # too few images for the GMM: fail now
    signature = {"model": cfg.model, "unet_sha256": model_fingerprint(pipe.unet)["weights_sha256"], "steps": steps,
                 "guidance": guidance, "resolution": side, "prompts": dm.settings(), "splits": splits,
                 "shard_size": cfg.shard_size, "seed": cfg.seed, "reference": ref.describe()}
    if rank_zero:
        prepare_scored_dir(out, signature, cfg.overwrite)

    kwargs = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False,
              **{k: v for k, v in vars(cfg.trainer).items() if v is not None}, "use_distributed_sampler": False}
    trainer = L.Trainer(**kwargs)
    module = FPFeatures(pipe, out, steps, guidance, cfg.inception_batch)
    with warnings.catch_warnings():  # shards go to disk: predict_step returns nothing on purpose
        warnings.filterwarnings("ignore", message=".*predict returned None.*")
        trainer.predict(module, datamodule=dm, return_predictions=False)
        module.pipe = None  # the reference pass needs only the Inception
        trainer.predict(module, dataloaders=dealt_loader(ref, trainer), return_predictions=False)
    trainer.strategy.barrier()  # every process's shards are on disk before one of them reads them all
    if not trainer.is_global_zero:
        return out
    return finish(cfg, out, dm, shards, ref, giqa, signature, time.time() - t0)


def finish(cfg, out: Path, dm, shards: list[dict], ref, giqa, signature: dict, seconds: float) -> Path:
    """Fit GIQA on the reference features, score, normalize over train, write the scored set."""
    import numpy as np
    from safetensors.torch import save_file

    from data.scored import Normalizer, write_scored
    from pipeline.runs import write_manifest
    from pipeline.qlip.scoring import image_name, read_shards, shard_name

    gen = read_shards(out, [shard_name(s) for s in shards])
    ref_feats = read_shards(out, [f"reference_{k:05d}" for k in range(len(ref))])
    raw = giqa.fit(ref_feats).score(gen)
    rows = []
    for s in shards:
        for i, p, seed in zip(s["indices"], s["prompts"], s["seeds"]):
            rows.append({"index": len(rows), "split": s["split"], "prompt": p, "seed": seed,
                         "image": image_name(s["split"], i)})
    train = [v for v, r in zip(raw, rows) if r["split"] == "train"]
    normalizer = Normalizer.fit(train if train else raw, cfg.norm_quantile)
    for r, v, q in zip(rows, raw, normalizer(raw)):
        r["score_raw"], r["score"] = float(v), float(q)
    write_scored(out, rows)
    save_file({"generated": gen.contiguous(), "reference": ref_feats.contiguous()}, str(out / "features.safetensors"),
              metadata={"giqa": json.dumps(giqa.describe()), "rows": "scored.jsonl order"})
    shutil.rmtree(out / "shards", ignore_errors=True)  # merged into features.safetensors
    _extremes(out, rows)
    per_split = {s: {"n": int(sum(r["split"] == s for r in rows)),
                     "raw_mean": float(np.mean([r["score_raw"] for r in rows if r["split"] == s])),
                     "score_mean": float(np.mean([r["score"] for r in rows if r["split"] == s]))}
                 for s in dict.fromkeys(r["split"] for r in rows)}
    metrics = {"per_split": per_split, "normalization": vars(normalizer) | {"over": "train" if train else "all"},
               "giqa": giqa.describe(), "n_reference": ref.n, "prompt_stats": vars(dm.stats), "seconds": seconds}
    write_manifest(out, "score", cfg, metrics, signature=signature)
    print(f"scored {len(rows)} FP images with {cfg.giqa.upper()}-GIQA ({ref.n} reference images) -> {out}  "
          + ", ".join(f"{s}: n={v['n']} mean score {v['score_mean']:.3f}" for s, v in per_split.items()))
    return out


def _extremes(out: Path, rows: list[dict], n: int = 8) -> None:
    """extremes.png: the n best-scored images (top row) and the n worst (bottom row)."""
    import numpy as np
    from PIL import Image

    from pipeline.plots import save_grid

    if len(rows) < 2:
        return
    order = sorted(rows, key=lambda r: r["score_raw"])
    k = min(n, len(rows) // 2)
    load = lambda rs: np.stack([np.asarray(Image.open(out / r["image"]).convert("RGB")) for r in rs])  # noqa: E731
    best, worst = load(order[::-1][:k]), load(order[:k])
    save_grid([best, worst], out / "extremes.png", labels=["best GIQA", "worst GIQA"],
              scale=max(1, 96 // best.shape[1]))
