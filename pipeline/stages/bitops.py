"""`python -m pipeline.fit bitops`: BitOPs / FAB / size of a UNet at given bits,
traced on the meta device (no weights needed for the reference configs)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.artifacts import write_json_atomic
from pipeline.engine import StageConfig, check_flags
from pipeline.metrics.cost import bitops_table, format_table
from pipeline.models import load_pipeline, meta_unet


@dataclass
class BitopsConfig(StageConfig):
    """Settings of the bitops stage."""

    reference: list[str] = field(default_factory=lambda: ["sd-v1-4", "bk-sdm-tiny", "sdxl-base"])
    """published UNet configs to report (sd-v1-4, bk-sdm-tiny, sdxl-base); [] for --model"""
    resolution: int | None = None
    """pixels; default 512 (SD), 1024 (SDXL)"""
    bits: list[str] = field(default_factory=lambda: ["32/32", "8/8", "4/8", "4/16"])
    """W/A pairs"""
    out: str | None = None
    """also write the table as JSON here"""


def bitops(cfg: BitopsConfig) -> list[dict]:
    check_flags(cfg)  # before anything loads or is written
    unets = {name: meta_unet(name) for name in cfg.reference}
    if not cfg.reference:
        unets[cfg.model] = load_pipeline(cfg.model).unet
    rows = bitops_table(unets, cfg.resolution, cfg.bits)
    print("BitOPs (T) of one UNet call, classifier-free-guidance batch of 2")
    print(format_table(rows))
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cfg.out, rows)
    return rows
