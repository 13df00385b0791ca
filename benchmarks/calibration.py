"""Calibration acceptance figures on one model (issue: calibration).

For every W/A setting (`--settings 4/8,4/16`), rows on the same prompts and
seeds: naive PTQ, Q-Diffusion (AdaRound + LSQ), PTQD (Q-Diffusion + noise
correction), Q-Diffusion + PCR progressive calibration, Q-Diffusion + PCR
relaxing. Columns: whole-UNet noise-prediction relative error on held-out
calibration data, PSNR / SSIM / FID (low-rank Inception features, `--fid-dims`)
of the final images to the FP images, calibration wall time. Also: held-out
per-block MSE of AdaRound vs round-to-nearest, wall time per block, and the
time of one AdaRound iteration in the Lightning structure vs a plain PyTorch
loop (modes alternated, medians).

AdaRound runs once per weight bit-width and is shared by every row and
activation setting: in Q-Diffusion's recipe (pipeline/calibration/qdiff.py)
the weight phase sees FP unit inputs with the unit's activation quantization
off, so its result does not depend on the activation setting. The weights
phase runs as `calibrate_qdiff` at A32 without LSQ; each setting then runs
`calibrate_qdiff` with the learned weights and no AdaRound (activation ranges
+ LSQ). A setting's calibration time is the sum of both (an upper bound of
one run: the unit inputs are captured twice).

Calibration data and reconstruction progress live in `--work` (default
runs/bench/calibration_<model>_work): a rerun with the same settings resumes
there (finished units are not recomputed; their recorded times are kept).

Usage: python benchmarks/calibration.py [--model embedded] [--settings 4/8,4/16] [--iters-w 300]
Smoke: python benchmarks/calibration.py --model tiny-random --iters-w 20 --iters-a 5 --n-images 8"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.prompts import load_prompts  # noqa: E402
from pipeline.calibration.analysis import adaround_gains, eps_relative_error, reference_outputs  # noqa: E402
from pipeline.calibration.blocks import reconstruction_units, unit_layers  # noqa: E402
from pipeline.calibration.data import CalibrationData, collect  # noqa: E402
from pipeline.calibration.naive import calibrate_naive  # noqa: E402
from pipeline.calibration.pcr import apply_relaxing, calibrate_progressive  # noqa: E402
from pipeline.calibration.ptqd import apply_ptqd, ptqd_statistics  # noqa: E402
from pipeline.calibration.qdiff import calibrate_qdiff, capture_unit_io, learn_adaround_weights  # noqa: E402
from pipeline.calibration.reconstruction import Phase, fit_unit, rec_loss  # noqa: E402
from pipeline.metrics import min_images  # noqa: E402
from pipeline.metrics.fidelity import fidelity_to_fp  # noqa: E402
from pipeline.metrics.frechet import frechet_from_features  # noqa: E402
from pipeline.metrics.inception import inception_features  # noqa: E402
from pipeline.models import load_pipeline  # noqa: E402
from pipeline.quant import QuantConfig, get_bit_policy, quantize_unet, set_bit_policy, set_quant_state  # noqa: E402
from pipeline.quant.adaround import BetaSchedule, rounding_regularizer  # noqa: E402
from pipeline.quant.state import assign_quantizer_tensors  # noqa: E402
from pipeline.sampling import generate  # noqa: E402

NO_PROGRESS = {"enable_progress_bar": False}
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Bench:
    """What every row shares: arguments, FP model, data, prompts, FP references."""

    a: argparse.Namespace
    work: Path
    fp: object  # the FP pipeline
    prompts: list[str]  # calibration prompts
    data: CalibrationData  # calibration data (train)
    held: CalibrationData  # held-out calibration data (other prompts and seeds)
    held_fp: list[torch.Tensor]  # FP noise predictions on `held`
    eval_prompts: list[str]
    seeds: list[int]
    fp_images: np.ndarray
    fp_features: torch.Tensor | None  # Inception features of the FP images (None: too few images for FID)

    def load(self):
        return load_pipeline(self.a.model)

    def qconfig(self, w_bits: int, a_bits: int, **kw) -> QuantConfig:
        """Q-Diffusion's quantizers (L_p inits, AdaRound weights) at this schedule."""
        base = dict(w_bits=w_bits, a_bits=a_bits, n_steps=self.a.steps, weight_rounding="adaround",
                    weight_init="lp", act_init="lp")
        return QuantConfig(**{**base, **kw})


