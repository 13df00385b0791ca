"""`quantize_unet(unet, config)`: swap every Conv2d/Linear of a diffusers UNet
for a QuantLayer and every attention processor for a QuantAttnProcessor.

In the spirit of torchao's `quantize_`: a config object, a module filter,
in-place swap, no global state (the per-model QuantContext hangs off the UNet)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pipeline.quant.attention import QuantAttnProcessor
from pipeline.quant.config import QuantConfig
from pipeline.quant.layers import QuantContext, QuantLayer

QUANTIZABLE = (nn.Conv2d, nn.Linear)


def default_filter(module: nn.Module, name: str) -> bool:
    return isinstance(module, QUANTIZABLE)


def skip_concat_splits(unet: nn.Module) -> dict[str, int]:
    """Split points of the decoder layers that read cat([h, skip], dim=1) raw.

    In every diffusers up block, resnet j receives cat(hidden, skip) where
    `hidden` has the channels of the previous resnet's output (the mid block's,
    i.e. block_out_channels[-1], for the first). Only the 1x1 shortcut conv
    reads that concatenation unnormalized; conv1 sees it after GroupNorm+SiLU."""
    splits = {}
    if not hasattr(unet, "up_blocks"):
        return splits
    hidden = unet.config.block_out_channels[-1]
    for i, block in enumerate(unet.up_blocks):
        for j, resnet in enumerate(getattr(block, "resnets", [])):
            shortcut = getattr(resnet, "conv_shortcut", None)
            if shortcut is not None and 0 < hidden < resnet.in_channels:
                splits[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = hidden
            hidden = resnet.out_channels
    return splits


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def _step_pre_hook(module, args, kwargs):
    """Count the UNet's calls: call k of the registered schedule runs as its step index.

    The timestep argument is only checked against the one the schedule expects
    for this call, so repeated timesteps (PNDM, Heun) and float timesteps
    (Euler, DPM-Solver) need no lookup; a mismatch means the run and the
    registration disagree (another step count, or an interrupted run)."""
    ctx: QuantContext = module.quant_context
    if not ctx.timesteps:
        return None
    k = ctx.calls % len(ctx.timesteps)
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is not None:
        t = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
        if t != ctx.timesteps[k]:
            if k != 0 and t == ctx.timesteps[0]:  # a new run after an interrupted one
                k = ctx.calls = 0
            else:
                raise ValueError(f"UNet call {k} of the registered schedule expects timestep {ctx.timesteps[k]}, "
                                 f"got {t}; call set_schedule(unet, scheduler.timesteps) after "
                                 f"scheduler.set_timesteps with the steps this run uses")
    ctx.step = ctx.call_steps[k]
    ctx.calls += 1
    return None


def quantize_unet(unet: nn.Module, config: QuantConfig,
                  filter_fn: Callable[[nn.Module, str], bool] | None = None,
                  only: list[str] | None = None, init_weights: bool = True) -> nn.Module:
    """Quantize `unet` in place and return it.

    filter_fn(module, name) picks layers (default: every Conv2d/Linear not in
    config.exclude); `only` lists module names to quantize explicitly, and an
    entry that is not a Conv2d/Linear is an error. `init_weights=False` skips
    the weight-range initialization (the state is about to be loaded)."""
    if getattr(unet, "quant_config", None) is not None:
        raise ValueError("this UNet is already quantized; quantize a fresh copy")
    filter_fn = filter_fn or default_filter
    modules = dict(unet.named_modules())
    if only is not None:
        for name in only:
            if name not in modules:
                raise ValueError(f"layer {name!r} does not exist in this UNet")
            if not isinstance(modules[name], QUANTIZABLE):
                raise TypeError(f"layer {name!r} is a {type(modules[name]).__name__}; "
                                f"only Conv2d and Linear layers can be quantized")
    ctx = QuantContext()
    splits = skip_concat_splits(unet) if config.split_shortcut else {}
    for name, module in list(modules.items()):
        if not isinstance(module, QUANTIZABLE) or name in config.exclude:
            continue
        if (only is not None and name not in only) or (only is None and not filter_fn(module, name)):
            continue
        _set_module(unet, name, QuantLayer(module, config, ctx, split=splits.get(name, 0), init=init_weights))
    if config.quant_attention:
        from diffusers.models.attention_processor import Attention

        for module in unet.modules():
            if isinstance(module, Attention):
                # its banks go where the attention's weights are (the UNet may already be on its device)
                module.set_processor(QuantAttnProcessor(config, ctx).to(module.to_q.weight.device))
    unet.quant_config = config
    unet.quant_context = ctx
    unet.register_forward_pre_hook(_step_pre_hook, with_kwargs=True)
    return unet
