"""Q-Diffusion: BRECQ block reconstruction with AdaRound weights, then LSQ
activation step sizes, unit by unit, resumable after an interruption.

Progress lives in <partial>/progress.json plus one safetensors file of
quantizer tensors per finished unit: a rerun loads those and continues with
the first unfinished unit, recomputing nothing already done."""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from pipeline.artifacts import (
    check_progress,
    jsonable,
    load_tensors,
    matches_checksum,
    save_tensors,
    sha256_file,
    write_json_atomic,
)
from pipeline.calibration.blocks import (
    UnitProbe,
    in_call_order,
    reconstruction_units,
    set_unit_act,
    set_units_quantized,
    unit_banks,
    unit_layers,
)
from pipeline.calibration.gptq import check_adaround_init
from pipeline.calibration.naive import merge_observations, sync_banks_from_rank0
from pipeline.calibration.reconstruction import Phase, fit_rounding, fit_unit, held_out_mse
from pipeline.quant import set_quant_state, set_step
from pipeline.quant.quantizer import WeightQuantizer
from pipeline.quant.state import assign_quantizer_tensors, quantizer_state
from pipeline.shards import (
    DEFAULT_RAM_CAP_GIB,
    ItemStore,
    estimate_line,
    item_field,
    item_nbytes,
    process_share,
    ram_cap_bytes,
    rank_share,
    take,
)

RECON_INPUTS = ("quantized", "fp")


def check_recon_inputs(value: str) -> str:
    if value not in RECON_INPUTS:
        raise ValueError(f"--recon-inputs {value!r}: use one of {RECON_INPUTS}")
    return value


def capture_unit_io(unet, unit, data, device="cpu", store=None, share: tuple[int, int] = (0, 1),
                    upstream: list | None = None, upstream_acts: bool = True):
    """Inputs and target outputs of `unit` over this process's calibration UNet calls, into `store` (an
    ItemStore; default a list in RAM). `share` = (rank, world): a process runs every world-th call only.

    The target is always the FP unit's output on the FP model's input. The input is the FP model's too,
    unless `upstream` (the units already reconstructed) is given: then it comes from a second pass in which
    those units run quantized (weights, and activations unless `upstream_acts` is False), as Q-Diffusion's
    `GetLayerInpOut` (qdiff/utils.py, `asym=True`, `act_quant` as the pass's) does, so the unit learns to
    absorb the error upstream. Each pass stops at the unit."""
    rank, world = share
    items = [] if store is None else store
    probe = UnitProbe(unit)
    with torch.no_grad():
        for k, (step, call) in enumerate(data.unet_calls(device=device)):
            if k % world != rank:
                continue
            set_step(unet, step)
            set_quant_state(unet, weight=False, act=False)
            seen = probe(lambda: unet(**call))
            if upstream:
                set_units_quantized(upstream, act=upstream_acts)
                seen.update(probe(lambda: unet(**call), inputs_only=True))
                set_quant_state(unet, weight=False, act=False)
            items.append({"args": seen["args"], "kwargs": seen["kwargs"], "out": seen["out"], "step": step})
    return items


def first_fp_call(unet, data, device="cpu"):
    """The first calibration UNet call, ready to run in full precision (its step set, quantization off)."""
    step, call = next(iter(data.unet_calls(device=device)))
    set_step(unet, step)
    set_quant_state(unet, weight=False, act=False)
    return lambda: unet(**call)


def units_in_call_order(unet, data) -> dict:
    """The reconstruction units in the order the UNet runs them (`blocks.in_call_order`), from one FP call."""
    return in_call_order(reconstruction_units(unet), first_fp_call(unet, data, next(unet.parameters()).device))


def unit_call_bytes(unet, data, device="cpu") -> dict[str, int]:
    """Bytes one calibration UNet call leaves per unit (inputs and FP output), from one FP call."""
    sizes = {}

    def measure(name):
        def hook(module, args, kwargs, out):  # returns None: the output passes unchanged
            out = out[0] if isinstance(out, tuple) else out
            sizes.setdefault(name, item_nbytes({"args": args, "kwargs": kwargs, "out": out}))
        return hook

    hooks = [unit.register_forward_hook(measure(name), with_kwargs=True)
             for name, unit in reconstruction_units(unet).items()]
    run = first_fp_call(unet, data, device)
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return sizes


