"""A closed-form starting point for AdaRound: GPTQ-style rounding (Frantar et al., 2023; OBQ's greedy
column-by-column solution) restricted to AdaRound's two choices per weight, floor or ceil of w / s.

Per layer, with H = E[x x^T] over the unit's calibration inputs (a conv's unfolded patches), the columns
are rounded one at a time (largest diag(H) first, GPTQ's act-order) and the rounding error of each is
compensated on the columns not yet rounded, through the Cholesky factor of H^-1. The result is
  * `round_up`: GPTQ's decisions (a hard start that is usually much closer to the optimum than nearest), and
  * the compensated weights, which `start_learning_rounding(weight, start=...)` turns into AdaRound's soft
    start: h(alpha) = their position between floor and ceil, so the soft and the hard start agree with GPTQ.
AdaRound then needs far fewer iterations to reach a given held-out error (docs/calibration.md,
benchmarks/calibration_speed.py). The quantizer's grid (scale, zero point) is left as it is."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.calibration.blocks import unit_layers
from pipeline.quant.layers import QuantLayer

ADAROUND_INITS = ("fp", "gptq")  # fp: AdaRound's own start (soft = the FP weights, hard = nearest)


def check_adaround_init(value: str) -> str:
    if value not in ADAROUND_INITS:
        raise ValueError(f"--adaround-init {value!r}: use one of {ADAROUND_INITS}")
    return value


def layer_rows(layer: QuantLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as the rows its weight multiplies: (n, in_features * kernel) for a conv's unfolded
    patches, (n, in_features) for a linear layer."""
    if layer.kind == "conv":
        kw = layer.conv_kwargs
        if kw["groups"] != 1:
            raise ValueError(f"GPTQ start: grouped convolutions (groups={kw['groups']}) are not supported; "
                             f"use --adaround-init fp")
        cols = F.unfold(x, layer.weight.shape[2:], dilation=kw["dilation"], padding=kw["padding"],
                        stride=kw["stride"])  # (B, C*k*k, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def input_hessians(unit, ctx, items: Sequence[dict]) -> dict[QuantLayer, torch.Tensor]:
    """H = mean over rows of x x^T of every QuantLayer's input in `unit`, over one full-precision pass of
    the unit on `items` (inputs as the FP unit sees them); under DDP, over every rank's items (so that every
    rank computes the same start)."""
    layers = unit_layers(unit)
    sums: dict[QuantLayer, list] = {}

    def hook(layer, args):
        rows = layer_rows(layer, args[0].detach()).double()
        acc = sums.setdefault(layer, [0, 0])
        acc[0] = acc[0] + rows.T @ rows
        acc[1] += rows.shape[0]

    saved = [(layer.quant_weight, layer.quant_act) for layer in layers]
    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    try:
        for layer in layers:
            layer.quant_weight = layer.quant_act = False
        for it in items:
            ctx.step = int(it["step"])
            unit(*it["args"], **it["kwargs"])
    finally:
        for h in handles:
            h.remove()
        for layer, (w, a) in zip(layers, saved):
            layer.quant_weight, layer.quant_act = w, a
    if dist.is_available() and dist.is_initialized():  # under DDP each rank saw its own share of the items
        for layer in layers:
            width = layer.weight[0].numel()  # a rank without items for this layer still takes part
            acc = sums.setdefault(layer, [torch.zeros(width, width, dtype=torch.float64), 0])
            total = torch.as_tensor(acc[0], dtype=torch.float64, device=layer.weight.device)
            count = torch.tensor([float(acc[1])], dtype=torch.float64, device=layer.weight.device)
            dist.all_reduce(total)
            dist.all_reduce(count)
            acc[0], acc[1] = total, float(count)
    return {layer: s / n for layer, (s, n) in sums.items() if n}



@torch.no_grad()
def gptq_round(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, n_bits: int,
               hessian: torch.Tensor, damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """Compensated weights (same shape as `weight`) whose rounding, each within [floor(w/s), floor(w/s) + 1]
    of the ORIGINAL weight, is GPTQ's. `hessian`: (in, in) over the flattened input dimension; `damp` adds
    damp * mean(diag H) to the diagonal (GPTQ's dampening, which keeps H^-1's Cholesky factor well defined).
    Columns go largest diag(H) first (act-order); `block` columns are updated lazily at a time (same result)."""
    shape = weight.shape
    w = weight.detach().reshape(shape[0], -1).double().clone()
    s = scale.reshape(-1, 1).double()
    z = zero_point.reshape(-1, 1).double()
    qmax = 2**n_bits - 1
    H = hessian.double().clone()
    if H.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"Hessian of shape {tuple(H.shape)} does not fit a weight of {w.shape[1]} input columns")
    dead = torch.diag(H) == 0  # inputs that never fire: nothing to compensate through them
    H[dead, dead] = 1
    order = torch.argsort(torch.diag(H), descending=True)
    inverse = torch.argsort(order)
    w, H = w[:, order], H[order][:, order]
    floor = torch.floor(w / s)
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    # upper Cholesky factor of H^-1: row j holds the compensation of column j onto columns > j
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    start = torch.empty_like(w)
    n = w.shape[1]
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        wb, err = w[:, i0:i1].clone(), torch.zeros(w.shape[0], i1 - i0, dtype=w.dtype, device=w.device)
        for j in range(i1 - i0):
            col = wb[:, j:j + 1]
            start[:, i0 + j] = col[:, 0]
            lo = floor[:, i0 + j:i0 + j + 1]
            q_int = torch.clamp(torch.round(col / s), lo, lo + 1)  # AdaRound's choices only
            q = (torch.clamp(q_int + z, 0, qmax) - z) * s  # what the quantizer's forward makes of it
            e = (col - q) / U[i0 + j, i0 + j]
            wb[:, j:] -= e @ U[i0 + j:i0 + j + 1, i0 + j:i1]
            err[:, j:j + 1] = e
        w[:, i1:] -= err @ U[i0:i1, i1:]
    return start[:, inverse].reshape(shape).to(weight.dtype)


def gptq_starts(unit, ctx, items: Sequence[dict], damp: float = 0.01) -> dict[QuantLayer, torch.Tensor]:
    """The GPTQ start (compensated weights) of every weight-quantized layer of `unit`, from `items`."""
    hessians = input_hessians(unit, ctx, items)
    out = {}
    for layer, H in hessians.items():
        wq = layer.wq
        if not layer.quant_weight or wq.n_bits >= 32 or wq.split:  # a split layer's two grids: AdaRound's own start
            continue
        out[layer] = gptq_round(layer.weight, wq.scale, wq.zero_point, wq.n_bits, H.to(layer.weight.device), damp)
    return out
