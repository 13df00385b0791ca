"""What the deployable runtimes cost in image quality (issue 20): on the embedded world, a naive calibration at
--w-bits / --a-bits with asymmetric and with symmetric weights (`--weight-symmetric`), each generated three ways:
fake-quant, the real fp32 runtime (`load_unet`, the fake-quant arithmetic) and the real bf16 runtime
(`load_unet(dtype="bf16")`). Every image is scored by PSNR to the FP model's image of the same prompt and seed;
paired differences (mean, 95% bootstrap interval over prompts, Wilcoxon p) for symmetric - asymmetric and
bf16 runtime - fp32 runtime. Writes benchmarks/results/deploy_quality.json.

    python benchmarks/deploy_quality.py                       # W8A8, 24 test prompts, 10 steps
    python benchmarks/deploy_quality.py --n 4 --steps 2 --out /tmp/q.json   # a quick check
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.prompts import draw_prompts, parse_fractions  # noqa: E402
from pipeline.api import CalibrateConfig, ExportConfig, calibrate, export  # noqa: E402
from pipeline.artifacts import write_json_atomic  # noqa: E402
from pipeline.deploy import attach  # noqa: E402
from pipeline.deploy.timing import psnr_per_image  # noqa: E402
from pipeline.evaluation.statistics import paired_difference  # noqa: E402
from pipeline.models import load_pipeline  # noqa: E402
from pipeline.quant import load_quantized  # noqa: E402
from pipeline.sampling import generate  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "deploy_quality.json"
GRIDS = {"asymmetric": False, "symmetric": True}
RUNTIMES = ("fake", "fp32", "bf16")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--w-bits", type=int, default=8)
    parser.add_argument("--a-bits", type=int, default=8)
    parser.add_argument("--n", type=int, default=24, help="world test prompts (one image each)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--work", default="runs/bench/deploy_quality", help="run directories of the calibrations")
    parser.add_argument("--out", default=str(OUT))
    a = parser.parse_args(argv)
    start = time.time()
    prompts = draw_prompts("world", "test", a.n, parse_fractions("0.8,0.1,0.1"), seed=0).prompts
    fp = generate(load_pipeline("embedded"), prompts, steps=a.steps, progress=False)
    psnr = {}
    for grid, symmetric in GRIDS.items():
        run = Path(a.work) / f"w{a.w_bits}a{a.a_bits}_{grid}"
        state = calibrate(CalibrateConfig(run_dir=str(run), method="naive", w_bits=a.w_bits, a_bits=a.a_bits,
                                          weight_symmetric=symmetric, steps=a.steps, overwrite=True),
                          trainer={"enable_progress_bar": False})
        export(ExportConfig(quant_state=str(state), run_dir=str(run), overwrite=True))
        fake = load_pipeline("embedded")
        load_quantized(fake.unet, state)
        psnr[f"{grid}_fake"] = psnr_per_image(fp, generate(fake, prompts, steps=a.steps, progress=False))
        for dtype in ("fp32", "bf16"):
            pipe = attach(load_pipeline("embedded"), run / "deploy", "onednn", dtype=dtype)
            psnr[f"{grid}_{dtype}"] = psnr_per_image(fp, generate(pipe, prompts, steps=a.steps, progress=False))
    pairs = {f"symmetric-asymmetric_{r}": (f"symmetric_{r}", f"asymmetric_{r}") for r in RUNTIMES}
    pairs.update({f"bf16-fp32_{g}": (f"{g}_bf16", f"{g}_fp32") for g in GRIDS})
    result = {"setting": vars(a) | {"prompts": len(prompts)}, "seconds": time.time() - start,
              "psnr_to_fp_mean_db": {k: float(v.mean()) for k, v in psnr.items()},
              "psnr_to_fp_db": {k: v.tolist() for k, v in psnr.items()},
              "paired": {k: paired_difference(psnr[x], psnr[y]) for k, (x, y) in pairs.items()}}
    for k, v in result["psnr_to_fp_mean_db"].items():
        print(f"{k:22s} {v:6.2f} dB")
    for k, d in result["paired"].items():
        print(f"{k:28s} {d['mean_diff']:+.2f} dB [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}] p {d['p_wilcoxon']:.2g}")
    write_json_atomic(Path(a.out), copy.deepcopy(result))
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
