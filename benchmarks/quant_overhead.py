"""Fake-quant W8A8 UNet forward time against FP (issue: foundation benchmark).

Models: the seeded tiny UNet at its native size, and the BK-SDM-Tiny UNet
config at 256x256 with random weights. Prints a table, writes JSON.
Usage: python benchmarks/quant_overhead.py [--out runs/bench/quant_overhead.json] [--repeats 5]"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.models import BKSDM_TINY_UNET_CONFIG, tiny_pipeline, unet_example_inputs  # noqa: E402
from pipeline.quant import QuantConfig, act_banks, observing, quantize_unet  # noqa: E402


def measure(name: str, make_unet, resolution, repeats: int, softmax_bits: int = 16) -> dict:
    """Median forward time of the FP UNet and of a W8A8 fake-quant copy,
    alternating the two so that background load hits both alike.

    softmax_bits 16 (the default) materializes every attention matrix to
    quantize it; 32 leaves the probabilities alone, so attention runs fused
    as in FP and the ratio isolates the cost of the layer quantizers."""
    fp_unet = make_unet().eval()
    args, kwargs = unet_example_inputs(fp_unet, batch=2, resolution=resolution, device="cpu")
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(args[0].shape, generator=g), args[1], torch.randn(args[2].shape, generator=g))
    q_unet = quantize_unet(copy.deepcopy(fp_unet), QuantConfig(w_bits=8, a_bits=8, softmax_bits=softmax_bits))
    with observing(q_unet), torch.no_grad():
        q_unet(*args, **kwargs)
    for b in act_banks(q_unet).values():
        b.finalize()
    times = {"fp": [], "q": []}
    with torch.no_grad():
        fp_unet(*args, **kwargs), q_unet(*args, **kwargs)  # warm-up (and the weight fake-quant cache)
        for _ in range(repeats):
            for key, unet in (("fp", fp_unet), ("q", q_unet)):
                t = time.perf_counter()
                unet(*args, **kwargs)
                times[key].append(time.perf_counter() - t)
    fp, q = (sorted(v)[len(v) // 2] for v in (times["fp"], times["q"]))
    return {"model": name, "resolution": resolution, "softmax_bits": softmax_bits, "fp_s": fp, "w8a8_s": q,
            "ratio": q / fp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench/quant_overhead.json")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-bksdm", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    from diffusers import UNet2DConditionModel

    rows = []
    for sm in (16, 32):
        rows.append(measure("tiny-random", lambda: tiny_pipeline(0).unet, None, a.repeats, sm))
        if not a.skip_bksdm:
            rows.append(measure("bk-sdm-tiny (random)", lambda: UNet2DConditionModel(**BKSDM_TINY_UNET_CONFIG), 256,
                                a.repeats, sm))
    print(f"threads={torch.get_num_threads()}  CFG batch 2, median of {a.repeats}")
    print("| model | resolution | softmax bits | FP (s) | W8A8 fake-quant (s) | ratio (target <= 1.3) |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['resolution'] or 'native'} | {r['softmax_bits']} | {r['fp_s']:.4f} | "
              f"{r['w8a8_s']:.4f} | {r['ratio']:.2f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
