"""`python -m pipeline.fit evaluate`: QDiffBench for the FP model and quantized
states: FID / sFID to the FP images (same prompts and seeds), CLIP score,
PSNR / SSIM (/ LPIPS) to FP, FID to real images, FAB, BitOPs, size, time.

Writes <run-dir>/evaluate/{results.json, results.md, grid_<method>.png,
manifest.json}. See docs/evaluation.md."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import lightning as L

from data.prompts import parse_fractions
from pipeline.artifacts import ARTIFACTS, prepare_artifact, write_manifest
from pipeline.engine import FLAG_RANGES, StageConfig, check_flags
from pipeline.evaluation.plan import AUTO, plan_evaluation
from pipeline.evaluation.real_images import world_real_images
from pipeline.evaluation.report import write_results
from pipeline.evaluation.runner import run_evaluation, validate
from pipeline.evaluation.settings import EvalSettings
from pipeline.evaluation.splits import PROMPT_SEED
from pipeline.models import load_pipeline, sampling_defaults


@dataclass
class EvaluateConfig(StageConfig):
    """Settings of the evaluate stage."""

    flag_ranges: ClassVar = {"prompt_seed": FLAG_RANGES["seed"]}  # a seed like --seed

    quant_states: list[str] = field(default_factory=list)
    """calibrate (or q2b) output folders to evaluate"""
    labels: list[str] | None = None
    """table names of --quant-states"""
    in_domain: str = AUTO
    """prompt source: world[:train|val|test|unseen] | builtin | coco:FILE.json|NAME | cc:FILE.tsv |
    parti:FILE.tsv | sd-prompts[:FILE] | FILE.txt|.jsonl|.json|.tsv|.csv|.parquet, split by the SHA-1 of each
    prompt into train/val/test (--split-fractions; docs/prompts.md); this stage draws from test; auto =
    world:test on the embedded model, else builtin"""
    generalization: str | None = None
    """prompt-generalization prompts: another source than calibration's, same syntax; its test split"""
    split_fractions: str = "0.8,0.1,0.1"
    """train,val,test fractions of the hashed prompt split (use the same in every stage of a run)"""
    n: int = 128
    """prompts per split"""
    images_per_prompt: int = 1
    """seeds per prompt (image i: prompt i // k, noise seed --seed + i)"""
    prompt_seed: int = PROMPT_SEED
    """seed of the prompt draw (the world's captions; hashed sources do not use it); --seed changes the noise
    only, so runs with different --seed score the same prompts"""
    baseline: str | None = None
    """label of the method the paired tests compare every other quantized method with (default: the first
    --quant-states)"""
    steps: int | None = None
    """sampling steps (default: the model's, pipeline.models.sampling_defaults)"""
    guidance: float | None = None
    """classifier-free guidance scale (default: the model's)"""
    resolution: int | None = None
    """pixels (default: the model's)"""
    batch_size: int = 8
    """prompts per generation batch"""
    text_aware_batch_size: int | None = None
    """prompts per generation call of a text-aware (QLIP) method inside each batch: a call runs the max of its
    prompts' bits, so 1 gives every prompt its own bits at the cost of speed (default: --batch-size, the
    paper's batched rule); static methods keep --batch-size"""
    fid: bool = True
    """FID to FP (and to --real-images)"""
    fid_dims: str = AUTO
    """Inception features: 2048 (standard) | 768 | 192 | 64 (low-rank) | auto = the largest the image count
    supports (n > dims)"""
    sfid: bool = True
    """sFID to FP"""
    sfid_grid: str = AUTO
    """17 (standard, 2023 dims) | 2..16 (mixed_6/conv[:7] pooled to GxG, low-rank) | auto"""
    clip: str = AUTO
    """CLIPModel folder for the CLIP score; auto = checkpoints/tiny-world/clip; none"""
    lpips: bool = True
    """LPIPS to FP where its weights are on disk"""
    real_images: str | None = None
    """folder of real images (FID to real), or world[:N]: N renders (default 1000) of the embedded world's test
    split, written once under <run-dir>/real_images"""
    grid_n: int = 8
    """images per split in each method's grid"""


def evaluate(cfg: EvaluateConfig, trainer: dict | None = None) -> Path:
    check_flags(cfg)  # before anything loads or is written
    real = cfg.real_images
    if real and (real == "world" or real.startswith("world:")):  # the world's renders are its real images
        real = str(world_real_images(real, Path(cfg.run_dir) / "real_images", cfg.resolution or 32))
    settings = EvalSettings(fid=cfg.fid, sfid=cfg.sfid, lpips=cfg.lpips, real_images=real, grid_n=cfg.grid_n,
                            text_aware_batch=cfg.text_aware_batch_size)
    plan = plan_evaluation(cfg.model, cfg.quant_states, cfg.labels, cfg.in_domain, cfg.generalization, cfg.n,
                           cfg.images_per_prompt, cfg.seed, settings, cfg.fid_dims, cfg.sfid_grid, cfg.clip,
                           parse_fractions(cfg.split_fractions), cfg.prompt_seed, cfg.baseline)
    fp = load_pipeline(cfg.model, **cfg.load_options())
    sampling = sampling_defaults(fp, cfg.steps, cfg.guidance, cfg.resolution)
    settings.steps, settings.guidance = sampling.steps, sampling.guidance
    settings.resolution, settings.scheduler = sampling.resolution, sampling.scheduler
    validate(cfg.model, plan.methods, plan.splits, plan.settings, cfg.load_options(), fp_unet=fp.unet)
    del fp  # each method loads its own pipeline
    out = prepare_artifact(cfg.run_dir, ARTIFACTS["evaluate"], cfg.overwrite, cfg.fresh)
    L.seed_everything(cfg.seed, verbose=False)
    res = run_evaluation(cfg.model, plan.methods, plan.splits, plan.settings, cfg.batch_size, trainer,
                         cfg.load_options(), progress_dir=Path(cfg.run_dir) / "evaluate_progress",
                         discard_stale=cfg.overwrite)
    if not res["is_global_zero"]:
        return out
    md = write_results(out, cfg.model, plan, res)
    write_manifest(out, "evaluate", cfg, {"rows": res["rows"]}, sampling=sampling.as_dict(),
                   prompt_split={s.name: s.draw for s in plan.splits})
    print(md)
    print(f"results -> {out}")
    return out
