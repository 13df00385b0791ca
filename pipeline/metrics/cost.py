"""FAB and BitOPs as torchmetrics Metrics (DESIGN section 6), fed with the bit
policy in force for each generated prompt batch.

A static quantized model has one policy; a text-aware one (QLIP) sets a new
policy per prompt batch. Each `update(policy, n_images)` adds the batch's
value weighted by its image count, so `compute()` is the mean over images.
States are sums with dist_reduce_fx="sum": processes merge exactly.

  FAB   = mean activation bits over quantized layers and sampling steps,
          weighted by each layer's input-activation size (and unweighted);
  BitOPs = MACs x weight bits x activation bits summed over all Conv2d/Linear
          layers of one UNet call (classifier-free-guidance batch of 2),
          averaged over sampling steps; layers outside the policy run 32/32.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torchmetrics import Metric


def _policy_table(policy, n_layers: int) -> torch.Tensor:
    table = torch.as_tensor(policy, dtype=torch.float64)
    if table.dim() == 1:
        table = table[:, None]
    if table.dim() != 2 or table.shape[0] != n_layers:
        raise ValueError(f"a bit policy of shape {tuple(table.shape)} does not fit {n_layers} layers "
                         f"(expected [n_layers, n_steps])")
    return table


class FAB(Metric):
    """Feature average bits. `layers`: the policy's row names; `stats`: the
    accounting.layer_stats of the UNet (input sizes are the FAB weights)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, stats: Mapping, layers: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        missing = [n for n in layers if n not in stats]
        if missing:
            raise ValueError(f"layers {missing[:3]} have no layer statistics")
        if not layers:
            raise ValueError("FAB needs at least one layer")
        self.layers = list(layers)
        self.register_buffer("weights", torch.tensor([float(stats[n].in_numel) for n in layers],
                                                     dtype=torch.float64), persistent=False)
        self.add_state("weighted_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("unweighted_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_images", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, policy, n_images: int = 1) -> None:
        per_layer = _policy_table(policy, len(self.layers)).to(self.weights.device).mean(dim=1)
        w = self.weights
        self.weighted_sum += (per_layer * w).sum() / w.sum() * n_images
        self.unweighted_sum += per_layer.mean() * n_images
        self.n_images += n_images

    def compute(self) -> dict:
        if int(self.n_images) == 0:
            raise ValueError("FAB.compute() before any update: no batch was generated")
        return {"fab": self.weighted_sum / self.n_images, "fab_unweighted": self.unweighted_sum / self.n_images}


class BitOPs(Metric):
    """BitOPs of one UNet call. `w_bits`: {layer: bits} for the policy's
    `layers` (other Conv2d/Linear layers of `stats` run at 32 bits)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, stats: Mapping, layers: Sequence[str], w_bits: Mapping[str, int], **kwargs):
        super().__init__(**kwargs)
        unknown = [n for n in layers if n not in stats]
        if unknown:
            raise ValueError(f"layers {unknown[:3]} have no layer statistics")
        self.layers = list(layers)
        in_policy = set(layers)
        macs = torch.tensor([float(stats[n].macs) for n in layers], dtype=torch.float64)
        wb = torch.tensor([float(w_bits.get(n, 32)) for n in layers], dtype=torch.float64)
        self.register_buffer("macs_x_wbits", macs * wb, persistent=False)
        self.fixed = float(sum(s.macs * 32 * 32 for n, s in stats.items() if n not in in_policy))
        self.add_state("bitops_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_images", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, policy, n_images: int = 1) -> None:
        a_mean = _policy_table(policy, len(self.layers)).to(self.macs_x_wbits.device).mean(dim=1)
        self.bitops_sum += (self.fixed + (self.macs_x_wbits * a_mean).sum()) * n_images
        self.n_images += n_images

    def compute(self) -> torch.Tensor:
        if int(self.n_images) == 0:
            raise ValueError("BitOPs.compute() before any update: no batch was generated")
        return self.bitops_sum / self.n_images
