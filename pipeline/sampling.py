"""Generation with a diffusers pipeline whose UNet may be quantized.

The quantized UNet counts its calls against the scheduler's timesteps
(registered here, `set_schedule`), so the standard pipeline `__call__` and any
diffusers scheduler drive it unchanged.

Seeds: prompt i owns one CPU generator seeded with seeds[i]; it draws the
initial latents and then every per-step noise of a stochastic sampler (DDPM,
Euler ancestral, DDIM with eta > 0, LCM), so a (prompt, seed) gets the same
noise on any device, in any batch, for the FP and every quantized model."""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.quant import call_steps, first_calls, set_schedule


def generate(pipe, prompts: Sequence[str], seeds: Sequence[int] | None = None, steps: int = 20,
             guidance: float = 5.0, batch_size: int = 8, resolution: int | None = None,
             on_step: Callable | None = None, progress: bool = True,
             prompt_embeds: tuple[torch.Tensor, torch.Tensor] | None = None, eta: float = 0.0) -> np.ndarray:
    """Images as uint8 [N, H, W, 3]; prompt i always uses seed seeds[i]. `eta`: DDIM's noise (0: deterministic).

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
        gens = noise_generators(seeds[i:i + batch_size])
        latents = initial_latents(pipe, generators=gens, resolution=side).to(device, unet.dtype)
        kwargs = {"generator": gens, "eta": eta}  # the same generators then draw each step's noise
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


def noise_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per prompt: its initial latents, then its per-step sampler noise."""
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def initial_latents(pipe, seeds: Sequence[int] | None = None, resolution: int | None = None,
                    generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """The per-seed starting noise `generate` uses (drawn on the CPU, first from each seed's
    generator; pass `generators` to keep drawing the per-step noise from them afterwards)."""
    unet = pipe.unet
    side = (resolution or unet.config.sample_size * pipe.vae_scale_factor) // pipe.vae_scale_factor
    shape = (unet.config.in_channels, side, side)
    gens = noise_generators(seeds) if generators is None else generators
    return torch.stack([torch.randn(shape, generator=g) for g in gens])


def check_own_sampler(pipe, what: str) -> None:
    """Refuse, before any work, a pipeline the project's own sampler (`denoise`,
    `encode_prompts`) cannot drive yet: SDXL-style UNets with added conditioning."""
    if getattr(pipe.unet.config, "addition_embed_type", None):
        raise ValueError(f"{what} needs the project's own sampler, which does not yet pass SDXL's added "
                         f"conditioning (pooled text embeddings, time ids); on this model use --method naive "
                         f"(calibrate) and generate")


def denoise(pipe, cond: torch.Tensor, uncond: torch.Tensor, latents: torch.Tensor, steps: int, guidance: float,
            stop: int | None = None, on_unet_input: Callable | None = None, unet=None,
            generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """The pipeline's classifier-free-guidance sampling loop, call by call.

    Runs steps [0, stop) of a `steps`-step schedule and returns the latents
    that enter step `stop` (or the final latents). A step may take several UNet
    calls (PNDM's warm-up, Heun): `on_unet_input(i, x, t)` sees the (scaled,
    conditional-half) input of the first call of each step i. `unet` overrides
    pipe.unet. `generators` (one per row, e.g. the ones `initial_latents` drew
    from) draw a stochastic sampler's per-step noise, so every model consumes
    the same noise. SD 1.x/2.x-style UNets (no added conditioning)."""
    unet = unet or pipe.unet
    check_own_sampler(pipe, "denoise()")
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    if getattr(unet, "quant_config", None) is not None:
        set_schedule(unet, sched.timesteps)
    step_of, firsts = call_steps(sched.timesteps), set(first_calls(sched.timesteps))
    device = cond.device
    x = latents.to(device) * sched.init_noise_sigma
    emb = torch.cat([uncond, cond])
    stop = steps if stop is None else stop
    extra = {"generator": list(generators)} if generators is not None and _takes_generator(sched) else {}
    with torch.no_grad():
        for k, t in enumerate(sched.timesteps):
            i = step_of[k]
            if i >= stop:
                break
            model_in = sched.scale_model_input(torch.cat([x, x]), t)
            if on_unet_input is not None and k in firsts:
                on_unet_input(i, model_in[: len(x)], t)
            eps_u, eps_c = unet(model_in, t, encoder_hidden_states=emb).sample.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
            x = sched.step(eps, t, x, **extra).prev_sample
    return x


def _takes_generator(scheduler) -> bool:
    return "generator" in inspect.signature(scheduler.step).parameters