def setup(a) -> Bench:
    torch.manual_seed(0)
    work = Path(a.work or f"runs/bench/calibration_{a.model.replace('/', '_')}_work")
    source = "world" if a.model == "embedded" else "builtin"
    prompts = load_prompts(source, limit=a.cali_n, split="train")
    held_prompts = load_prompts(source, limit=a.held_n, split="test")
    val = load_prompts(source, limit=a.n_images, split="val")
    eval_prompts = [val[i % len(val)] for i in range(a.n_images)]  # cycled with new seeds when too few prompts
    seeds = list(range(a.n_images))
    fp = load_pipeline(a.model)
    collect(fp, prompts, work / "cali", steps=a.steps, cali_st=a.cali_st, guidance=a.guidance, batch_size=8)
    collect(fp, held_prompts, work / "held", steps=a.steps, cali_st=a.cali_st, guidance=a.guidance, batch_size=8,
            seed=1)
    held = CalibrationData(work / "held")
    held_fp = reference_outputs(fp.unet, held.unet_calls())
    fp_images = sample(fp, eval_prompts, seeds, a)
    fp_features = None
    if a.n_images >= min_images(a.fid_dims):
        fp_features = inception_features(fp_images, batch=16, tap=a.fid_dims)
    return Bench(a, work, fp, prompts, CalibrationData(work / "cali"), held, held_fp, eval_prompts, seeds,
                 fp_images, fp_features)


# -- measurements -------------------------------------------------------------
def sample(pipe, prompts, seeds, a) -> np.ndarray:
    return generate(pipe, prompts, seeds, steps=a.steps, guidance=a.guidance, batch_size=16, progress=False)


def measure(pipe, b: Bench) -> dict:
    """UNet error on the held-out calibration calls, then images of the eval prompts and seeds vs the FP images."""
    row = {"unet_rel_error": eps_relative_error(pipe.unet, b.held.unet_calls(), b.held_fp)}
    images = sample(pipe, b.eval_prompts, b.seeds, b.a)
    row.update({f"{k}_to_fp": v for k, v in fidelity_to_fp(b.fp_images, images).items()})
    row["fid_to_fp"] = None
    if b.fp_features is not None:
        evaluated = inception_features(images, batch=16, tap=b.a.fid_dims)
        row["fid_to_fp"] = frechet_from_features(b.fp_features, evaluated)
    return row


def time_stats(seconds: dict[str, float]) -> dict:
    vals = list(seconds.values())
    slowest = max(seconds, key=seconds.get)
    return {"calibration_s": sum(vals), "s_per_block_mean": float(np.mean(vals)),
            "s_per_block_median": float(np.median(vals)), "s_per_block_max": seconds[slowest],
            "slowest_block": slowest, "n_blocks": len(vals)}


# -- shared AdaRound weights ----------------------------------------------------
def adaround_weights(b: Bench, w_bits: int) -> dict:
    """Q-Diffusion's weight phase alone (A32, no LSQ); returns the learned weight-quantizer tensors,
    per-block MSE (held-out items) of AdaRound vs round-to-nearest and seconds per block."""
    pipe = b.load()
    quantize_unet(pipe.unet, b.qconfig(w_bits, 32, a_bit_options=[32]))
    tensors, units = learn_adaround_weights(pipe.unet, b.data, b.work / f"weights_w{w_bits}", b.a.iters_w,
                                            w_lr=b.a.w_lr, trainer_kwargs=NO_PROGRESS)
    gains, stats = adaround_gains(units)
    return {"tensors": tensors, "units": units, "gains": gains, "stats": stats,
            "seconds": {n: m["seconds"] for n, m in units.items()}}


def with_weights(b: Bench, weights: dict, qcfg: QuantConfig):
    """A fresh pipeline quantized with `qcfg`, holding the shared AdaRound weights."""
    pipe = b.load()
    quantize_unet(pipe.unet, qcfg)
    assign_quantizer_tensors(pipe.unet, weights["tensors"])
    return pipe


