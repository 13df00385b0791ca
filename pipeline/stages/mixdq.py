"""`python -m pipeline.fit mixdq --sensitivity runs/x/sensitivity --w-budget 4.0 --a-budget 8.0`: MixDQ's
mixed-precision allocation from a sensitivity record (pipeline/mixdq/allocation.py).

Writes <run-dir>/mixdq/: the quantized state with the chosen per-layer weight and activation bits
(quant_state.safetensors + quant_config.json, loadable by generate/evaluate), policy.json (the bits, the
protected layers, the averages), candidates.json (every group split tried, with its val score),
pareto.json (the --pareto-budgets weight sweep and its non-dominated frontier), manifest.json.

With --val-n > 0 and --pareto-budgets, the final pick is on val prompts (MixDQ's): of the frontier points whose
budget is within --w-budget, the one whose val images have the highest SSIM to FP is marked "picked" in
pareto.json, and its weight bits (with the chosen split's activation bits) are the state written."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from data.prompts import draw_prompts, parse_fractions
from pipeline.artifacts import ARTIFACTS, prepare_artifact, write_json_atomic, write_manifest
from pipeline.engine import ANY, COUNT, NON_NEGATIVE, POSITIVE, Range, StageConfig, check_flags, stage_device
from pipeline.metrics.cost import quantized_summary
from pipeline.mixdq.allocation import (
    ALLOCATORS,
    SOLVERS,
    SQNR_SCALES,
    Infeasible,
    allocate,
    check_budget,
    kind_spec,
    mixdq_objective,
    pareto_front,
    parse_sweep,
    protected_layers,
    val_pick,
)
from pipeline.mixdq.groups import layer_groups
from pipeline.mixdq.sensitivity import check_same_measurement, pick_bits, read_sensitivity, ssim_to
from pipeline.models import load_pipeline
from pipeline.quant import set_bit_policy, set_quant_state, set_weight_bits
from pipeline.quant.state import load_quantized, read_meta, save_quantized
from pipeline.sampling import generate, prompt_seeds

SPLIT_ALLOCATORS = ("ilp", "sorting")  # those that give each group its own budget


@dataclass
class MixDQConfig(StageConfig):
    """Settings of the mixdq stage."""

    sensitivity: str | None = None
    """a sensitivity output folder (python -m pipeline.fit sensitivity)"""
    quant_state: str | None = None
    """the calibrate folder the sensitivity was measured on (default: the one the record names)"""
    w_budget: float = 4.0
    """average weight bits of the measured layers, weighted by each layer's weight count"""
    a_budget: float = 8.0
    """average activation bits (FAB) of the measured layers, weighted by each layer's input-activation size"""
    allocator: str = "ilp"
    """ilp (MixDQ: an integer program per group, SSIM for content, SQNR for quality layers) | sorting (most
    sensitive first, greedy, per group) | sqnr-only (one program on SQNR over every layer) | random | uniform"""
    w_bit_options: str | None = None
    """weight bits to allocate among (default: every measured weight candidate)"""
    a_bit_options: str | None = None
    """activation bits to allocate among (default: every measured activation candidate)"""
    sqnr_scale: str = "db"
    """how the quality layers' SQNR enters the programs: db (MixDQ as published: the dB values summed) | power
    (minus the noise-to-signal power 10^(-SQNR/10) summed: noises add, so no layer is left at a ruinous SQNR to
    buy many harmless dB elsewhere; docs/mixdq.md)"""
    w_splits: str = "0.75,1.0,1.25"
    """content-group budget / the free average, weights (MixDQ scans 0.45..1.36); each is a candidate"""
    a_splits: str = "1.0"
    """the same for activations (MixDQ scans 0.94..1.09)"""
    protect_frac: float = 0.01
    """fraction of activation layers (the most sensitive by SQNR at the lowest candidate) kept at
    --protect-bits, within the budget; not for --allocator uniform"""
    protect_bits: int = 16
    """activation bits of the protected layers (an option of the state)"""
    content_regex: str | None = None
    """regex naming the content layers (default: the record's grouping: attn2 and ff)"""
    pareto_budgets: str | None = None
    """weight budgets to sweep, LO:HI:N (e.g. 3:8:11) or a comma list; pareto.json keeps every point and the
    frontier; with --val-n, the frontier point within --w-budget closest to FP on the val prompts is the
    written state ("picked")"""
    val_n: int = 0
    """val prompts that pick the best candidate split, then the best --pareto-budgets point, by SSIM to FP
    (0: the split closest to 1, the allocation at --w-budget)"""
    prompts: str = "world"
    """prompt source of the val prompts"""
    split_fractions: str = "0.8,0.1,0.1"
    """train,val,test fractions of the hashed prompt split"""
    steps: int | None = None
    """sampling steps (must be the sensitivity record's; default: its)"""
    solver: str = "scip"
    """integer-program solver: scip | cp-sat (OR-tools)"""
    time_limit: float = 10.0
    """seconds per integer program"""
    flag_ranges: ClassVar = {"w_budget": ANY, "a_budget": ANY,  # against the candidates: check_budget
                             "protect_frac": Range(0, 0.5), "protect_bits": Range(values=(8, 10, 12, 16, 32)),
                             "val_n": NON_NEGATIVE, "steps": COUNT, "time_limit": POSITIVE}