def print_estimate(unet, data, cap: float, share: tuple[int, int]) -> str:
    """Print (and return) what the reconstruction will hold: its largest unit's items, one unit at a time."""
    rank, world = share
    n_calls = data.meta["n_shards"] * len(data.steps)
    per_call = max(unit_call_bytes(unet, data, next(unet.parameters()).device).values(), default=0)
    line = estimate_line("the reconstruction" + (f" (rank {rank} of {world})" if world > 1 else ""),
                         per_call * len(rank_share(n_calls, rank, world)), cap, per_call)
    print(line)
    return line


def _split(items, every: int = 5):
    n = len(items)
    if n < every:
        return items, take(items, [0])
    return take(items, [i for i in range(n) if i % every != 0]), take(items, range(0, n, every))


def reconstruct_unit(unet, name: str, unit, data, iters_w: int, iters_a: int, w_lr: float = 1e-3,
                     a_lr: float = 4e-4, trainer_kwargs: dict | None = None, seed: int = 0,
                     store: ItemStore | None = None, share: tuple[int, int] = (0, 1),
                     upstream: list | None = None, weights: bool = True, acts: bool = True,
                     adaround_init: str = "fp") -> dict:
    """Weights (AdaRound; if `weights`), then activation ranges and step sizes (if `acts`), of one unit.

    The unit's items go to `store` (default: all in RAM), which is emptied (its shards deleted) at the end.
    `upstream`: the units already reconstructed, run quantized for the unit's inputs (`capture_unit_io`):
    weights only in a weights-only pass, weights and activations otherwise, as Q-Diffusion's passes run.
    `adaround_init`: AdaRound's start, "fp" or "gptq" (`reconstruction.fit_rounding`)."""
    device = next(unet.parameters()).device
    t0 = time.time()
    for p in unit.parameters():  # only quantizer parameters learn
        p.requires_grad_(False)
    with store if store is not None else ItemStore() as st:
        items = capture_unit_io(unet, unit, data, device, st, share, upstream, upstream_acts=acts)
        metrics = {"items": len(items)}
        if weights:
            metrics.update(learn_weights(unet, name, unit, items, iters_w, w_lr, trainer_kwargs, seed,
                                          adaround_init))
        if acts:
            metrics.update(learn_activations(unet, name, unit, items, iters_a, a_lr, trainer_kwargs, seed))
    metrics["seconds"] = time.time() - t0
    return metrics


def learn_weights(unet, name: str, unit, items: list[dict], iters_w: int, w_lr: float = 1e-3,
                  trainer_kwargs: dict | None = None, seed: int = 0, adaround_init: str = "fp") -> dict:
    """AdaRound of one unit's weights on `items`, with the unit's activation quantization off: of every weight
    option (MixDQ's per-layer bits; the default option's metrics at the top level, the others' under `w<bits>`),
    each on the same items, and the unit left at the weight bits it had."""
    cfg = unet.quant_config
    ctx = unet.quant_context
    train, held = _split(items)
    layers = unit_layers(unit)
    in_force = [layer.w_bits for layer in layers]
    set_unit_act(unit, False)
    metrics = {}
    try:
        for bits in [cfg.w_bits] + [b for b in cfg.w_bit_options if b != cfg.w_bits]:
            for layer in layers:
                layer.w_bits, layer.quant_weight = bits, bits < 32
            if not (iters_w > 0 or adaround_init != "fp") or bits >= 32:  # GPTQ's start alone: --iters-w 0
                continue
            m = metrics if bits == cfg.w_bits else metrics.setdefault(f"w{bits}", {})
            m["mse_rtn"] = held_out_mse(unit, ctx, held)
            module = fit_rounding(unit, ctx, train, iters_w, w_lr, trainer_kwargs or {}, seed, name, adaround_init,
                                  select=held if adaround_init != "fp" else None)  # fp: unchanged, no selection
            m["mse_adaround"] = held_out_mse(unit, ctx, held)
            m["w_loss_first_last"] = [module.losses[0], module.losses[-1]] if module.losses else []
    finally:
        for layer, bits in zip(layers, in_force):
            layer.w_bits, layer.quant_weight = bits, bits < 32
    return metrics


