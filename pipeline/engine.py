"""The engineering every stage shares: the common stage settings, the one
Trainer factory and the one rank check.

A stage is a config dataclass plus a function, `calibrate(CalibrateConfig(...),
trainer={...}) -> Path`; `trainer` holds Lightning Trainer arguments (the CLI's
`--trainer.*` flags), so the same call scales from a CPU to a cluster."""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from functools import cache

import diffusers
import lightning as L
import transformers

from pipeline.models import default_model


@dataclass
class StageConfig:
    """Settings every stage takes."""

    model: str = field(default_factory=default_model)
    """'embedded', 'tiny-random', a local diffusers folder, or a cached hub id"""
    allow_download: bool = False
    """let diffusers fetch a hub id"""
    run_dir: str = "runs/default"
    """where this stage writes its artifacts"""
    overwrite: bool = False
    """replace results already in --run-dir"""
    seed: int = 0
    """seed of everything random (noise, sampling order)"""
    scheduler: str | None = None
    """sampler: pndm | ddim | ddpm | euler | euler-ancestral | heun | dpm++ | lcm (default: the model's own)"""
    allow_pickle: bool = False
    """load pickle-only (.bin) model weights; unpickling can run arbitrary code, so only for trusted files"""

    def load_options(self) -> dict:
        """How this stage loads the model (pipeline.models.load_pipeline's keywords)."""
        return {"allow_download": self.allow_download, "scheduler": self.scheduler, "allow_pickle": self.allow_pickle}


def is_global_zero() -> bool:
    """True in the process of global rank 0, before any Trainer exists.

    Every launcher Lightning supports sets one of these: torchrun and Lightning's
    own DDP launcher (RANK, or LOCAL_RANK with NODE_RANK), SLURM (SLURM_PROCID).
    All must be 0: on a second node LOCAL_RANK is 0 while NODE_RANK is not."""
    return all(int(os.environ.get(v) or 0) == 0 for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


@cache
def quiet_libraries() -> None:
    """Once per process, the libraries' noise off: Lightning's banners ("GPU available", tips,
    seed lines; a stage builds many internal Trainers and each would print them) and the model
    loaders' per-component bars (diffusers, transformers); the stage's own bars show its progress."""
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.accelerators.cuda", "lightning.fabric.utilities.seed",
                 "lightning.pytorch.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*predict returned None.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*|.*litmodels.*|.*treespec, LeafSpec.*")


def make_trainer(trainer: dict | None = None, *, defaults: dict | None = None, forced: dict | None = None,
                 progress: bool = False) -> L.Trainer:
    """The one Trainer builder: the stage's `defaults` (no logger, checkpoints,
    model summary; a progress bar only where this Trainer is the stage's main
    loop), then the user's `trainer` flags (None values ignored), then what the
    stage's loop cannot work without (`forced`)."""
    quiet_libraries()
    kwargs = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False,
              "enable_progress_bar": progress, **(defaults or {})}
    kwargs.update({k: v for k, v in (trainer or {}).items() if v is not None})
    kwargs.update(forced or {})
    return L.Trainer(**kwargs)
