"""Calibration acceptance figures on one model (issue: calibration).

naive vs Q-Diffusion (AdaRound + LSQ) vs PTQD at the given W/A: held-out
per-block MSE (AdaRound vs round-to-nearest), whole-UNet noise-prediction
relative error on held-out calibration data, PSNR of final images to FP
images (same prompts and seeds), wall time per block, and the time of one
AdaRound iteration in the Lightning structure vs a plain PyTorch loop.
Usage: python benchmarks/calibration.py [--model embedded] [--w-bits 4 --a-bits 8] [--iters-w 300]"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.calibration import CalibrationData, collect  # noqa: E402
from data.prompts import load_prompts  # noqa: E402
from pipeline.calibration.naive import calibrate_naive  # noqa: E402
from pipeline.calibration.ptqd import apply_ptqd, ptqd_statistics  # noqa: E402
from pipeline.calibration.qdiff import calibrate_qdiff, capture_unit_io  # noqa: E402
from pipeline.calibration.reconstruction import Phase, fit_unit, rec_loss  # noqa: E402
from pipeline.calibration.blocks import reconstruction_units, unit_layers  # noqa: E402
from pipeline.models import load_pipeline  # noqa: E402
from pipeline.quant import QuantConfig, quantize_unet, set_quant_state, set_step  # noqa: E402
from pipeline.quant.adaround import BetaSchedule, rounding_regularizer  # noqa: E402
from pipeline.sampling import generate  # noqa: E402


def unet_rel_error(unet, data) -> float:
    num = den = 0.0
    with torch.no_grad():
        for step, args in data.unet_calls():
            set_step(unet, step)
            set_quant_state(unet, False, False)
            ref = unet(*args).sample
            set_quant_state(unet, True, True)
            num += float((unet(*args).sample - ref).pow(2).sum())
            den += float(ref.pow(2).sum())
    return (num / den) ** 0.5


def psnr(a, b) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def iteration_times(unet, data, name: str, iters: int = 30) -> dict:
    """One AdaRound iteration: Lightning fit vs a plain loop of the same math."""
    unit = reconstruction_units(unet)[name]
    items = capture_unit_io(unet, unit, data)
    layers = unit_layers(unit)
    set_quant_state(unet, True, False)
    times = {}
    for mode in ("plain", "lightning"):
        for l in layers:
            l.w_quant.start_learning_rounding(l.weight)
        t = time.perf_counter()
        if mode == "lightning":
            fit_unit(unit, unet.quant_context, items, [Phase("weight", iters)], 1e-3, {}, 0, name)
        else:
            opt = torch.optim.Adam([l.w_quant.alpha for l in layers], lr=1e-3)
            beta = BetaSchedule(iters)
            for it in range(iters):
                item = items[it % len(items)]
                out = unit(*item["args"], **item["kwargs"])
                loss = rec_loss(out[0] if isinstance(out, tuple) else out, item["out"])
                b, active = beta(it)
                if active:
                    loss = loss + 0.01 * sum(rounding_regularizer(l.w_quant.alpha, b) for l in layers)
                opt.zero_grad()
                loss.backward()
                opt.step()
        times[mode] = (time.perf_counter() - t) / iters
        for l in layers:
            l.w_quant.finish_learning_rounding()
    times["ratio"] = times["lightning"] / times["plain"]
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cali-n", type=int, default=16)
    ap.add_argument("--cali-st", type=int, default=5)
    ap.add_argument("--iters-w", type=int, default=300)
    ap.add_argument("--iters-a", type=int, default=50)
    ap.add_argument("--w-lr", type=float, default=1e-2, help="1e-3 is the 20k-iteration default")
    ap.add_argument("--n-images", type=int, default=16)
    ap.add_argument("--out", default="runs/bench/calibration.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="cali-bench-"))
    source = "world" if a.model == "embedded" else "builtin"
    prompts = load_prompts(source, limit=a.cali_n, split="train")
    held_prompts = load_prompts(source, limit=8, split="test")
    eval_prompts = load_prompts(source, limit=a.n_images, split="val")
    seeds = list(range(len(eval_prompts)))
    pipe = load_pipeline(a.model)
    collect(pipe, prompts, work / "cali", steps=a.steps, cali_st=a.cali_st, batch_size=8)
    collect(pipe, held_prompts, work / "held", steps=a.steps, cali_st=a.cali_st, batch_size=8, seed=1)
    data, held = CalibrationData(work / "cali"), CalibrationData(work / "held")
    fp_images = generate(pipe, eval_prompts, seeds, steps=a.steps, progress=False)
    rows = {}

    naive = load_pipeline(a.model)
    calibrate_naive(naive, QuantConfig(w_bits=a.w_bits, a_bits=a.a_bits, n_steps=a.steps), prompts, a.steps, 5.0,
                    trainer_kwargs={"enable_progress_bar": False})
    rows["naive"] = {"unet_rel_error": unet_rel_error(naive.unet, held),
                     "psnr_to_fp": psnr(generate(naive, eval_prompts, seeds, steps=a.steps, progress=False),
                                        fp_images)}

    q = load_pipeline(a.model)
    quantize_unet(q.unet, QuantConfig(w_bits=a.w_bits, a_bits=a.a_bits, n_steps=a.steps, weight_rounding="adaround",
                                      weight_init="lp", act_init="lp"))
    t0 = time.time()
    units = calibrate_qdiff(q.unet, data, work / "partial", a.iters_w, a.iters_a, w_lr=a.w_lr,
                            trainer_kwargs={"enable_progress_bar": False})
    total = time.time() - t0
    gains = [1 - m["mse_adaround"] / m["mse_rtn"] for m in units.values() if m.get("mse_rtn", 0) > 0]
    rows["qdiff"] = {"unet_rel_error": unet_rel_error(q.unet, held),
                     "psnr_to_fp": psnr(generate(q, eval_prompts, seeds, steps=a.steps, progress=False), fp_images),
                     "calibration_s": total, "s_per_block": total / len(units),
                     "block_mse_reduction_mean": float(np.mean(gains)),
                     "block_mse_reduction_median": float(np.median(gains)),
                     "blocks_with_30pct_reduction": f"{sum(g >= 0.3 for g in gains)}/{len(gains)}"}
    stats = ptqd_statistics(q.unet, data)
    handle = apply_ptqd(q.unet, stats)
    rows["ptqd"] = {"unet_rel_error": unet_rel_error(q.unet, held),
                    "psnr_to_fp": psnr(generate(q, eval_prompts, seeds, steps=a.steps, progress=False), fp_images),
                    "k_t": stats["ptqd_k"].tolist()}
    handle.remove()
    block = next(n for n in reconstruction_units(q.unet) if n.endswith("resnets.0"))
    timing = iteration_times(load_quantized_twin(a, q), data, block)

    print(f"{a.model}, W{a.w_bits}A{a.a_bits}, {a.steps} steps, {a.iters_w} AdaRound + {a.iters_a} LSQ iterations")
    print("| method | UNet rel. error (held-out) | PSNR to FP (dB) |\n|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['unet_rel_error']:.4f} | {r['psnr_to_fp']:.2f} |")
    print(f"block MSE reduction AdaRound vs RTN: mean {rows['qdiff']['block_mse_reduction_mean']:.1%}, "
          f"median {rows['qdiff']['block_mse_reduction_median']:.1%}, "
          f">=30% on {rows['qdiff']['blocks_with_30pct_reduction']} blocks")
    print(f"calibration {total:.0f} s ({rows['qdiff']['s_per_block']:.1f} s/block); AdaRound iteration on {block}: "
          f"Lightning {timing['lightning'] * 1e3:.1f} ms vs plain {timing['plain'] * 1e3:.1f} ms "
          f"(ratio {timing['ratio']:.2f})")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "rows": rows, "units": units, "iteration": timing},
                                      indent=1))


def load_quantized_twin(a, q):
    """A fresh model quantized like `q` (round-to-nearest start) for the timing runs."""
    twin = load_pipeline(a.model).unet
    return quantize_unet(twin, QuantConfig(**{**q.unet.quant_config.to_dict()}))


if __name__ == "__main__":
    main()