# -- one function per row kind ----------------------------------------------------
def naive_row(b: Bench, w_bits: int, a_bits: int) -> dict:
    pipe = b.load()
    t0 = time.time()
    calibrate_naive(pipe, QuantConfig(w_bits=w_bits, a_bits=a_bits, n_steps=b.a.steps), b.prompts, b.a.steps,
                    b.a.guidance, trainer_kwargs=NO_PROGRESS)
    return {**measure(pipe, b), "calibration_s": time.time() - t0}


def qdiff_row(b: Bench, w_bits: int, a_bits: int, weights: dict, relax_bits: int):
    """Activation ranges + LSQ on top of the shared AdaRound weights. The relaxed bit-width is one
    more bit option (its quantizers calibrated too; the policy stays at a_bits); returns (pipe, row)."""
    options = sorted({a_bits, relax_bits})
    pipe = with_weights(b, weights, b.qconfig(w_bits, a_bits, a_bit_options=options))
    units = calibrate_qdiff(pipe.unet, b.data, b.work / f"acts_w{w_bits}a{a_bits}", 0, b.a.iters_a,
                            trainer_kwargs=NO_PROGRESS)
    act_s = {n: m["seconds"] for n, m in units.items()}
    per_block = {n: weights["seconds"][n] + act_s[n] for n in act_s}
    row = {**measure(pipe, b), **time_stats(per_block), "adaround_s": sum(weights["seconds"].values()),
           "activation_s": sum(act_s.values()), **weights["stats"], "a_bit_options": options,
           "seconds_per_block": {n: {"adaround": weights["seconds"][n], "activations": act_s[n]} for n in act_s}}
    return pipe, row


def ptqd_row(b: Bench, qdiff_pipe, qdiff: dict) -> dict:
    t0 = time.time()
    stats = ptqd_statistics(qdiff_pipe.unet, b.data)
    seconds = time.time() - t0
    handle = apply_ptqd(qdiff_pipe.unet, stats)
    try:
        row = measure(qdiff_pipe, b)
    finally:
        handle.remove()
    return {**row, "calibration_s": qdiff["calibration_s"] + seconds, "ptqd_s": seconds,
            "k_t": stats["ptqd_k"].tolist(), "k_t_raw": stats["ptqd_k_raw"].tolist(),
            "bias_abs_mean": float(stats["ptqd_bias"].abs().mean())}


def progressive_row(b: Bench, w_bits: int, a_bits: int, weights: dict) -> dict:
    """Time-aware activation quantizers set step by step on quantized trajectories (PCR): the shared
    AdaRound weights, then per step range init + LSQ step sizes (--iters-a spread over the steps), as
    the calibrate stage's --progressive does."""
    pipe = with_weights(b, weights, b.qconfig(w_bits, a_bits, time_aware=True))
    t0 = time.time()
    calibrate_progressive(pipe, b.prompts, b.a.steps, b.a.guidance, iters_a=b.a.iters_a, trainer_kwargs=NO_PROGRESS)
    seconds = time.time() - t0
    return {**measure(pipe, b), "progressive_s": seconds,
            "calibration_s": sum(weights["seconds"].values()) + seconds}


def relax_row(b: Bench, qdiff_pipe, qdiff: dict, relax_bits: int) -> dict:
    saved = get_bit_policy(qdiff_pipe.unet)
    steps = apply_relaxing(qdiff_pipe.unet, b.a.relax_tau, relax_bits, b.a.relax_end)
    try:
        row = measure(qdiff_pipe, b)
    finally:
        set_bit_policy(qdiff_pipe.unet, saved)
    return {**row, "calibration_s": qdiff["calibration_s"], "relax_bits": relax_bits, "relaxed_steps": steps}


# -- Lightning vs plain AdaRound iteration ------------------------------------------
def plain_adaround(unit, layers, items, iters: int) -> None:
    """The same math as UnitReconstruction's weight phase in a bare PyTorch loop."""
    opt = torch.optim.Adam([layer.w_quant.alpha for layer in layers], lr=1e-3)
    beta = BetaSchedule(iters)
    for it in range(iters):
        item = items[it % len(items)]
        out = unit(*item["args"], **item["kwargs"])
        loss = rec_loss(out[0] if isinstance(out, tuple) else out, item["out"])
        bt, active = beta(it)
        if active:
            loss = loss + 0.01 * sum(rounding_regularizer(layer.w_quant.alpha, bt) for layer in layers)
        opt.zero_grad()
        loss.backward()
        opt.step()


