"""Reconstruction units of a diffusers UNet (BRECQ/Q-Diffusion granularity):
ResnetBlock2D, BasicTransformerBlock, and every quantized layer outside them
(conv_in, time embedding, proj_in/out, down/up-sampler convs, conv_out)."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from pipeline.quant.attention import QuantAttnProcessor
from pipeline.quant.layers import ActQuantBank, QuantLayer


def block_types():
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    return (ResnetBlock2D, BasicTransformerBlock)


def reconstruction_units(unet: nn.Module) -> "OrderedDict[str, nn.Module]":
    """Blocks and lone quantized layers, in module order; every QuantLayer is in exactly one unit."""
    blocks = block_types()
    units: "OrderedDict[str, nn.Module]" = OrderedDict()
    inside: set[str] = set()
    for name, m in unet.named_modules():
        if any(name.startswith(b + ".") for b in inside):
            continue
        if isinstance(m, blocks):
            units[name] = m
            inside.add(name)
        elif isinstance(m, QuantLayer):
            units[name] = m
    return units


def in_call_order(units: "OrderedDict[str, nn.Module]", run) -> "OrderedDict[str, nn.Module]":
    """`units` in the order one UNet call (`run()`) first reaches them; units it never reaches stay at the end.

    Module order is not call order in a diffusers UNet: `up_blocks` is registered before `mid_block`, and a
    cross-attention block registers its attentions before the resnets that run first. Reconstruction on
    quantized inputs must follow the call: a unit's upstream is what runs before it."""
    seen: list[str] = []
    hooks = [unit.register_forward_pre_hook(lambda module, args, name=name: seen.append(name) if name not in seen
                                            else None) for name, unit in units.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return OrderedDict((n, units[n]) for n in seen + [n for n in units if n not in seen])


def unit_layers(unit: nn.Module) -> list[QuantLayer]:
    return [m for m in unit.modules() if isinstance(m, QuantLayer)]


def unit_banks(unit: nn.Module) -> list[ActQuantBank]:
    return [m for m in unit.modules() if isinstance(m, ActQuantBank)]


class _Stop(Exception):
    """Raised by a probe's hook: the rest of the UNet call is not needed."""


class UnitProbe:
    """Runs a UNet call only as far as `unit` and returns what it saw there: its inputs (args and kwargs)
    and, unless `inputs_only`, its output. The rest of the call is skipped (the later layers' work is not
    needed to capture an earlier unit)."""

    def __init__(self, unit: nn.Module):
        self.unit = unit

    def __call__(self, run, inputs_only: bool = False) -> dict:
        seen = {}

        def pre(module, args, kwargs):
            seen["args"] = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
            seen["kwargs"] = {k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()}
            if inputs_only:
                raise _Stop

        def post(module, args, kwargs, output):
            seen["out"] = (output[0] if isinstance(output, tuple) else output).detach()
            raise _Stop

        hooks = [self.unit.register_forward_pre_hook(pre, with_kwargs=True),
                 self.unit.register_forward_hook(post, with_kwargs=True)]
        try:
            run()
        except _Stop:
            pass
        finally:
            for h in hooks:
                h.remove()
        if "args" not in seen:
            raise RuntimeError("the UNet call never reached the unit being captured")
        return seen


def set_units_quantized(units, act: bool = True) -> None:
    """Weights (and, with `act`, activations) of `units` quantized, as they will run (the rest as they are)."""
    for unit in units:
        for layer in unit_layers(unit):
            layer.quant_weight = layer.w_bits < 32
        set_unit_act(unit, act)


def set_unit_act(unit: nn.Module, on: bool) -> None:
    for m in unit.modules():
        if isinstance(m, QuantLayer):
            m.quant_act = on
        elif isinstance(m, QuantAttnProcessor):
            m.enabled = on
