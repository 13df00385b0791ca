"""Stage `pretrain`: train the embedded tiny world (CLIP, VAE, UNet) and save it
as a diffusers StableDiffusionPipeline folder (default checkpoints/tiny-world).

    python -m pipeline.fit pretrain                      # the shipped model (see docs/embedded_world.md for timings)
    python -m pipeline.fit pretrain --out /tmp/w --clip-steps 20 --vae-steps 20 --unet-steps 20 --n-train 512

Per-model step counts are the stage's own flags; `--trainer.max_steps N` caps
each of the three fits at N (handy for smoke runs). Single-process only: the
latent encoding and the saving between the fits run in this process."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from callbacks.world_quality import WorldQualityMonitor
from data.world import RESOLUTIONS
from pipeline.artifacts import ARTIFACTS, prepare_artifact, write_manifest
from pipeline.engine import Range, StageConfig, check_flags
from pipeline.errors import RunDirError
from pipeline.models import EMBEDDED_DIR
from pipeline.world.train import WorldRecipe, train_world


@dataclass
class PretrainConfig(StageConfig, WorldRecipe):
    """Settings of the pretrain stage."""

    out: str = field(default_factory=lambda: str(EMBEDDED_DIR))
    """pipeline folder to write"""
    flag_ranges: ClassVar = {"resolution": Range(values=RESOLUTIONS)}  # the world's image side, not sampling's


def pretrain(cfg: PretrainConfig, trainer: dict | None = None) -> dict:
    check_flags(cfg)  # before anything loads or is written
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise RunDirError(f"{out} already exists; pass --overwrite true to retrain and replace it, "
                          f"or choose another --out")
    art = prepare_artifact(cfg.run_dir, ARTIFACTS["pretrain"], cfg.overwrite)
    monitors = []

    def watch(vae):
        monitors.append(WorldQualityMonitor(vae, every_n_steps=cfg.monitor_every))
        return monitors

    metrics = train_world(cfg, out, art, trainer, seed=cfg.seed, overwrite=cfg.overwrite, unet_callbacks=watch)
    metrics["quality_during_training"] = monitors[0].history if monitors else []
    timings = metrics.pop("timings")
    write_manifest(art, "pretrain", cfg, metrics, timings=timings, checkpoint=str(out))
    return metrics