def ratios(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text!r} must be comma-separated numbers such as 0.75,1.0,1.25") from None
    if any(not np.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"{flag} {text!r}: every ratio must be a positive number")
    return values


def mixdq(cfg: MixDQConfig, trainer: dict | None = None) -> Path:
    check_flags(cfg)
    if cfg.allocator not in ALLOCATORS:
        raise ValueError(f"--allocator {cfg.allocator!r}: use one of {', '.join(ALLOCATORS)}")
    if cfg.sqnr_scale not in SQNR_SCALES:
        raise ValueError(f"--sqnr-scale {cfg.sqnr_scale!r}: use one of {', '.join(SQNR_SCALES)}")
    if cfg.solver not in SOLVERS:
        raise ValueError(f"--solver {cfg.solver!r}: use one of {', '.join(SOLVERS)}")
    if not cfg.sensitivity:
        raise ValueError("--sensitivity is required: a sensitivity output folder such as runs/x/sensitivity")
    rec = read_sensitivity(cfg.sensitivity)  # format, completeness, NaN/inf: before anything loads
    state = cfg.quant_state or rec.get("quant_state_path")
    if not state:
        raise ValueError(f"--quant-state is required: {rec['path']} names no state")
    meta = read_meta(state, "--quant-state")
    check_same_measurement(rec, meta, state, cfg.steps)
    qc = meta["quant_config"]
    a_have = qc["a_bit_options"]
    w_bits = pick_bits(rec, "w", cfg.w_bit_options, qc.get("w_bit_options", [qc["w_bits"]]))
    a_bits = pick_bits(rec, "a", cfg.a_bit_options, a_have)
    check_budget(cfg.w_budget, w_bits, "--w-budget")
    check_budget(cfg.a_budget, a_bits, "--a-budget")
    protect = cfg.protect_frac if cfg.allocator != "uniform" else 0.0
    if protect and cfg.protect_bits not in a_have:
        raise ValueError(f"--protect-bits {cfg.protect_bits} has no quantizer in the state (options {a_have}); "
                         f"calibrate with --a-bit-options including it, or pass --protect-frac 0")
    groups = layer_groups(rec["layers"], cfg.content_regex) if cfg.content_regex else rec["groups"]
    splits = SPLIT_ALLOCATORS if cfg.allocator in SPLIT_ALLOCATORS else ()
    w_ratios = ratios(cfg.w_splits, "--w-splits") if splits else [1.0]
    a_ratios = ratios(cfg.a_splits, "--a-splits") if splits else [1.0]
    sweep = parse_sweep(cfg.pareto_budgets)
    for b in sweep:
        check_budget(b, w_bits, "--pareto-budgets entry")
    val = draw_prompts(cfg.prompts, "val", cfg.val_n, parse_fractions(cfg.split_fractions),
                       seed=cfg.seed).prompts if cfg.val_n else []

    # a quantized layer not measured (sensitivity --layers) keeps the state's bits, outside the budgets; the
    # protected ones take --protect-bits within the activation budget
    w_state = meta.get("w_policy") or {n: qc["w_bits"] for n in meta["layers"]}
    a_state = {n: a_have[idx[0]] for n, idx in meta["policy"].items()}
    unmeasured = [n for n in meta["layers"] if n not in rec["ssim"]]
    lowest = f"a{a_bits[0]}"
    protected = protected_layers(rec["layers"], [rec["sqnr"][n][lowest] for n in rec["layers"]], protect)
    w_spec = kind_spec(rec, "w", w_bits, groups, {}, kept={n: w_state[n] for n in unmeasured},
                       sqnr_scale=cfg.sqnr_scale)
    a_spec = kind_spec(rec, "a", a_bits, groups, {n: cfg.protect_bits for n in protected},
                       kept={n: a_state[n] for n in unmeasured}, sqnr_scale=cfg.sqnr_scale)

    def solve(spec, budget, ratio):
        res = allocate(spec, cfg.allocator, budget, ratio, seed=cfg.seed, time_limit=cfg.time_limit,
                       solver=cfg.solver)
        res["mixdq_objective"] = mixdq_objective(spec, res["bits"])
        return res

    candidates = []
    for rw, ra in itertools.product(w_ratios, a_ratios):
        try:
            cand = {"w_ratio": rw, "a_ratio": ra, "w": solve(w_spec, cfg.w_budget, rw),
                    "a": solve(a_spec, cfg.a_budget, ra), "feasible": True}
        except Infeasible as e:  # recorded and skipped
            cand = {"w_ratio": rw, "a_ratio": ra, "feasible": False, "error": str(e)}
        candidates.append(cand)
    feasible = [c for c in candidates if c["feasible"]]
    if not feasible:
        raise Infeasible(f"no candidate split meets --w-budget {cfg.w_budget} / --a-budget {cfg.a_budget}: "
                         + "; ".join(c["error"] for c in candidates))

    out = prepare_artifact(cfg.run_dir, ARTIFACTS["mixdq"], cfg.overwrite, cfg.fresh)
    pipe = load_pipeline(cfg.model, **cfg.load_options())
    _, meta, extra_tensors = load_quantized(pipe.unet, state)  # refuses a state of another model
    pipe.to(stage_device(trainer))
    unet = pipe.unet
    sampling = {"steps": rec["signature"]["steps"], "guidance": rec["signature"]["guidance"]}

    def apply(w_bits, a_bits):
        set_weight_bits(unet, {**w_spec.fixed, **w_bits})
        set_bit_policy(unet, {**a_spec.fixed, **a_bits})

    seeds = prompt_seeds(cfg.seed, 10**6, len(val))  # noise seeds apart from the sensitivity probe's
    fp_val = []  # the FP val images, made once, at the first val score

    def val_ssim(w_bits, a_bits) -> float:
        """SSIM to FP of the val images at these bits (MixDQ's pick, of a split and of a sweep point)."""
        if not fp_val:
            set_quant_state(unet, weight=False, act=False)
            fp_val.append(generate(pipe, val, seeds, progress=False, **sampling))
            set_quant_state(unet, weight=True, act=True)
        apply(w_bits, a_bits)
        return ssim_to(fp_val[0], generate(pipe, val, seeds, progress=False, **sampling))

    if val and len(feasible) > 1:  # MixDQ's pick: the candidate whose val images are closest to FP
        for cand in feasible:
            cand["val_ssim"] = val_ssim(cand["w"]["bits"], cand["a"]["bits"])
        best = max(feasible, key=lambda c: c["val_ssim"])
    else:
        best = min(feasible, key=lambda c: (abs(c["w_ratio"] - 1) + abs(c["a_ratio"] - 1), c["w_ratio"]))
    best["chosen"] = True

    pareto, sweep_bits = [], {}
    for b in sweep:  # the weight sweep at the chosen split
        try:
            res = solve(w_spec, b, best["w_ratio"])
            pareto.append({"budget": b, "average": res["average"], "objective": res["mixdq_objective"],
                           "feasible": True})
            sweep_bits[id(pareto[-1])] = res["bits"]
        except Infeasible as e:
            pareto.append({"budget": b, "feasible": False, "error": str(e)})
    points = [p for p in pareto if p["feasible"]]
    if sweep and not points:
        raise Infeasible(f"every --pareto-budgets point is infeasible: {pareto[0]['error']}")
    for i in pareto_front(points, "average", "objective"):
        points[i]["frontier"] = True
    # the final pick on val prompts: of the frontier within --w-budget, the point whose images are closest to FP
    picked = val_pick(points, cfg.w_budget, lambda p: val_ssim(sweep_bits[id(p)], best["a"]["bits"])) \
        if val else None
    w_final = best["w"]["bits"]
    if picked is not None:
        points[picked]["picked"] = True
        w_final = sweep_bits[id(points[picked])]
    elif val and sweep:
        print(f"note: no --pareto-budgets frontier point is within --w-budget {cfg.w_budget}; keeping the "
              f"allocation at the budget itself")
    apply(w_final, best["a"]["bits"])

    summary = quantized_summary(unet)
    averages = {"w": summary["avg_w_bits"], "a": summary["fab"]}
    policy = {"allocator": cfg.allocator, "sqnr_scale": cfg.sqnr_scale, "w_budget": cfg.w_budget,
              "a_budget": cfg.a_budget, "w_ratio": best["w_ratio"], "a_ratio": best["a_ratio"], "averages": averages,
              "protected": protected, "protect_bits": cfg.protect_bits if protected else None,
              "picked_budget": points[picked]["budget"] if picked is not None else None,
              "weights": {**w_spec.fixed, **w_final}, "acts": {**a_spec.fixed, **best["a"]["bits"]},
              "groups": groups, "unmeasured": unmeasured}
    src_extra = meta.get("extra", {})
    save_quantized(unet, out, extra_tensors=extra_tensors,
                   extra={**src_extra, "method": f"mixdq-{cfg.allocator}", "base_method": src_extra.get("method"),
                          "averages": averages, "mixdq": {k: policy[k] for k in ("allocator", "w_budget", "a_budget",
                                                                                  "picked_budget", "w_ratio",
                                                                                  "a_ratio")}})
    write_json_atomic(out / "policy.json", policy)
    write_json_atomic(out / "candidates.json", candidates)
    write_json_atomic(out / "pareto.json", pareto)
    write_manifest(out, "mixdq", cfg, summary, sensitivity=rec["path"], quant_state=str(state))
    print(f"mixdq {cfg.allocator}: W avg {averages['w']:.2f} (budget {cfg.w_budget}), FAB {averages['a']:.2f} "
          f"(budget {cfg.a_budget}), {len(protected)} protected -> {out}")
    return out
