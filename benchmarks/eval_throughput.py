"""QDiffBench evaluation throughput (issue: evaluation): images/s of the whole
evaluation on the default model, FP and fake-quantized (naive W8A8), and the
share of time spent generating vs in metrics (Inception taps for FID/sFID,
PSNR/SSIM, CLIP when available). One process.

Usage: python benchmarks/eval_throughput.py [--n 16 --images-per-prompt 5 --steps 10]
       [--quant-state DIR] [--threads 1] [--out runs/bench/eval_throughput.json]"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.prompts import load_prompts  # noqa: E402
from pipeline.api import CalibrateConfig, calibrate  # noqa: E402
from pipeline.evaluation import EvalSettings, load_split, method_from_state, run_evaluation, validate  # noqa: E402
from pipeline.evaluation.plan import pick_fid_dims, pick_sfid_grid  # noqa: E402
from pipeline.metrics.clip import ClipUnavailable, resolve_clip  # noqa: E402
from pipeline.models import EMBEDDED, default_model  # noqa: E402

CPU = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


def make_w8a8_state(model: str, steps: int, work: Path) -> Path:
    """Naive W8A8 calibrated by the calibrate stage on 4 train prompts (the world's of seed 1, handed over
    as a prompt file so that the stage's own seed stays 0); returns the state folder."""
    prompts = load_prompts("world" if model == EMBEDDED else "builtin", limit=4, split="train", seed=1)
    work.mkdir(parents=True, exist_ok=True)
    listed = work / "prompts.txt"
    listed.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    cfg = CalibrateConfig(model=model, method="naive", w_bits=8, a_bits=8, steps=steps, guidance=5.0,
                          prompts=str(listed), cali_n=4, batch_size=4, run_dir=str(work))
    return calibrate(cfg, trainer=CPU)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: the embedded world if present, else tiny-random")
    ap.add_argument("--quant-state", default=None, help="a calibrate output folder (default: calibrate W8A8 here)")
    ap.add_argument("--n", type=int, default=16, help="prompts")
    ap.add_argument("--images-per-prompt", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-sfid", action="store_true", help="skip sFID (its tap needs the Inception to mixed_6)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/bench/eval_throughput.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = a.model or default_model()
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(a.quant_state) if a.quant_state else make_w8a8_state(model, a.steps, Path(tmp) / "w8a8")
        split = load_split("in_domain", "world:val" if model == EMBEDDED else "builtin", a.n,
                           a.images_per_prompt, seed=0)
        try:
            clip = str(resolve_clip("auto"))
        except ClipUnavailable:
            clip = None
        sfid_grid = None if a.no_sfid else pick_sfid_grid("auto", split.n_images)
        settings = EvalSettings(steps=a.steps, guidance=5.0, fid_dims=pick_fid_dims("auto", split.n_images),
                                sfid=sfid_grid is not None, sfid_grid=sfid_grid or 17, clip_path=clip)
        method = method_from_state(state)
        validate(model, [method], [split], settings)
        t0 = time.perf_counter()
        res = run_evaluation(model, [method], [split], settings, a.batch_size, CPU)
        total = time.perf_counter() - t0
    rows = []
    for r in res["rows"]:
        wall = res["wall_seconds"][r["method"]]
        rows.append({"method": r["method"], "bit_options": r["bit_options"], "images": r["n_images"],
                     "wall_s": wall, "images_per_s": r["n_images"] / wall,
                     "generate_s_per_image": r["seconds_per_image"],
                     "metric_s_per_image": r["metric_seconds_per_image"], "generate_share": r["generate_share"],
                     "fid_to_fp": r["fid_to_fp"], "sfid_to_fp": r["sfid_to_fp"]})
    print(f"model={model} steps={a.steps} images={split.n_images} threads={torch.get_num_threads()} "
          f"FID dims={settings.fid_dims} sFID grid={settings.sfid_grid if settings.sfid else 'off'} "
          f"CLIP={'on' if clip else 'off'}")
    print("| method | bits | images | wall (s) | images/s | generate s/img | metrics s/img | generate share |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['bit_options']} | {r['images']} | {r['wall_s']:.1f} | {r['images_per_s']:.2f} | "
              f"{r['generate_s_per_image']:.3f} | {r['metric_s_per_image']:.3f} | {r['generate_share']:.0%} |")
    print("wall includes loading the pipeline and the per-method setup; the shares cover predict_step only")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"model": model, "steps": a.steps, "threads": torch.get_num_threads(),
                                       "settings": vars(settings), "total_seconds": total, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
