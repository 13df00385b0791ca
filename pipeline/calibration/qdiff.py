"""Q-Diffusion: BRECQ block reconstruction with AdaRound weights, then LSQ
activation step sizes, unit by unit, resumable after an interruption.

Progress lives in <partial>/progress.json plus one safetensors file of
quantizer tensors per finished unit: a rerun loads those and continues with
the first unfinished unit, recomputing nothing already done."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pipeline.artifacts import check_progress, jsonable, load_tensors, save_tensors, write_json_atomic
from pipeline.calibration.blocks import BlockIO, reconstruction_units, set_unit_act, unit_banks, unit_layers
from pipeline.calibration.reconstruction import Phase, fit_unit, held_out_mse
from pipeline.quant import set_quant_state
from pipeline.quant.state import assign_quantizer_tensors, quantizer_state


def capture_unit_io(unet, unit, data, device="cpu") -> list[dict]:
    """FP inputs and outputs of `unit` over every calibration UNet call."""
    set_quant_state(unet, weight=False, act=False)
    with BlockIO(unit) as io, torch.no_grad():
        for step, call in data.unet_calls(device=device):
            io.set_step(step)
            unet.quant_context.timesteps = []
            unet.quant_context.step = step
            unet(**call)
    return io.items


def _split(items: list[dict], every: int = 5):
    held = items[::every] if len(items) >= every else items[:1]
    train = [it for i, it in enumerate(items) if i % every != 0] if len(items) >= every else items
    return train, held


def reconstruct_unit(unet, name: str, unit, data, iters_w: int, iters_a: int, w_lr: float = 1e-3,
                     a_lr: float = 4e-4, trainer_kwargs: dict | None = None, seed: int = 0) -> dict:
    """Weights (AdaRound), then activation ranges and step sizes, of one unit."""
    cfg = unet.quant_config
    ctx = unet.quant_context
    device = next(unet.parameters()).device
    t0 = time.time()
    items = capture_unit_io(unet, unit, data, device)
    train, held = _split(items)
    layers = unit_layers(unit)
    for p in unit.parameters():
        p.requires_grad_(False)
    metrics = {"items": len(items)}
    # 1. weights (activations off inside the unit)
    for layer in layers:
        layer.quant_weight = layer.w_quant.n_bits < 32
    set_unit_act(unit, False)
    if iters_w > 0 and cfg.w_bits < 32:
        metrics["mse_rtn"] = held_out_mse(unit, ctx, held)
        for layer in layers:
            layer.w_quant.start_learning_rounding(layer.weight)
        module = fit_unit(unit, ctx, train, [Phase("weight", iters_w)], w_lr, trainer_kwargs or {}, seed, name)
        for layer in layers:
            layer.w_quant.finish_learning_rounding()
        metrics["mse_adaround"] = held_out_mse(unit, ctx, held)
        metrics["w_loss_first_last"] = [module.losses[0], module.losses[-1]] if module.losses else []
    # 2.-3. activation ranges, then LSQ step sizes
    metrics.update(learn_activations(unet, name, unit, items, iters_a, a_lr, trainer_kwargs, seed))
    metrics["seconds"] = time.time() - t0
    return metrics


def learn_activations(unet, name: str, unit, items: list[dict], iters_a: int, a_lr: float = 4e-4,
                      trainer_kwargs: dict | None = None, seed: int = 0, slots: list[int] | None = None) -> dict:
    """Activation quantizers of one unit: range init (L_p / min-max) from the unit's
    inputs in `items`, then LSQ step sizes, one phase per (bit option, slot).

    `slots` restricts both to those time slots (PCR's progressive calibration
    sets one step at a time); None means every slot. Step sizes are learned for
    the bit options below 16 (16-bit quantizers are already near-lossless at
    their range init, and an absolute Adam step of 4e-4 would swamp their ~1e-5
    scales); the fixed-bit softmax bank keeps its range init for the same reason."""
    cfg = unet.quant_config
    ctx = unet.quant_context
    layers = unit_layers(unit)
    for layer in layers:  # weights as reconstructed, activations on
        layer.quant_weight = layer.w_quant.n_bits < 32
    banks = unit_banks(unit)
    set_unit_act(unit, True)
    for b in banks:
        b.observing = True
    with torch.no_grad():
        for it in items:
            ctx.step = int(it["step"])
            unit(*it["args"], **it["kwargs"])
    for b in banks:
        b.finalize(cfg.act_init, p=cfg.lp_norm, n_candidates=cfg.lp_candidates, slots=slots)
    metrics = {}
    learn_options = [k for k, b in enumerate(cfg.a_bit_options) if b < 16]
    learn_banks = [b for b in banks if b.bit_options == cfg.a_bit_options]  # not the fixed softmax bank
    if iters_a > 0 and learn_options and learn_banks:
        train, held = _split(items)
        if slots is None:
            n_slots = max(b.n_slots for b in learn_banks)
            slots = list(range(n_slots)) if n_slots > 1 else [None]
        per = max(1, iters_a // len(slots))
        phases = [Phase("act", per, k=k, slot=s) for k in learn_options for s in slots]
        metrics["mse_act_init"] = {cfg.a_bit_options[k]: held_out_mse(unit, ctx, held, k) for k in learn_options}
        saved = [list(layer.policy) for layer in layers]
        for b in learn_banks:
            b.scale.requires_grad_(True)
        fit_unit(unit, ctx, train, phases, a_lr, trainer_kwargs or {}, seed + 1, name, banks=learn_banks)
        for b in learn_banks:
            b.scale.requires_grad_(False)
            b.scale.data.clamp_(min=1e-8)
        for layer, pol in zip(layers, saved):
            layer.policy = pol
        metrics["mse_act_lsq"] = {cfg.a_bit_options[k]: held_out_mse(unit, ctx, held, k) for k in learn_options}
    return metrics


def calibrate_qdiff(unet, data, partial_dir: str | Path, iters_w: int = 20000, iters_a: int = 5000,
                    w_lr: float = 1e-3, a_lr: float = 4e-4, trainer_kwargs: dict | None = None, seed: int = 0,
                    is_rank_zero: bool = True, signature: dict | None = None) -> dict:
    """Reconstruct every unit of the already-wrapped `unet`; returns per-unit metrics.

    `signature` (the run's settings) is stored with the progress; progress made
    under another signature is refused rather than silently mixed in."""
    cfg = unet.quant_config
    if cfg.weight_rounding != "adaround":
        raise ValueError("Q-Diffusion needs QuantConfig(weight_rounding='adaround')")
    partial = Path(partial_dir)
    (partial / "units").mkdir(parents=True, exist_ok=True)
    progress_file = partial / "progress.json"
    signature = jsonable({"quant_config": cfg.to_dict(), "iters_w": iters_w, "iters_a": iters_a, "w_lr": w_lr,
                          "a_lr": a_lr, "seed": seed, "data": data.meta["signature"],  # the model's weight hash
                          **(signature or {})})
    progress = check_progress(progress_file, signature, "reconstruction progress") or {
        "signature": signature, "done": [], "metrics": {}}
    units = reconstruction_units(unet)
    for idx, (name, unit) in enumerate(tqdm(units.items(), desc="reconstruct", leave=False)):
        path = partial / "units" / f"{idx:04d}.safetensors"
        if name in progress["done"] and path.is_file():
            assign_quantizer_tensors(unet, load_tensors(path, "re-run calibrate with --overwrite true"))
            continue
        metrics = reconstruct_unit(unet, name, unit, data, iters_w, iters_a, w_lr, a_lr, trainer_kwargs, seed)
        if is_rank_zero:
            save_tensors(path, quantizer_state(unit, prefix=name))
            progress["done"].append(name)
            progress["metrics"][name] = metrics
            write_json_atomic(progress_file, progress)  # a kill never leaves a half-written progress file
    set_quant_state(unet, weight=True, act=True)
    return progress["metrics"]


def learn_adaround_weights(unet, data, partial_dir: str | Path, iters_w: int, w_lr: float = 1e-3,
                           trainer_kwargs: dict | None = None) -> tuple[dict, dict]:
    """Q-Diffusion's weight phase alone (AdaRound, no LSQ) on an already-wrapped `unet`, to share its result.

    The weight phase sees FP unit inputs with the unit's activation quantization off, so what it learns does
    not depend on the activation setting: one run (the UNet wrapped at A32) serves every A-bits at these
    W-bits. Returns the learned weight-quantizer tensors (`assign_quantizer_tensors` puts them into another
    UNet wrapped with the same W-bits) and `calibrate_qdiff`'s per-unit metrics; resumable in `partial_dir`."""
    units = calibrate_qdiff(unet, data, partial_dir, iters_w, 0, w_lr=w_lr, trainer_kwargs=trainer_kwargs)
    tensors = {k: v for k, v in quantizer_state(unet).items() if ".w_quant." in k}
    return tensors, units
