"""Evaluation settings shared by every method, and which metrics they enable."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.metrics.inception import POOL_DIMS, SPATIAL_SIDE


@dataclass
class EvalSettings:
    # the sampler: the evaluate stage resolves it with pipeline.models.sampling_defaults
    steps: int | None = None
    guidance: float | None = None
    resolution: int | None = None  # pixels; None: the model's native size
    scheduler: str | None = None  # recorded (the pipeline's own), checked against a QLIP method's scored set
    fid: bool = True
    fid_dims: int = 2048  # Inception pool tap: 2048 (standard) | 768 | 192 | 64
    sfid: bool = True
    sfid_grid: int = 17  # 17 = standard sFID (2023 dims)
    clip_path: str | None = None  # a CLIPModel folder, or None (skipped)
    lpips: bool = False  # only when its weights are on disk
    real_images: str | None = None  # folder of real images for "FID to real"
    grid_n: int = 8  # images per split shown in each method's grid
    inception_batch: int = 16
    # prompts per generation call of a text-aware (QLIP) method: a batch runs the max of its prompts' bits,
    # so 1 gives each prompt its own bits; None = the evaluation batch (the paper's batched rule)
    text_aware_batch: int | None = None

    @property
    def fid_tap(self) -> int:
        return self.fid_dims

    def taps(self) -> list:
        """Inception taps computed for every generated image."""
        taps = []
        if self.fid:
            taps.append(self.fid_dims)
        if self.sfid:
            taps.append("spatial")
        return taps

    def check(self) -> None:
        if self.steps is None or self.guidance is None:
            raise ValueError(f"evaluation settings need steps and guidance (now {self.steps}, {self.guidance}): "
                             f"resolve them with pipeline.models.sampling_defaults")
        if self.steps < 1:
            raise ValueError(f"--steps {self.steps} must be >= 1")
        if self.fid_dims not in POOL_DIMS:
            raise ValueError(f"--fid-dims {self.fid_dims} is not an Inception pool tap; choose one of {POOL_DIMS}")
        if not 1 <= self.sfid_grid <= SPATIAL_SIDE:
            raise ValueError(f"--sfid-grid {self.sfid_grid} must be in 1..{SPATIAL_SIDE} (17 = standard sFID)")
        if self.real_images and not Path(self.real_images).is_dir():
            raise FileNotFoundError(f"--real-images {self.real_images} is not a folder")
        if self.text_aware_batch is not None and self.text_aware_batch < 1:
            raise ValueError(f"--text-aware-batch-size {self.text_aware_batch} must be >= 1 (or left out)")
        if self.real_images and not self.fid:
            raise ValueError("--real-images needs --fid true")
