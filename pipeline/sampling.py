"""Generation with a diffusers pipeline whose UNet may be quantized.

The quantized UNet counts its calls against the scheduler's timesteps
(registered here, `set_schedule`), so the standard pipeline `__call__` and any
diffusers scheduler drive it unchanged.

Seeds: prompt i owns one CPU generator seeded with seeds[i]; it draws the
initial latents and then every per-step noise of a stochastic sampler (DDPM,
Euler ancestral, DDIM with eta > 0, LCM), so a (prompt, seed) gets the same
noise on any device, in any batch, for the FP and every quantized model."""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.models import is_sdxl
from pipeline.quant import call_steps, first_calls, set_schedule, set_step


@dataclass
class Conditioning:
    """The text conditioning of N prompts, for CFG UNet calls on the batch [uncond; cond].

    SD 1.x/2.x: the text encoder's hidden states. SDXL adds, per row, the second
    encoder's projected pooled embedding (`text_embeds`) and six time ids
    (original size, crop corner, target size). `pooled` is what T2Q reads: the
    pooled (final-LN EOS) state of the text encoder that carries the pooled
    embedding, before any projection (SD: text_encoder; SDXL: text_encoder_2)."""

    cond: torch.Tensor
    uncond: torch.Tensor
    pooled: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    uncond_text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.cond)

    @property
    def is_sdxl(self) -> bool:
        return self.text_embeds is not None

    def unet_kwargs(self) -> dict:
        """The CFG UNet call's text arguments, rows [uncond; cond]."""
        kw = {"encoder_hidden_states": torch.cat([self.uncond, self.cond])}
        if self.is_sdxl:
            kw["added_cond_kwargs"] = {"text_embeds": torch.cat([self.uncond_text_embeds, self.text_embeds]),
                                       "time_ids": torch.cat([self.time_ids, self.time_ids])}
        return kw

    def pipeline_kwargs(self) -> dict:
        """The same embeddings as the pipeline `__call__`'s precomputed-embedding arguments."""
        kw = {"prompt_embeds": self.cond, "negative_prompt_embeds": self.uncond}
        if self.is_sdxl:  # the pipeline derives the same time ids from height/width
            kw.update(pooled_prompt_embeds=self.text_embeds, negative_pooled_prompt_embeds=self.uncond_text_embeds)
        return kw

    def tensors(self) -> dict[str, torch.Tensor]:
        """For a safetensors shard (fp32 also after an autocast pass, CPU, contiguous; absent parts left out)."""
        return {k: v.detach().float().contiguous().cpu() for k, v in vars(self).items() if v is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "Conditioning":
        return cls(**{k: tensors.get(k) for k in ("cond", "uncond", "pooled", "text_embeds", "uncond_text_embeds",
                                                  "time_ids")})

    def rows(self, rows: slice) -> "Conditioning":
        return Conditioning(**{k: None if v is None else v[rows] for k, v in vars(self).items()})

    def to(self, device) -> "Conditioning":
        return Conditioning(**{k: None if v is None else v.to(device) for k, v in vars(self).items()})


def unet_call(sample: torch.Tensor, t, text: Conditioning, device="cpu") -> dict:
    """The keyword arguments of one CFG UNet call, `unet(**unet_call(...))`, on `device`."""
    t = t.to(device) if torch.is_tensor(t) else torch.tensor(t, device=device)
    return {"sample": sample.to(device), "timestep": t, **text.to(device).unet_kwargs()}


def generate(pipe, prompts: Sequence[str], seeds: Sequence[int] | None = None, steps: int = 20,
             guidance: float = 5.0, batch_size: int = 8, resolution: int | None = None,
             on_step: Callable | None = None, progress: bool = True, text: Conditioning | None = None,
             eta: float = 0.0) -> np.ndarray:
    """Images as uint8 [N, H, W, 3]; prompt i always uses seed seeds[i]. `eta`: DDIM's noise (0: deterministic).

    `text`: the prompts already encoded (`encode_prompts`); the pipeline then skips its
    own text-encoder pass."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to generate: the prompt list is empty")
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if text is not None and len(text) != len(prompts):
        raise ValueError(f"the text conditioning holds {len(text)} rows for {len(prompts)} prompts; "
                         f"encode exactly these prompts")
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
        if text is not None:
            kwargs.update(text.rows(slice(i, i + batch_size)).pipeline_kwargs())
        with torch.no_grad():
            images = pipe(None if text is not None else chunk, num_inference_steps=steps,
                          guidance_scale=guidance, latents=latents, height=side, width=side, output_type="np",
                          **kwargs).images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def encode_prompts(pipe, prompts: Sequence[str], resolution: int | None = None) -> Conditioning:
    """The prompts' CFG text conditioning, as the pipeline computes it, plus the pooled
    embedding T2Q reads, from one text-encoder pass. `resolution` (pixels, default the
    model's) sets SDXL's time ids (original and target size, crop at the corner: the
    pipeline's defaults)."""
    device = pipe.unet.device if pipe.unet.device.type != "meta" else "cpu"
    if is_sdxl(pipe):
        return _encode_sdxl(pipe, list(prompts), device, resolution)
    tok, enc = pipe.tokenizer, pipe.text_encoder
    text = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt")
    mask = text.attention_mask.to(device) if getattr(enc.config, "use_attention_mask", False) else None
    with torch.no_grad():
        out = enc(text.input_ids.to(device), attention_mask=mask)
        cond, uncond = pipe.encode_prompt(None, device, 1, True, prompt_embeds=out.last_hidden_state)
    return Conditioning(cond, uncond, pooled=out.pooler_output)


def _encode_sdxl(pipe, prompts: list[str], device, resolution: int | None) -> Conditioning:
    pooled = []  # the input of text_encoder_2's projection: the prompts' pre-projection pooled state
    hook = pipe.text_encoder_2.text_projection.register_forward_pre_hook(lambda m, args: pooled.append(args[0]))
    try:
        with torch.no_grad():
            cond, uncond, text_embeds, uncond_text_embeds = pipe.encode_prompt(
                prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
    finally:
        hook.remove()
    side = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    # (original H, W, crop top, left, target H, W): what the pipeline's __call__ passes by default
    time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=cond.dtype, device=device).repeat(len(cond), 1)
    return Conditioning(cond, uncond, pooled=pooled[0], text_embeds=text_embeds,
                        uncond_text_embeds=uncond_text_embeds, time_ids=time_ids)


def prompt_seeds(seed: int, start: int, n: int) -> list[int]:
    """The noise seeds of calibration prompts start..start+n-1 of a run seeded `seed` (collection, PCR's and
    PTQD's trajectories: each prompt meets the same noise in all of them)."""
    return [seed * 1_000_003 + start + j for j in range(n)]


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
    """Refuse, before any work, a UNet whose added conditioning the project's own sampler
    (`encode_prompts`, `denoise`) does not pass: it knows none (SD 1.x/2.x) and SDXL's text_time."""
    kind = getattr(pipe.unet.config, "addition_embed_type", None)
    if kind not in (None, "text_time"):
        raise ValueError(f"{what} needs the project's own sampler, which passes no added conditioning of type "
                         f"{kind!r} (it knows SD 1.x/2.x UNets and SDXL's 'text_time'); on this model use "
                         f"--method naive (calibrate) and generate, which run the pipeline's own __call__")
    if kind == "text_time" and getattr(pipe, "text_encoder_2", None) is None:
        raise ValueError(f"{what}: the UNet reads SDXL's added conditioning but the pipeline has no text_encoder_2 "
                         f"(a refiner-style pipeline); load a base SDXL folder")


def denoise(pipe, text: Conditioning, latents: torch.Tensor, steps: int, guidance: float,
            stop: int | None = None, on_unet_input: Callable | None = None, unet=None,
            generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """The pipeline's classifier-free-guidance sampling loop, call by call.

    Runs steps [0, stop) of a `steps`-step schedule and returns the latents
    that enter step `stop` (or the final latents). A step may take several UNet
    calls (PNDM's warm-up, Heun): `on_unet_input(i, x, t)` sees the (scaled,
    conditional-half) input of the first call of each step i. `unet` overrides
    pipe.unet. `generators` (one per row, e.g. the ones `initial_latents` drew
    from) draw a stochastic sampler's per-step noise, so every model consumes
    the same noise. `text` from `encode_prompts` (SDXL's added conditioning included)."""
    unet = unet or pipe.unet
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    if getattr(unet, "quant_config", None) is not None:
        set_schedule(unet, sched.timesteps)
    step_of, firsts = call_steps(sched.timesteps), set(first_calls(sched.timesteps))
    x = latents.to(text.cond.device) * sched.init_noise_sigma
    text_kwargs = text.unet_kwargs()
    stop = steps if stop is None else stop
    extra = _step_noise(sched, generators)
    with torch.no_grad():
        for k, t in enumerate(sched.timesteps):
            i = step_of[k]
            if i >= stop:
                break
            if on_unet_input is not None and k in firsts:
                on_unet_input(i, sched.scale_model_input(torch.cat([x, x]), t)[: len(x)], t)
            x = _guided_step(sched, unet, x, t, text_kwargs, guidance, extra)
    return x


def _guided_step(sched, unet, x, t, text_kwargs: dict, guidance: float, extra: dict) -> torch.Tensor:
    """One UNet call on [uncond; cond], the CFG combination, and the scheduler's update."""
    eps_u, eps_c = unet(sched.scale_model_input(torch.cat([x, x]), t), t, **text_kwargs).sample.chunk(2)
    return sched.step(eps_u + guidance * (eps_c - eps_u), t, x, **extra).prev_sample


def _step_noise(sched, generators) -> dict:
    return {"generator": list(generators)} if generators is not None and _takes_generator(sched) else {}


class Trajectory:
    """One prompt batch's sampling loop, advanced one step at a time.

    Progressive calibration runs every batch to step i, calibrates step i, then
    advances each batch by one step: O(1) UNet calls per calibrated step, where
    rerunning `denoise` from x_T costs O(i). Each trajectory keeps its own copy
    of the scheduler (multistep samplers such as PNDM and DPM++ carry state
    between steps) and its own generators. A quantized UNet runs all calls of
    step i at step index i (`set_step`): what the call counter maps them to."""

    def __init__(self, pipe, text: Conditioning, latents: torch.Tensor, steps: int, guidance: float,
                 generators: Sequence[torch.Generator] | None = None):
        self.text, self.guidance = text, guidance
        self.sched = copy.deepcopy(pipe.scheduler)
        self.sched.set_timesteps(steps)
        self.step_of = call_steps(self.sched.timesteps)
        self.x = latents.to(text.cond.device) * self.sched.init_noise_sigma
        self.extra, self.k = _step_noise(self.sched, generators), 0

    @property
    def step(self) -> int:
        """The step whose input `x` is (the number of steps when done)."""
        return self.step_of[self.k] if self.k < len(self.step_of) else self.step_of[-1] + 1

    def unet_input(self) -> dict:
        """The keyword arguments of the current step's first UNet call."""
        t = self.sched.timesteps[self.k]
        return unet_call(self.sched.scale_model_input(torch.cat([self.x, self.x]), t), t, self.text, self.x.device)

    @torch.no_grad()
    def advance(self, unet) -> None:
        """Run every call of the current step with `unet`."""
        i, kwargs = self.step, self.text.unet_kwargs()
        while self.k < len(self.step_of) and self.step_of[self.k] == i:
            if getattr(unet, "quant_config", None) is not None:
                set_step(unet, i)
            self.x = _guided_step(self.sched, unet, self.x, self.sched.timesteps[self.k], kwargs, self.guidance,
                                  self.extra)
            self.k += 1


def _takes_generator(scheduler) -> bool:
    return "generator" in inspect.signature(scheduler.step).parameters