def learn_activations(unet, name: str, unit, items: list[dict], iters_a: int, a_lr: float = 4e-4,
                      trainer_kwargs: dict | None = None, seed: int = 0, slots: list[int] | None = None) -> dict:
    """Activation quantizers of one unit: range init (L_p / min-max) from the unit's
    inputs in `items`, then LSQ step sizes, one phase per (bit option, slot).

    `slots` restricts both to those time slots (PCR's progressive calibration
    sets one step at a time); None means every slot that has items. A time-aware slot without items
    (a step outside --cali-st) takes the quantizers of the nearest step that has them, range and learned
    step size alike: it never trains on other steps' data. Step sizes are learned for
    the bit options below 16 (16-bit quantizers are already near-lossless at
    their range init, and an absolute Adam step of 4e-4 would swamp their ~1e-5
    scales); the fixed-bit softmax bank keeps its range init for the same reason."""
    cfg = unet.quant_config
    ctx = unet.quant_context
    layers = unit_layers(unit)
    for layer in layers:  # weights as reconstructed, activations on
        layer.quant_weight = layer.w_bits < 32
    banks = unit_banks(unit)
    set_unit_act(unit, True)
    for b in banks:
        b.observing = True
    with torch.no_grad():
        for it in items:
            ctx.step = int(it["step"])
            unit(*it["args"], **it["kwargs"])
    merge_observations(unit)  # under DDP each rank observed its own share of the items
    for b in banks:
        b.finalize(cfg.act_init, p=cfg.lp_norm, n_candidates=cfg.lp_candidates, slots=slots)
    sync_banks_from_rank0(unit)  # the L_p search saw rank 0's sample: every rank takes rank 0's result
    metrics = {}
    learn_options = [k for k, b in enumerate(cfg.a_bit_options) if b < 16]
    learn_banks = [b for b in banks if b.bit_options == cfg.a_bit_options]  # not the fixed softmax bank
    n_slots = max(b.n_slots for b in banks)
    observed = observed_slots(items, n_slots) if slots is None and n_slots > 1 else None
    if iters_a > 0 and learn_options and learn_banks:
        train, held = _split(items)
        if slots is None:
            slots = observed if observed is not None else [None]
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
    if observed is not None:
        share_nearest_slots(banks, observed)
    return metrics


def observed_slots(items, n_slots: int) -> list[int]:
    """The time slots the items' steps address (over every DDP process's share)."""
    mine = {min(int(item_field(items, i, "step")), n_slots - 1) for i in range(len(items))}
    if dist.is_available() and dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, sorted(mine))
        mine = set().union(*map(set, parts))
    return sorted(mine)


@torch.no_grad()
def share_nearest_slots(banks, observed: list[int]) -> None:
    """Every time slot without data takes the quantizers of the nearest observed slot (the earlier on a tie)."""
    for b in banks:
        if b.n_slots == 1:
            continue
        for slot in range(b.n_slots):
            src = min(observed, key=lambda o: (abs(o - slot), o))
            if src != slot:
                b.scale[:, slot] = b.scale[:, src]
                b.zero_point[:, slot] = b.zero_point[:, src]


# Passes over the units: (folder, fit weights, fit activations). With FP inputs every unit sees the same
# inputs whatever is quantized upstream, so one pass does both. With quantized inputs Q-Diffusion's order holds
# (txt2img.py: `recon_model` with act_quant=False, then again with act_quant=True): every unit's weights, on
# inputs from upstream weights quantized and activations off; then every unit's activations, on inputs from
# the fully quantized upstream.
PASSES = {"fp": (("units", True, True),), "quantized": (("weights", True, False), ("units", False, True))}


