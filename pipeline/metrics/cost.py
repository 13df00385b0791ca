"""Cost accounting, defined once (docs/evaluation.md): BitOPs, FAB and model
size from layer shapes traced on the meta device (exact MACs of every
Conv2d/Linear at no memory cost), and the same as torchmetrics Metrics fed
with the bit policy in force for each generated prompt batch.

  BitOPs = MACs x weight bits x activation bits summed over all Conv2d/Linear
          layers of one UNet call (classifier-free-guidance batch of 2),
          averaged over sampling steps; layers outside the policy run 32/32.
  FAB   = mean activation bits over quantized layers and sampling steps,
          weighted by each layer's input-activation size (and unweighted).

A static quantized model has one policy; a text-aware one (QLIP) sets a new
policy per prompt batch. Each Metric `update(policy, n_images)` adds the
batch's value weighted by its image count, so `compute()` is the mean over
images. States are sums with dist_reduce_fx="sum": processes merge exactly."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn
from torchmetrics import Metric

from pipeline.models import unet_example_inputs
from pipeline.quant.layers import QuantLayer
from pipeline.quant.policy import get_bit_policy, quant_layers
from pipeline.quant.quantizer import check_bits


@dataclass(frozen=True)
class LayerStat:
    kind: str  # conv | linear
    macs: int  # multiply-accumulates in one call of the given batch
    in_numel: int  # input activation elements in one call
    weight_numel: int


def layer_stats(unet: nn.Module, batch: int = 2, resolution: int | None = None,
                tokens: int = 77) -> "OrderedDict[str, LayerStat]":
    """Per-layer MACs and input sizes of one UNet call (pixels `resolution`,
    default the model's native size), traced on a meta-device twin."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        twin = UNet2DConditionModel.from_config(unet.config)
    stats: "OrderedDict[str, LayerStat]" = OrderedDict()

    def hook(name):
        def record(m, inputs, output):
            x = inputs[0]
            if isinstance(m, nn.Conv2d):
                macs = output.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
                stats[name] = LayerStat("conv", macs, x.numel(), m.weight.numel())
            else:
                stats[name] = LayerStat("linear", output.numel() * m.in_features, x.numel(), m.weight.numel())
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in twin.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    args, kwargs = unet_example_inputs(twin, batch=batch, resolution=resolution, tokens=tokens)
    with torch.no_grad():
        twin(*args, **kwargs)
    for h in handles:
        h.remove()
    missing = [n for n, m in twin.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in stats]
    if missing:  # e.g. class-embedding layers unused by this call: they cost nothing
        for n in missing:
            m = twin.get_submodule(n)
            stats[n] = LayerStat("conv" if isinstance(m, nn.Conv2d) else "linear", 0, 0, m.weight.numel())
    return stats


def _per_layer(value, names, what):
    if isinstance(value, (int, float)):
        return {n: float(value) for n in names}
    unknown = set(value) - set(names)
    if unknown:
        raise ValueError(f"{what} names unknown layers: {sorted(unknown)[:3]}")
    return {n: float(value.get(n, 32)) for n in names}


def bitops(stats, w_bits=32, a_bits=32) -> float:
    """BitOPs of one call. `w_bits`/`a_bits`: an int for every layer, or a dict
    {layer: bits} (layers not named run at 32); an a_bits value may be a
    per-step list, in which case the call is averaged over steps."""
    names = list(stats)
    wb = _per_layer(w_bits, names, "w_bits")
    if isinstance(a_bits, dict):
        ab = {n: (sum(v) / len(v) if isinstance(v, (list, tuple)) else float(v)) for n, v in a_bits.items()}
        ab = _per_layer(ab, names, "a_bits")
    else:
        ab = _per_layer(a_bits, names, "a_bits")
    return float(sum(s.macs * wb[n] * ab[n] for n, s in stats.items()))


def fab_weights(stats, layers: list[str]) -> torch.Tensor:
    """FAB's layer weights: each layer's input-activation size (float64)."""
    return torch.tensor([stats[n].in_numel for n in layers], dtype=torch.float64)


def weighted_fab(bits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """FAB of bit tables [..., n_layers, n_steps]: hard bits or expected bits
    (Q2B's relaxed decisions), batched over leading dims and differentiable."""
    w = weights.to(bits.dtype)
    return (bits.mean(dim=-1) * w).sum(dim=-1) / w.sum()


def fab(stats, policy: torch.Tensor, layers: list[str]) -> dict:
    """FAB of a [n_layers, n_steps] bit table whose rows are `layers`:
    input-size-weighted and unweighted means over layers and steps."""
    policy = torch.as_tensor(policy, dtype=torch.float64)
    if policy.dim() != 2 or policy.shape[0] != len(layers):
        raise ValueError(f"policy of shape {tuple(policy.shape)} does not match {len(layers)} layers")
    return {"fab": float(weighted_fab(policy, fab_weights(stats, layers))),
            "fab_unweighted": float(policy.mean(dim=1).mean())}


def model_size_bytes(unet: nn.Module) -> int:
    """Storage of the UNet with quantized weights at their bits (plus one fp32
    scale and zero point per channel) and everything else at its dtype size."""

    total, counted = 0.0, set()
    for m in unet.modules():
        if isinstance(m, QuantLayer):
            bits = m.w_bits
            total += m.weight.numel() * bits / 8 + (0 if bits == 32 else 2 * 4 * m.weight.shape[0])
            counted.add(id(m.weight))
    for p in unet.parameters():
        if id(p) not in counted:
            total += p.numel() * p.element_size()
    return int(total)


def quantized_summary(unet: nn.Module, stats=None) -> dict:
    """BitOPs (T), FAB and size of a quantized UNet under its current policy."""

    stats = stats or layer_stats(unet)
    layers = quant_layers(unet)
    policy = get_bit_policy(unet)
    w_bits = {n: m.w_bits for n, m in layers.items()}
    a_bits = {n: policy[i].tolist() for i, n in enumerate(layers)}
    return {
        "bitops_T": bitops(stats, w_bits, a_bits) / 1e12,
        **fab(stats, policy, list(layers)),
        "avg_w_bits": average_weight_bits(stats, w_bits),
        "size_bytes": model_size_bytes(unet),
    }


def average_weight_bits(stats, w_bits: Mapping[str, int]) -> float:
    """Mean weight bits over the named layers, weighted by each layer's weight count (MixDQ's size budget)."""
    n = sum(stats[k].weight_numel for k in w_bits)
    return float(sum(stats[k].weight_numel * b for k, b in w_bits.items()) / max(n, 1))


def bitops_table(unets: Mapping[str, nn.Module], resolution: int | None, bits: Sequence[str]) -> list[dict]:
    """Per UNet: layers, GMACs per image and BitOPs (T) of one CFG call at each "W/A" pair of `bits`."""
    pairs = []
    for pair in bits:
        try:
            w, a = (int(v) for v in pair.split("/"))
        except ValueError:
            raise ValueError(f"--bits {pair!r} must be W/A pairs such as 8/8 or 4/16") from None
        pairs.append((check_bits(w, f"--bits {pair!r}: the weight bits"), check_bits(a, f"--bits {pair!r}: the "
                                                                                           f"activation bits")))
    rows = []
    for name, unet in unets.items():
        res = resolution or unet.config.sample_size * 8
        stats = layer_stats(unet, batch=2, resolution=res)
        row = {"model": name, "resolution": res, "layers": len(stats),
               "GMACs_per_image": sum(s.macs for s in stats.values()) / 2 / 1e9}
        for w, a in pairs:
            row[f"W{w}A{a}"] = bitops(stats, w, a) / 1e12
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table of equal-keyed rows (floats to 2 decimals)."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return "\n".join(lines)


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
    layer_stats of the UNet (input sizes are the FAB weights)."""

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
