"""A Lightning callback that measures MixDQ's per-layer sensitivity (pipeline.mixdq.sensitivity) on a fixed
small probe set at the end of the fit it is attached to (a calibration unit's phases, Q2B's epochs), and
writes the table and heatmap next to the run (the pictures are pipeline.plots)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import lightning as L
import torch

from pipeline.artifacts import write_json_atomic, write_text_atomic
from pipeline.mixdq.groups import layer_groups
from pipeline.mixdq.sensitivity import SENSITIVITY_FORMAT, Probe, measure_sensitivity, sensitivity_table
from pipeline.plots import plot_sensitivity
from pipeline.quant import quant_layers


class SensitivityCallback(L.Callback):
    """On `on_fit_end` (rank 0): the sensitivity of `layers` (a regex, or names; default every quantized layer)
    of `pipe`'s quantized UNet at `w_bits` / `a_bits`, measured as the stage measures it, into
    `out_dir`/sensitivity_<k>.{json,md,png} (k counts the fits it has seen). `records` keeps every result."""

    def __init__(self, pipe, probe: Probe, out_dir: str | Path, w_bits: Sequence[int] = (), a_bits: Sequence[int] = (),
                 layers: str | Sequence[str] | None = None, content_regex: str | None = None):
        self.pipe, self.probe, self.out_dir = pipe, probe, Path(out_dir)
        self.w_bits, self.a_bits = list(w_bits), list(a_bits)
        self.layers, self.content_regex = layers, content_regex
        self.records: list[dict] = []

    def _names(self) -> list[str]:
        every = list(quant_layers(self.pipe.unet))
        if self.layers is None:
            return every
        if isinstance(self.layers, str):
            return [n for n in every if re.search(self.layers, n)]
        return list(self.layers)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        names = self._names()
        with torch.no_grad():
            rec = measure_sensitivity(self.pipe, self.probe, self.w_bits, self.a_bits, layers=names)
        groups = layer_groups(names, self.content_regex, require_both=False)  # a few probe layers may be one group
        rec = {"format": SENSITIVITY_FORMAT, **rec, "groups": groups, "epoch": trainer.current_epoch}
        k = len(self.records)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out_dir / f"sensitivity_{k}.json", rec)
        write_text_atomic(self.out_dir / f"sensitivity_{k}.md", sensitivity_table(rec))
        plot_sensitivity(rec, self.out_dir / f"sensitivity_{k}.png", title=f"sensitivity after fit {k}")
        self.records.append(rec)
