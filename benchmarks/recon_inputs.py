"""Q-Diffusion's reconstruction inputs: quantized upstream (the default, as Q-Diffusion's and BRECQ's
`save_inp_oup_data(..., asym=True)`) against FP inputs, at W4A8 on one model.

Both runs share the calibration data, the seed and every setting; only `recon_inputs` differs. Measured:
the whole-UNet noise-prediction relative error on held-out prompts (test split, own seeds), overall and per
held-out UNet call. Those are paired (the same call for both), so the table gives the mean paired difference
with a 95% bootstrap interval, and which way it fell.

    python benchmarks/recon_inputs.py                       # embedded world, W4A8, 300 AdaRound iterations
    python benchmarks/recon_inputs.py --iters-w 100 --iters-a 20   # what results/recon_inputs.json holds
    python benchmarks/recon_inputs.py --model tiny-random --iters-w 10 --iters-a 5   # smoke"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.prompts import load_prompts  # noqa: E402
from pipeline.calibration.analysis import eps_relative_error, reference_outputs  # noqa: E402
from pipeline.calibration.data import CalibrationData, collect  # noqa: E402
from pipeline.calibration.qdiff import RECON_INPUTS, calibrate_qdiff  # noqa: E402
from pipeline.models import load_pipeline  # noqa: E402
from pipeline.quant import QuantConfig, quantize_unet  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cali-n", type=int, default=16)
    ap.add_argument("--cali-st", type=int, default=5)
    ap.add_argument("--held-n", type=int, default=16)
    ap.add_argument("--iters-w", type=int, default=300)
    ap.add_argument("--iters-a", type=int, default=50)
    ap.add_argument("--w-lr", type=float, default=1e-2)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "recon_inputs.json"))
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    work = Path(a.work or f"runs/bench/recon_inputs_{a.model.replace('/', '_')}")
    source = "world" if a.model == "embedded" else "builtin"
    fp = load_pipeline(a.model)
    collect(fp, load_prompts(source, limit=a.cali_n, split="train"), work / "cali", steps=a.steps,
            cali_st=a.cali_st, batch_size=8)
    collect(fp, load_prompts(source, limit=a.held_n, split="test"), work / "held", steps=a.steps,
            cali_st=a.cali_st, batch_size=8, seed=1)
    held = CalibrationData(work / "held")
    refs = reference_outputs(fp.unet, held.unet_calls())
    rows = {}
    for mode in RECON_INPUTS:
        pipe = load_pipeline(a.model)
        quantize_unet(pipe.unet, QuantConfig(w_bits=a.w_bits, a_bits=a.a_bits, n_steps=a.steps,
                                             weight_rounding="adaround", weight_init="lp", act_init="lp"))
        t0 = time.time()
        calibrate_qdiff(pipe.unet, CalibrationData(work / "cali"), work / f"partial_{mode}", a.iters_w, a.iters_a,
                        w_lr=a.w_lr, recon_inputs=mode, trainer_kwargs={"enable_progress_bar": False})
        seconds = time.time() - t0
        per_call = [eps_relative_error(pipe.unet, [c], [r]) for c, r in zip(held.unet_calls(), refs)]
        rows[mode] = {"unet_rel_error": eps_relative_error(pipe.unet, held.unet_calls(), refs),
                      "per_call": per_call, "calibration_seconds": seconds}
    diff = np.array(rows["quantized"]["per_call"]) - np.array(rows["fp"]["per_call"])
    rng = np.random.default_rng(0)
    boot = [rng.choice(diff, len(diff)).mean() for _ in range(10_000)]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    result = {"model": a.model, "setting": f"W{a.w_bits}A{a.a_bits}", "args": vars(a), "rows": rows,
              "paired": {"n_calls": len(diff), "mean_diff_quantized_minus_fp": float(diff.mean()),
                         "ci95": [float(lo), float(hi)], "quantized_lower_in": int((diff < 0).sum())},
              "torch_threads": torch.get_num_threads()}
    print("| recon inputs | whole-UNet rel. error (held out) | calibration s |\n|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['unet_rel_error']:.4f} | {r['calibration_seconds']:.0f} |")
    p = result["paired"]
    print(f"paired over {p['n_calls']} held-out UNet calls: quantized - fp = {p['mean_diff_quantized_minus_fp']:+.4f} "
          f"(95% CI {lo:+.4f} .. {hi:+.4f}); quantized lower in {p['quantized_lower_in']} of {p['n_calls']}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
