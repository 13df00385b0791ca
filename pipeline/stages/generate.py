"""`python -m pipeline.fit generate`: images from the FP, a quantized, or a
text-aware (QLIP: `--q2b runs/x/q2b`) UNet.

Writes <run-dir>/<name>/{images/*.png, grid.png, manifest.json}; with --q2b
also bits.json (per batch: prompts, q, per-prompt and batch FAB, option
shares), bits.safetensors (each batch's [layers, steps] bit table),
bits_heatmap.png and bit_shares.png."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data.prompts import load_prompts
from pipeline.artifacts import ARTIFACTS, prepare_artifact, write_manifest
from pipeline.engine import StageConfig, fp_autocast, stage_device
from pipeline.models import load_quantized_pipeline
from pipeline.plots import save_grid, save_images
from pipeline.qlip.pipeline import QLIPPipeline, log_batch, write_bits
from pipeline.sampling import generate as sample


@dataclass
class GenerateConfig(StageConfig):
    """Settings of the generate stage."""

    prompts: str = "world"
    """'world', 'builtin' or a .txt/.jsonl file"""
    n: int = 8
    """number of prompts"""
    quant_state: str | None = None
    """a calibrate output folder (with --q2b: overrides the state it was trained on)"""
    q2b: str | None = None
    """a q2b output folder: text-aware bits (QLIP)"""
    t2q: str | None = None
    """with --q2b: a T2Q folder other than its own"""
    steps: int = 20
    """sampling steps"""
    guidance: float = 5.0
    """classifier-free guidance scale"""
    batch_size: int = 8
    """prompts per batch (with --q2b a batch runs the max bits of its prompts)"""
    name: str = ARTIFACTS["generate"]
    """output folder inside --run-dir"""


def generate(cfg: GenerateConfig, trainer: dict | None = None) -> Path:
    device = stage_device(trainer)  # only --trainer.accelerator / devices / precision matter here
    prompts = load_prompts(cfg.prompts, limit=cfg.n, split="val", seed=cfg.seed)
    qlip = None
    if cfg.q2b:
        qlip = QLIPPipeline.from_pretrained(cfg.q2b, model=cfg.model, quant_state=cfg.quant_state, t2q=cfg.t2q,
                                            load=cfg.load_options())
        pipe = qlip.to(device).pipe
    else:
        pipe = load_quantized_pipeline(cfg.model, cfg.quant_state, **cfg.load_options()).to(device)
    n_steps = pipe.unet.quant_config.n_steps if getattr(pipe.unet, "quant_config", None) is not None else 1
    if n_steps > 1 and n_steps != cfg.steps:
        raise ValueError(f"--steps {cfg.steps} differs from the {n_steps} steps the quantized state was "
                         f"calibrated for")
    out = prepare_artifact(cfg.run_dir, cfg.name, cfg.overwrite)
    seeds = [cfg.seed + i for i in range(len(prompts))]
    summary = None
    with fp_autocast(trainer, device):  # the quantized layers compute in fp32 inside it
        if qlip is None:
            images = sample(pipe, prompts, seeds, steps=cfg.steps, guidance=cfg.guidance, batch_size=cfg.batch_size)
        else:
            result = qlip(prompts, seeds, batch_size=cfg.batch_size, guidance=cfg.guidance, on_batch=log_batch)
            images = result.images
    if qlip is not None:
        summary = write_bits(out, result, qlip)
    save_images(images, out / "images")
    save_grid([images], out / "grid.png", scale=4 if images.shape[1] <= 64 else 1)
    write_manifest(out, "generate", cfg, summary, prompts=prompts, seeds=seeds)
    print(f"{len(images)} images -> {out}")
    return out
