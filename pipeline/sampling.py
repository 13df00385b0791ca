"""Generation with a diffusers pipeline whose UNet may be quantized.

The quantized UNet learns its step index from the scheduler's timesteps
(registered here), so the standard pipeline `__call__` drives it unchanged."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.quant import set_schedule


def generate(pipe, prompts: Sequence[str], seeds: Sequence[int] | None = None, steps: int = 20,
             guidance: float = 5.0, batch_size: int = 8, resolution: int | None = None,
             on_step: Callable | None = None, progress: bool = True,
             prompt_embeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> np.ndarray:
    """Images as uint8 [N, H, W, 3]; prompt i always uses seed seeds[i].

    `prompt_embeds` = (cond, uncond) rows of the prompts, already encoded (e.g. by
    `encode_prompts_pooled`): the pipeline then skips its own text-encoder pass."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to generate: the prompt list is empty")
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if prompt_embeds is not None and not len(prompt_embeds[0]) == len(prompt_embeds[1]) == len(prompts):
        raise ValueError(f"prompt_embeds hold {len(prompt_embeds[0])} / {len(prompt_embeds[1])} rows for "
                         f"{len(prompts)} prompts; encode exactly these prompts")
    unet = pipe.unet
    quantized = getattr(unet, "quant_config", None) is not None
    if quantized:

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
        if prompt_embeds is not None:
            kwargs["prompt_embeds"] = prompt_embeds[0][i:i + batch_size]
            kwargs["negative_prompt_embeds"] = prompt_embeds[1][i:i + batch_size]
        with torch.no_grad():
            images = pipe(None if prompt_embeds is not None else chunk, num_inference_steps=steps,
                          guidance_scale=guidance, latents=latents, height=side, width=side, output_type="np",
                          **kwargs).images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def encode_prompts(pipe, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditional, unconditional) text embeddings, as the pipeline computes them."""
    device = pipe.unet.device if pipe.unet.device.type != "meta" else "cpu"
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(list(prompts), device, 1, True, negative_prompt=None)
    return cond, uncond


def encode_prompts_pooled(pipe, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(conditional, unconditional, pooled) from one text-encoder pass over the prompts: the
    pipeline's embeddings plus the pooled output (final-LN EOS state) that T2Q reads, so QLIP's
    quality prediction needs no CLIP pass of its own. SD 1.x/2.x-style pipelines (one text encoder)."""
    device = pipe.unet.device if pipe.unet.device.type != "meta" else "cpu"
    tok, enc = pipe.tokenizer, pipe.text_encoder
    text = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt")
    mask = text.attention_mask.to(device) if getattr(enc.config, "use_attention_mask", False) else None
    with torch.no_grad():
        out = enc(text.input_ids.to(device), attention_mask=mask)
        cond, uncond = pipe.encode_prompt(None, device, 1, True, prompt_embeds=out.last_hidden_state)
    return cond, uncond, out.pooler_output


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