def iteration_times(b: Bench, w_bits: int, iters: int, rounds: int) -> dict:
    """Seconds per AdaRound iteration on one ResNet block, Lightning fit (Trainer set-up included)
    vs plain loop: one warm-up each, then `rounds` rounds alternating which mode goes first; medians."""
    pipe = b.load()
    unet = quantize_unet(pipe.unet, b.qconfig(w_bits, 32, a_bit_options=[32]))
    name = next(n for n in reconstruction_units(unet) if n.endswith("resnets.0"))
    unit = reconstruction_units(unet)[name]
    items = capture_unit_io(unet, unit, b.data)
    layers = unit_layers(unit)
    for p in unit.parameters():
        p.requires_grad_(False)
    set_quant_state(unet, True, False)

    def run(mode: str) -> float:
        for layer in layers:
            layer.w_quant.start_learning_rounding(layer.weight)
        t = time.perf_counter()
        if mode == "lightning":
            fit_unit(unit, unet.quant_context, items, [Phase("weight", iters)], 1e-3, NO_PROGRESS, 0, name)
        else:
            plain_adaround(unit, layers, items, iters)
        seconds = (time.perf_counter() - t) / iters
        for layer in layers:
            layer.w_quant.finish_learning_rounding()
        return seconds

    run("plain"), run("lightning")  # warm-up
    times = {"plain": [], "lightning": []}
    for r in range(rounds):
        for mode in (("plain", "lightning") if r % 2 == 0 else ("lightning", "plain")):
            times[mode].append(run(mode))
    med = {m: statistics.median(v) for m, v in times.items()}
    ratios = [li / p for li, p in zip(times["lightning"], times["plain"])]
    return {"block": name, "iters_per_run": iters, "rounds": rounds, "seconds": times,
            "plain_median_s": med["plain"], "lightning_median_s": med["lightning"],
            "ratio_of_medians": med["lightning"] / med["plain"], "median_of_round_ratios": statistics.median(ratios)}


# -- report ---------------------------------------------------------------------------
def fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def table(title: str, rows: dict, a) -> str:
    fid_h = f"FID to FP ({a.fid_dims}-d)"
    lines = [f"### {title}", "",
             f"| method | UNet rel. error (held-out) | PSNR to FP (dB) | SSIM to FP | {fid_h} | calibration (s) |",
             "|---|---|---|---|---|---|"]
    for k, r in rows.items():
        lines.append(f"| {k} | {r['unet_rel_error']:.4f} | {r['psnr_to_fp']:.2f} | {r['ssim_to_fp']:.4f} | "
                     f"{fmt(r['fid_to_fp'], '.3f')} | {r['calibration_s']:.0f} |")
    q = rows["qdiff"]
    lines += ["", f"Block MSE, AdaRound vs round-to-nearest (held-out items): mean reduction "
              f"{q['block_mse_reduction_mean']:.1%}, median {q['block_mse_reduction_median']:.1%}, "
              f"min {q['block_mse_reduction_min']:.1%}; >= 30% on {q['blocks_with_30pct_reduction']} blocks.",
              f"qdiff calibration: {q['calibration_s']:.0f} s total = AdaRound {q['adaround_s']:.0f} s (shared by all "
              f"rows) + activations {q['activation_s']:.0f} s; per block mean {q['s_per_block_mean']:.1f} s, "
              f"median {q['s_per_block_median']:.1f} s, max {q['s_per_block_max']:.1f} s ({q['slowest_block']}), "
              f"{q['n_blocks']} blocks."]
    if a.fid_dims and rows["qdiff"]["fid_to_fp"] is None:
        lines.append(f"FID to FP: n/a, {a.fid_dims}-d features need >= {min_images(a.fid_dims)} images "
                     f"(--n-images {a.n_images}).")
    return "\n".join(lines)


