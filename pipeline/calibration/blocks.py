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


def unit_layers(unit: nn.Module) -> list[QuantLayer]:
    return [m for m in unit.modules() if isinstance(m, QuantLayer)]


def unit_banks(unit: nn.Module) -> list[ActQuantBank]:
    return [m for m in unit.modules() if isinstance(m, ActQuantBank)]


class BlockIO:
    """Capture a unit's inputs (args and kwargs) and output during UNet calls.

    Items go to `sink` (anything with `append`, e.g. a `pipeline.shards.ItemStore`; default a list)."""

    def __init__(self, unit: nn.Module, sink=None):
        self.unit = unit
        self.items = [] if sink is None else sink
        self._step = 0

    def __enter__(self):
        def pre(module, args, kwargs):
            self._pending = (tuple(a.detach() if torch.is_tensor(a) else a for a in args),
                             {k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()})

        def post(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            self.items.append({"args": self._pending[0], "kwargs": self._pending[1], "out": out.detach(),
                               "step": self._step})

        self._h = [self.unit.register_forward_pre_hook(pre, with_kwargs=True),
                   self.unit.register_forward_hook(post, with_kwargs=True)]
        return self

    def set_step(self, step: int) -> None:
        self._step = step

    def __exit__(self, *exc):
        for h in self._h:
            h.remove()


def set_unit_act(unit: nn.Module, on: bool) -> None:
    for m in unit.modules():
        if isinstance(m, QuantLayer):
            m.quant_act = on
        elif isinstance(m, QuantAttnProcessor):
            m.enabled = on
