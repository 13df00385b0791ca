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


def encode_prompts(pipe, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditional, unconditional) text embeddings, as the pipeline computes them."""
    device = pipe.unet.device if pipe.unet.device.type != "meta" else "cpu"
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(list(prompts), device, 1, True, negative_prompt=None)
    return cond, uncond


def initial_latents(pipe, seeds: Sequence[int], resolution: int | None = None) -> torch.Tensor:
    """The per-seed starting noise `generate` uses (drawn on the CPU)."""
    unet = pipe.unet
    side = (resolution or unet.config.sample_size * pipe.vae_scale_factor) // pipe.vae_scale_factor
    shape = (unet.config.in_channels, side, side)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def denoise(pipe, cond: torch.Tensor, uncond: torch.Tensor, latents: torch.Tensor, steps: int, guidance: float,
            stop: int | None = None, on_unet_input: Callable | None = None, unet=None) -> torch.Tensor:
    """The pipeline's classifier-free-guidance sampling loop, step by step.

    Runs steps [0, stop) of a `steps`-step schedule and returns the latents
    that enter step `stop` (or the final latents). `on_unet_input(i, x, t)` sees
    each step's (scaled, conditional-half) UNet input before it runs; `unet`
    overrides pipe.unet. SD 1.x/2.x-style UNets (no added conditioning)."""
    unet = unet or pipe.unet
    if getattr(unet.config, "addition_embed_type", None):
        raise NotImplementedError("denoise() drives SD 1.x/2.x UNets; SDXL's added conditioning is not wired in")
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    if getattr(unet, "quant_config", None) is not None:
        from pipeline.quant import set_schedule

        set_schedule(unet, sched.timesteps)
    device = cond.device
    x = latents.to(device) * sched.init_noise_sigma
    emb = torch.cat([uncond, cond])
    stop = steps if stop is None else stop
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps[:stop]):
            model_in = sched.scale_model_input(torch.cat([x, x]), t)
            if on_unet_input is not None:
                on_unet_input(i, model_in[: len(x)], t)
            eps_u, eps_c = unet(model_in, t, encoder_hidden_states=emb).sample.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
            x = sched.step(eps, t, x).prev_sample
    return x
