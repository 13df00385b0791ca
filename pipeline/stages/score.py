"""`python -m pipeline.fit score`: FP images of prompt splits, their Inception
features and GIQA scores (the T2Q training targets).

    python -m pipeline.fit score --prompts world --limit 2000 --run-dir runs/t2q
    python -m pipeline.fit score --model path/to/sd --prompts coco:captions_val2017.json --reference coco/val2017

Writes <run-dir>/prompts/ (the cached splits) and <run-dir>/scored/{scored.jsonl,
images/*.png, features.safetensors, extremes.png, manifest.json}. Generation
is sharded and resumable (re-run the same command after an interruption);
under `--trainer.strategy ddp` the shards are dealt to the processes."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from data.prompts import PromptDataModule, dealt_loader, parse_fractions
from data.reference import ReferenceImages
from pipeline.artifacts import ARTIFACTS, write_manifest
from pipeline.engine import StageConfig, check_flags, is_global_zero, make_trainer, stage_device
from pipeline.metrics.giqa import make_giqa
from pipeline.models import load_pipeline, sampling_defaults
from pipeline.qlip import scoring
from pipeline.quant.state import model_fingerprint


@dataclass
class ScoreConfig(StageConfig):
    """Settings of the score stage."""

    prompts: str = "world"
    """prompt source: world[:train|val|test|unseen] | builtin | coco:FILE.json|NAME | cc:FILE.tsv |
    parti:FILE.tsv | sd-prompts[:FILE] | FILE.txt|.jsonl|.json|.tsv|.csv|.parquet, split by the SHA-1 of each
    prompt into train/val/test (--split-fractions; docs/prompts.md); this stage scores --splits ('world' here:
    the world's train scenes, hashed into T2Q's train/val)"""
    limit: int | None = None
    """keep this many prompts (a stable subset)"""
    splits: str = "train,val"
    """prompt splits to generate and score"""
    split_fractions: str = "0.8,0.1,0.1"
    """train,val,test fractions of the hashed prompt split (use the same in every stage of a run)"""
    steps: int | None = None
    """sampling steps (default: the model's, pipeline.models.sampling_defaults); must be what q2b/evaluate
    deploy"""
    guidance: float | None = None
    """classifier-free guidance scale (default: the model's)"""
    resolution: int | None = None
    """pixels (default: the model's)"""
    shard_size: int = 32
    """images per shard (the unit of resuming)"""
    reference: str = "auto"
    """GIQA reference: a folder of real images, or 'world' (renders; auto = world if embedded)"""
    n_reference: int | None = 1000
    """reference images (world renders; a folder's first N, None = all)"""
    giqa: str = "gmm"
    """gmm (as published: log-likelihood under a full-covariance GMM in the PCA space keeping --pca-variance) |
    knn (the paper's alternative) | gmm-residual (a variant: adds the discarded dimensions as an isotropic
    Gaussian; pipeline/metrics/giqa.py says why)"""
    gmm_components: int = 5
    """GMM components (5 as published)"""
    pca_dim: int | None = None
    """PCA dimensions before the GMM (None: as many as keep --pca-variance of the reference's variance)"""
    pca_variance: float = 0.95
    """fraction of the reference's variance the PCA keeps when --pca-dim is None (0.95 as published)"""
    knn_k: int = 5
    """neighbours of KNN-GIQA"""
    norm_quantile: float = 0.01
    """normalized score = min-max between these train-split quantiles, clipped to [0, 1]"""
    inception_batch: int = 32
    """images per Inception pass"""


def score(cfg: ScoreConfig, trainer: dict | None = None) -> Path:
    check_flags(cfg)  # before anything loads or is written
    t0 = time.time()
    giqa = make_giqa(cfg.giqa, cfg.gmm_components, cfg.pca_dim, cfg.knn_k, cfg.seed,
                     pca_variance=cfg.pca_variance)  # validates early
    reference = scoring.resolve_reference(cfg.reference, cfg.model)
    splits = [s.strip() for s in cfg.splits.split(",") if s.strip()]
    fractions = parse_fractions(cfg.split_fractions)
    out = Path(cfg.run_dir) / ARTIFACTS["score"]
    dm = PromptDataModule(cfg.prompts, cfg.run_dir, cfg.limit, fractions, seed=cfg.seed, overwrite=cfg.overwrite,
                          predict_splits=splits, shard_size=cfg.shard_size)
    if is_global_zero():
        dm.check_source()  # a bad or empty --prompts fails before the lock is taken
        scoring.refuse_finished(out, cfg.overwrite, cfg.fresh)  # before loading anything
        dm.prepare_data()
    shards = dm.generation_shards()  # an empty split fails here, before anything is generated
    pipe = load_pipeline(cfg.model, **cfg.load_options()).to(stage_device(trainer))
    sampling = sampling_defaults(pipe, cfg.steps, cfg.guidance, cfg.resolution)
    steps, guidance, side = sampling.steps, sampling.guidance, sampling.resolution
    ref = ReferenceImages(reference, cfg.n_reference, side, cfg.shard_size, cfg.seed)
    giqa.check_reference(ref.n, f"--reference {reference}")  # too few images for the GMM: fail now
    signature = {"model": cfg.model, "unet_sha256": model_fingerprint(pipe.unet)["weights_sha256"], "steps": steps,
                 "guidance": guidance, "resolution": side, "scheduler": sampling.scheduler, "prompts": dm.settings(),
                 "splits": splits, "shard_size": cfg.shard_size, "seed": cfg.seed, "reference": ref.describe()}
    if is_global_zero():
        scoring.prepare_scored_dir(out, signature, cfg.overwrite or cfg.fresh)

    fitter = make_trainer(trainer, progress=True, forced={"use_distributed_sampler": False})
    module = scoring.FPFeatures(pipe, out, steps, guidance, cfg.inception_batch, resolution=side)
    fitter.predict(module, datamodule=dm, return_predictions=False)  # shards go to disk
    module.pipe = None  # the reference pass needs only the Inception
    fitter.predict(module, dataloaders=dealt_loader(ref, fitter), return_predictions=False)
    fitter.strategy.barrier()  # every process's shards are on disk before one of them reads them all
    if not fitter.is_global_zero:
        return out
    metrics = scoring.finish_scored_set(out, shards, len(ref), giqa, cfg.norm_quantile)
    metrics.update(n_reference=ref.n, prompt_stats=vars(dm.stats), seconds=time.time() - t0)
    write_manifest(out, "score", cfg, metrics, signature=signature, sampling=sampling.as_dict(),
                   prompt_split={"split_by": "sha1", "fractions": list(dm.fractions), "salt": dm.salt,
                                 "counts": {s: len(dm.splits[s]) for s in ("train", "val", "test")}})
    print(f"scored {metrics['n_rows']} FP images with {cfg.giqa.upper()}-GIQA ({ref.n} reference images) -> {out}  "
          + ", ".join(f"{s}: n={v['n']} mean score {v['score_mean']:.3f}" for s, v in metrics["per_split"].items()))
    return out