def calibrate_qdiff(unet, data, partial_dir: str | Path, iters_w: int = 20000, iters_a: int = 5000,
                    w_lr: float = 1e-3, a_lr: float = 4e-4, trainer_kwargs: dict | None = None, seed: int = 0,
                    is_rank_zero: bool = True, signature: dict | None = None,
                    ram_cap_gib: float | None = DEFAULT_RAM_CAP_GIB, discard_stale: bool = False,
                    recon_inputs: str = "quantized", adaround_init: str = "fp") -> dict:
    """Reconstruct every unit of the already-wrapped `unet`; returns per-unit metrics.

    `recon_inputs` "quantized" (the default, Q-Diffusion's and BRECQ's asym): each unit is fitted on the inputs
    that the units running before it in a UNet call produce, quantized (`capture_unit_io`, `units_in_call_order`),
    in Q-Diffusion's two passes (`PASSES`); "fp": on the FP model's inputs. docs/calibration.md has the figures.
    `adaround_init`: "fp" (AdaRound's own start) or "gptq" (GPTQ's closed-form rounding first).

    `signature` (the run's settings) is stored with the progress; progress made
    under another signature is refused rather than silently mixed in (`discard_stale`: discarded).
    Each finished unit's file is recorded with its SHA-256; a file that no longer matches is redone.
    A unit's items (FP inputs and outputs) stay in RAM up to `ram_cap_gib` (None: no cap); the rest go to
    <partial>/spill/rank<r>/ and are deleted once the unit is done. Under DDP each process captures and holds
    only its own share of the UNet calls. The cap does not change the result."""
    cfg = unet.quant_config
    if cfg.weight_rounding != "adaround":
        raise ValueError("Q-Diffusion needs QuantConfig(weight_rounding='adaround')")
    check_recon_inputs(recon_inputs)
    check_adaround_init(adaround_init)
    passes = PASSES[recon_inputs]
    cap = ram_cap_bytes(ram_cap_gib)
    partial = Path(partial_dir)
    progress_file = partial / "progress.json"
    signature = jsonable({"quant_config": cfg.to_dict(), "iters_w": iters_w, "iters_a": iters_a, "w_lr": w_lr,
                          "a_lr": a_lr, "seed": seed, "data": data.meta["signature"],  # the model's weight hash
                          "recon_inputs": recon_inputs, **(signature or {}),
                          **({"passes": [p[0] for p in passes]} if len(passes) > 1 else {}),
                          # absent at the default: progress kept before the option existed still matches
                          **({"adaround_init": adaround_init} if adaround_init != "fp" else {})})
    progress = check_progress(progress_file, signature, "reconstruction progress", discard_stale) or {
        "signature": signature, "done": [], "metrics": {}, "sha256": {}}
    units = units_in_call_order(unet, data)
    rank, world = share = process_share(trainer_kwargs)
    spill = partial / "spill" / f"rank{rank}"
    print_estimate(unet, data, cap, share)
    for folder, fit_w, fit_a in passes:
        # progress keys of the pass: the final pass keeps the single-pass names, so fp progress is unchanged
        done_key, sha_key = ("done", "sha256") if folder == "units" else (f"done_{folder}", f"sha256_{folder}")
        (partial / folder).mkdir(parents=True, exist_ok=True)
        done = []  # the units through this pass so far (loaded or fitted): quantized upstream of the next one
        for idx, (name, unit) in enumerate(tqdm(units.items(), desc=f"reconstruct {folder}", leave=False)):
            path = partial / folder / f"{idx:04d}.safetensors"
            if name in progress.get(done_key, []) and path.is_file():
                if matches_checksum(path, progress.get(sha_key, {}).get(name)):
                    assign_quantizer_tensors(unet, load_tensors(path, "re-run calibrate with --fresh true"))
                    done.append(unit)
                    continue
                print(f"note: {path} does not match its checksum in {progress_file}; redoing unit {name}")
            metrics = reconstruct_unit(unet, name, unit, data, iters_w, iters_a, w_lr, a_lr, trainer_kwargs, seed,
                                       store=ItemStore(spill, cap, name=f"{idx:04d}"), share=share,
                                       upstream=done if recon_inputs == "quantized" else None,
                                       weights=fit_w, acts=fit_a, adaround_init=adaround_init)
            done.append(unit)
            if is_rank_zero:
                save_tensors(path, quantizer_state(unit, prefix=name))
                progress[done_key] = [n for n in progress.get(done_key, []) if n != name] + [name]
                progress.setdefault(sha_key, {})[name] = sha256_file(path)
                before = progress["metrics"].get(name, {})
                if folder == "units":
                    metrics["seconds"] += before.get("seconds_weights", 0.0)  # both passes' time
                else:
                    metrics[f"seconds_{folder}"] = metrics.pop("seconds")
                progress["metrics"][name] = {**before, **metrics}
                write_json_atomic(progress_file, progress)  # a kill never leaves a half-written progress file
    set_quant_state(unet, weight=True, act=True)
    return progress["metrics"]


def learn_adaround_weights(unet, data, partial_dir: str | Path, iters_w: int, w_lr: float = 1e-3,
                           trainer_kwargs: dict | None = None) -> tuple[dict, dict]:
    """Q-Diffusion's weight phase alone (AdaRound, no LSQ) on an already-wrapped `unet`, to share its result.

    The weight pass sees inputs from the upstream units with weights quantized and every activation quantizer
    off (Q-Diffusion's first pass), so what it learns does not depend on the activation setting: one run (the
    UNet wrapped at A32) serves every A-bits at these W-bits. Returns the learned tensors of every weight option
    (`assign_quantizer_tensors` puts them into another UNet wrapped with the same W-bits and weight options) and
    `calibrate_qdiff`'s per-unit metrics; resumable in `partial_dir`."""
    units = calibrate_qdiff(unet, data, partial_dir, iters_w, 0, w_lr=w_lr, trainer_kwargs=trainer_kwargs)
    tensors = quantizer_state(unet, kinds=(WeightQuantizer,))
    return tensors, units
