"""A Lightning callback that draws the Q2B bit-allocation heatmap while Q2B
trains (the pictures themselves are pipeline.plots)."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from pipeline.plots import plot_bit_heatmaps


class BitAllocationCallback(L.Callback):
    """While Q2B trains: every `every_n_epochs`, a heatmap of the decisions at
    the low, median and high training quality (`q`) into `out_dir`."""

    def __init__(self, q: torch.Tensor, out_dir: str | Path, every_n_epochs: int = 5):
        self.q = torch.as_tensor(q, dtype=torch.float32)
        self.out_dir, self.every = Path(out_dir), every_n_epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        offset = getattr(pl_module, "epoch_offset", 0)  # epochs done before a resumed fit
        epoch = offset + trainer.current_epoch
        if not trainer.is_global_zero or (epoch + 1) % self.every and epoch + 1 != offset + trainer.max_epochs:
            return
        q2b = pl_module.q2b
        qs = torch.quantile(self.q, torch.tensor([0.1, 0.5, 0.9])).to(q2b.gate_bias.device)
        with torch.no_grad():
            tables = {f"q={float(v):.3g}": q2b(v.reshape(1))[0].cpu() for v in qs}
        plot_bit_heatmaps(tables, q2b.layers, q2b.bit_options, self.out_dir / f"bits_epoch{epoch:03d}.png",
                          title=f"Q2B bits, epoch {epoch}")
