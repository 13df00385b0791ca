"""Bit policies: which activation bit option each quantized layer uses at each
sampling step, plus the switches that put a quantized UNet in a mode."""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from pipeline.quant.attention import QuantAttnProcessor
from pipeline.quant.layers import ActQuantBank, QuantLayer


def quant_layers(unet: nn.Module) -> "OrderedDict[str, QuantLayer]":
    """The quantized Conv2d/Linear layers, in module order (the policy's row order)."""
    return OrderedDict((n, m) for n, m in unet.named_modules() if isinstance(m, QuantLayer))


def act_banks(unet: nn.Module) -> "OrderedDict[str, ActQuantBank]":
    return OrderedDict((n, m) for n, m in unet.named_modules() if isinstance(m, ActQuantBank))


def _require_quantized(unet: nn.Module):
    if getattr(unet, "quant_config", None) is None:
        raise ValueError("this UNet is not quantized: call quantize_unet(unet, QuantConfig(...)) first")
    return unet.quant_config


def set_bit_policy(unet: nn.Module, policy) -> None:
    """Set activation bits per layer and per step.

    `policy` is one of:
      - an int: every layer, every step;
      - a mapping {layer name: int | list of n_steps ints}: only the named layers change;
      - a [n_layers, n_steps] tensor/array/list of bits, rows in `quant_layers` order.
    Every value must be one of the config's a_bit_options."""
    cfg = _require_quantized(unet)
    layers = quant_layers(unet)
    T = cfg.n_steps

    def rows(value, where: str) -> list[int]:
        steps = [int(value)] * T if isinstance(value, (int,)) or (torch.is_tensor(value) and value.dim() == 0) \
            else [int(v) for v in value]
        if len(steps) != T:
            raise ValueError(f"{where}: a per-step policy needs {T} entries (n_steps), got {len(steps)}")
        for b in steps:
            if b not in cfg.a_bit_options:
                raise ValueError(f"{where}: {b} bits is not a calibrated option; choose from {cfg.a_bit_options}")
        return steps

    if isinstance(policy, int):
        updates = {n: rows(policy, n) for n in layers}
    elif isinstance(policy, Mapping):
        unknown = [n for n in policy if n not in layers]
        if unknown:
            raise ValueError(f"policy names layers that are not quantized: {unknown[:5]}")
        updates = {n: rows(v, n) for n, v in policy.items()}
    else:
        table = torch.as_tensor(policy)
        if table.dim() != 2 or tuple(table.shape) != (len(layers), T):
            raise ValueError(f"policy of shape {tuple(table.shape)} does not fit: expected "
                             f"[{len(layers)} layers, {T} steps]")
        # Vectorized: QLIP sets a whole table before every batch, and per-value checks cost ms.
        options = torch.tensor(cfg.a_bit_options)  # sorted; every layer's bank holds these
        table = table.to(options.dtype)
        bad = ~torch.isin(table, options)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            rows(table[i].tolist(), list(layers)[i])  # raises, naming the layer and the value
        for layer, index in zip(layers.values(), torch.searchsorted(options, table).tolist()):
            layer.policy = index
        return
    for name, steps in updates.items():
        layer = layers[name]
        layer.policy = [layer.bit_options.index(b) for b in steps]


def set_weight_bits(unet: nn.Module, bits) -> None:
    """Set each layer's weight bits: an int (every layer) or {layer name: bits} (only those layers).

    Every value must be one of the config's w_bit_options (each layer carries one calibrated quantizer
    per option)."""
    cfg = _require_quantized(unet)
    layers = quant_layers(unet)
    updates = {n: bits for n in layers} if isinstance(bits, int) else dict(bits)
    unknown = [n for n in updates if n not in layers]
    if unknown:
        raise ValueError(f"weight bits name layers that are not quantized: {unknown[:5]}")
    for name, b in updates.items():
        if int(b) != b or int(b) not in cfg.w_bit_options:
            raise ValueError(f"{name}: {b}-bit weights is not a calibrated option; choose from {cfg.w_bit_options} "
                             f"(calibrate with --w-bit-options to add options)")
    for name, b in updates.items():
        layer = layers[name]
        layer.w_bits = int(b)
        layer.quant_weight = int(b) < 32


def get_weight_bits(unet: nn.Module) -> "OrderedDict[str, int]":
    """{layer name: weight bits in force}, in `quant_layers` order."""
    _require_quantized(unet)
    return OrderedDict((n, m.w_bits) for n, m in quant_layers(unet).items())


def get_bit_policy(unet: nn.Module) -> torch.Tensor:
    """The [n_layers, n_steps] table of activation bits in force."""
    cfg = _require_quantized(unet)
    rows = []
    for layer in quant_layers(unet).values():
        idx = layer.policy if len(layer.policy) == cfg.n_steps else layer.policy * cfg.n_steps
        rows.append([layer.bit_options[i] for i in idx])
    return torch.tensor(rows, dtype=torch.int16)


