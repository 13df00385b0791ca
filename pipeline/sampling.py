"""Generation with a diffusers pipeline whose UNet may be quantized.

The quantized UNet learns its step index from the scheduler's timesteps
(registered here), so the standard pipeline `__call__` drives it unchanged."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm


def generate(pipe, prompts: Sequence[str], seeds: Sequence[int] | None = None, steps: int = 20,
             guidance: float = 5.0, batch_size: int = 8, resolution: int | None = None,
             on_step: Callable | None = None, progress: bool = True) -> np.ndarray:
    """Images as uint8 [N, H, W, 3]; prompt i always uses seed seeds[i]."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to generate: the prompt list is empty")
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    unet = pipe.unet
    quantized = getattr(unet, "quant_config", None) is not None
    if quantized:
        from pipeline.quant import set_schedule

        pipe.scheduler.set_timesteps(steps)
        set_schedule(unet, pipe.scheduler.timesteps)
    side = resolution or unet.config.sample_size * pipe.vae_scale_factor
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress, leave=False):
        chunk = prompts[i:i + batch_size]
        device = unet.device if unet.device.type != "meta" else "cpu"
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        # draw initial latents per prompt on the CPU so a seed gives the same image on any device
        shape = (unet.config.in_channels, side // pipe.vae_scale_factor, side // pipe.vae_scale_factor)
        latents = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device, unet.dtype)
        kwargs = {}
        if on_step is not None:
            kwargs["callback_on_step_end"] = on_step
        with torch.no_grad():
            images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, latents=latents,
                          height=side, width=side, output_type="np", **kwargs).images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)