def parse_settings(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.split("/")) for s in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--settings", default="4/8,4/16", help="comma-separated W/A pairs")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--cali-n", type=int, default=16)
    ap.add_argument("--cali-st", type=int, default=5)
    ap.add_argument("--held-n", type=int, default=8, help="held-out prompts (test split) for the UNet error")
    ap.add_argument("--iters-w", type=int, default=300)
    ap.add_argument("--iters-a", type=int, default=50)
    ap.add_argument("--w-lr", type=float, default=1e-2, help="1e-3 is the 20k-iteration default")
    ap.add_argument("--relax-tau", type=float, default=0.2)
    ap.add_argument("--relax-bits", type=int, default=10, help="raised to 32 where not above the setting's a-bits")
    ap.add_argument("--relax-end", default="x0")
    ap.add_argument("--n-images", type=int, default=80, help="eval images (FID needs > --fid-dims)")
    ap.add_argument("--fid-dims", type=int, default=64, help="Inception pool tap: 64 | 192 | 768 | 2048")
    ap.add_argument("--timing-iters", type=int, default=None,
                    help="AdaRound iterations per timed run (default --iters-w: the Trainer set-up is amortized "
                         "as in a real run)")
    ap.add_argument("--timing-rounds", type=int, default=5)
    ap.add_argument("--work", default=None, help="calibration data + progress (resumable); "
                    "default runs/bench/calibration_<model>_work")
    ap.add_argument("--out", default=None, help="default runs/bench/calibration_<model>.json")
    ap.add_argument("--publish", default=None,
                    help="also copy the JSON here (default for --model embedded: "
                         "benchmarks/results/calibration_embedded.json)")
    a = ap.parse_args()
    settings = parse_settings(a.settings)
    t_start = time.time()
    out = Path(a.out or f"runs/bench/calibration_{a.model.replace('/', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    b = setup(a)
    report = {"args": vars(a), "resumed": sorted(str(p.parent.relative_to(b.work))
                                                 for p in b.work.glob("*/progress.json")), "results": {}}
    weights = {w: adaround_weights(b, w) for w in sorted({w for w, _ in settings})}
    report["units_weights"] = {w: {"units": v["units"], "gains": v["gains"]} for w, v in weights.items()}
    for w, abits in settings:
        relax_bits = a.relax_bits if a.relax_bits > abits else 32
        rows = {"naive": naive_row(b, w, abits)}
        qpipe, rows["qdiff"] = qdiff_row(b, w, abits, weights[w], relax_bits)
        rows["ptqd"] = ptqd_row(b, qpipe, rows["qdiff"])
        rows["qdiff+progressive"] = progressive_row(b, w, abits, weights[w])
        rows[f"qdiff+relax(tau={a.relax_tau},A{relax_bits},{a.relax_end})"] = relax_row(b, qpipe, rows["qdiff"],
                                                                                       relax_bits)
        report["results"][f"W{w}A{abits}"] = rows
        out.write_text(json.dumps(report, indent=1))  # what is done survives a kill
        print(table(f"{a.model}, W{w}A{abits}: {a.steps} steps, {a.iters_w} AdaRound + {a.iters_a} LSQ iterations, "
                    f"{a.n_images} images", rows, a), flush=True)
    timing = report["iteration"] = iteration_times(b, settings[0][0], a.timing_iters or a.iters_w,
                                                         a.timing_rounds)
    print(f"\nAdaRound iteration on {timing['block']} ({timing['rounds']} alternated rounds of "
          f"{timing['iters_per_run']} iterations, medians): Lightning {timing['lightning_median_s'] * 1e3:.1f} ms vs "
          f"plain {timing['plain_median_s'] * 1e3:.1f} ms, ratio {timing['ratio_of_medians']:.2f} "
          f"(median of per-round ratios {timing['median_of_round_ratios']:.2f})")
    report["total_s"] = time.time() - t_start
    out.write_text(json.dumps(report, indent=1))
    print(f"JSON -> {out} ({report['total_s']:.0f} s in all)")
    publish = a.publish or (RESULTS / "calibration_embedded.json" if a.model == "embedded" else None)
    if publish:
        shutil.copyfile(out, publish)
        print(f"copied -> {publish}")

if __name__ == "__main__":
    main()
