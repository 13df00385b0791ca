"""PCR (Tang et al.): progressive calibration and activation relaxing.

Progressive: time-aware activation quantizers are calibrated step by step in
sampling order; the data for step i comes from trajectories whose steps
0..i-1 (T..t+1) already run the quantized model, so each step's ranges match
the inputs the quantized sampler really produces.
Relaxing: a fraction tau of the steps, at the x_0 end (SD-like) or the x_T
end (SDXL-like), run at a higher activation bit-width."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from pipeline.quant import act_banks, set_bit_policy, set_quant_state
from pipeline.sampling import denoise, encode_prompts, initial_latents


def calibrate_progressive(pipe, prompts, steps: int, guidance: float, seed: int = 0, batch_size: int = 8,
                          resolution: int | None = None) -> None:
    unet = pipe.unet
    cfg = unet.quant_config
    if not cfg.time_aware or cfg.n_steps != steps:
        raise ValueError(f"progressive calibration needs time-aware quantizers for {steps} steps "
                         f"(QuantConfig(time_aware=True, n_steps={steps}))")
    banks = act_banks(unet)
    batches = []
    for b in range(0, len(prompts), batch_size):
        chunk = prompts[b:b + batch_size]
        cond, uncond = encode_prompts(pipe, chunk)
        seeds = [seed * 1_000_003 + b + j for j in range(len(chunk))]
        batches.append((cond, uncond, initial_latents(pipe, seeds, resolution)))
    for i in tqdm(range(steps), desc="progressive", leave=False):
        for bank in banks.values():
            bank.observing = False
        set_quant_state(unet, True, True)
        inputs = []
        for cond, uncond, lat in batches:  # steps 0..i-1 run quantized (slots already calibrated)
            x = denoise(pipe, cond, uncond, lat, steps, guidance, stop=i)
            t = pipe.scheduler.timesteps[i]
            inputs.append((pipe.scheduler.scale_model_input(torch.cat([x, x]), t), t, torch.cat([uncond, cond])))
        for bank in banks.values():
            bank.observing = True
        unet.quant_context.timesteps = []
        unet.quant_context.step = i
        with torch.no_grad():
            for args in inputs:
                unet(*args)
        for bank in banks.values():
            bank.finalize(cfg.act_init, p=cfg.lp_norm, n_candidates=cfg.lp_candidates, slots=[i])
    set_quant_state(unet, True, True)


def relaxed_steps(n_steps: int, tau: float, end: str = "x0") -> list[int]:
    """Step indices (sampling order, 0 = x_T) that get the relaxed bit-width."""
    if not 0 <= tau < 1:
        raise ValueError(f"--relax-tau {tau} must be in [0, 1)")
    if end not in ("x0", "xT"):
        raise ValueError(f"--relax-end {end!r} must be 'x0' (SD-like) or 'xT' (SDXL-like)")
    n = int(round(tau * n_steps))
    return list(range(n_steps - n, n_steps)) if end == "x0" else list(range(n))


def apply_relaxing(unet, tau: float, relax_bits: int, end: str = "x0") -> list[int]:
    """Raise the activation bits of every layer at the relaxed steps."""
    cfg = unet.quant_config
    if relax_bits not in cfg.a_bit_options:
        raise ValueError(f"--relax-bits {relax_bits} has no calibrated quantizer; options are {cfg.a_bit_options}")
    steps = relaxed_steps(cfg.n_steps, tau, end)
    from pipeline.quant import get_bit_policy

    table = get_bit_policy(unet).clone()
    table[:, steps] = relax_bits
    set_bit_policy(unet, table)
    return steps