def activation_sensitivity(unet: nn.Module, error: Callable[[], float], low: int,
                           high: int) -> "OrderedDict[str, float]":
    """`error()` with one layer's activations at `low` bits and every other layer's at `high`, per layer
    (the policy in force is restored). Independent rounding noise adds in quadrature, so the all-`low`
    error is close to sqrt(e_high^2 + sum_l (e_l^2 - e_high^2)); the ranking says which layers to keep high."""
    saved = get_bit_policy(unet)
    try:
        set_bit_policy(unet, high)
        out = OrderedDict()
        for name in quant_layers(unet):
            set_bit_policy(unet, {name: low})
            out[name] = float(error())
            set_bit_policy(unet, {name: high})
        return out
    finally:
        set_bit_policy(unet, saved)


def layers_to_keep_high(sensitivity: Mapping[str, float], floor: float, target: float) -> list[str]:
    """The fewest layers, most sensitive first, whose activations stay at the high bits so that the
    predicted error falls under `target`: sqrt(floor^2 + sum of the other layers' e_l^2 - floor^2), with
    `sensitivity` from `activation_sensitivity` and `floor` the error with every layer high."""
    added = {n: max(e * e - floor * floor, 0.0) for n, e in sensitivity.items()}
    ranked = sorted(added, key=added.get, reverse=True)
    rest = sum(added.values())
    for k, name in enumerate(ranked):
        if floor ** 2 + rest < target ** 2:
            return ranked[:k]
        rest -= added[name]
    return ranked


def call_steps(timesteps: Sequence) -> list[int]:
    """The step index of each UNet call of a sampling run, one call per scheduler timestep.

    A step is a noise level: a call at the same timestep as the call before it
    belongs to the same step. So PNDM's PLMS warm-up (its second call repeats the
    first step's successor timestep: 7 calls for 6 steps) and Heun's
    second-order evaluations (2N-1 calls for N steps) map onto N steps, and
    every call at one noise level uses that step's quantizers and bits."""
    steps, prev = [], None
    for t in (float(t) for t in timesteps):
        steps.append(steps[-1] + (t != prev) if steps else 0)
        prev = t
    return steps


def first_calls(timesteps: Sequence) -> list[int]:
    """Per step, the index of its first UNet call (whose input and timestep stand for the step)."""
    mapping = call_steps(timesteps)
    return [k for k, s in enumerate(mapping) if k == 0 or mapping[k - 1] != s]


def set_schedule(unet: nn.Module, timesteps: Sequence) -> None:
    """Register the sampler's timesteps (after `scheduler.set_timesteps`): the UNet's
    calls are then counted and call k runs as step `call_steps(timesteps)[k]`; the
    count wraps after a whole run, so one registration serves many runs."""
    cfg = _require_quantized(unet)
    ts = [float(t) for t in timesteps]
    mapping = call_steps(ts)
    n = mapping[-1] + 1 if mapping else 0
    if cfg.n_steps > 1 and n != cfg.n_steps:
        raise ValueError(f"the schedule has {n} steps ({len(ts)} UNet calls) but the quantized UNet was "
                         f"calibrated for {cfg.n_steps}; sample with --steps {cfg.n_steps}")
    ctx = unet.quant_context
    ctx.timesteps, ctx.call_steps, ctx.calls, ctx.step = ts, mapping, 0, 0


def set_step(unet: nn.Module, step: int) -> None:
    _require_quantized(unet)
    unet.quant_context.timesteps = []  # explicit steps override the schedule's call counter
    unet.quant_context.step = int(step)


def set_quant_state(unet: nn.Module, weight: bool = True, act: bool = True) -> None:
    """Switch weight and activation quantization on or off everywhere."""
    for m in unet.modules():
        if isinstance(m, QuantLayer):
            m.quant_weight = weight and m.w_bits < 32
            m.quant_act = act
        elif isinstance(m, QuantAttnProcessor):
            m.enabled = act


@contextmanager
def bit_mixture(unet: nn.Module, weights: torch.Tensor, options: Sequence[int]):
    """Relaxed, per-sample bit choice (Q2B training), in force inside the context.

    `weights` is [n_layers, batch, len(options)] (rows in `quant_layers` order,
    one row per sample of the UNet call, i.e. both CFG halves): each layer's
    input becomes sum_k weights[l, b, k] * Q_options[k](x_b), and q/k/v follow
    their projection. Straight-through one-hot weights give exactly the hard
    choice in the forward pass and gradients for every option in the backward."""
    cfg = _require_quantized(unet)
    layers = quant_layers(unet)
    missing = [b for b in options if b not in cfg.a_bit_options]
    if missing:
        raise ValueError(f"bit options {missing} have no calibrated quantizer; the state has {cfg.a_bit_options}")
    if weights.dim() != 3 or weights.shape[0] != len(layers) or weights.shape[2] != len(options):
        raise ValueError(f"bit mixture of shape {tuple(weights.shape)} does not fit: expected "
                         f"[{len(layers)} layers, batch, {len(options)} options]")
    indices = [cfg.a_bit_options.index(b) for b in options]
    try:
        for i, layer in enumerate(layers.values()):
            layer.mixture = (indices, weights[i])
        yield
    finally:
        for layer in layers.values():
            layer.mixture = None


@contextmanager
def observing(unet: nn.Module):
    """Record activation statistics (full-precision forward) for calibration."""
    banks = act_banks(unet)
    for b in banks.values():
        b.observing = True
    try:
        yield banks
    finally:
        for b in banks.values():
            b.observing = False
