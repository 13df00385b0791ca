"""Seconds per image, fake-quant against the deployed UNet, on the same prompts and seeds: what the demo reports
beside its evaluation table. `run(prompts) -> uint8 images [N, H, W, 3]` is any generation call (a pipeline's
`generate`, a QLIPPipeline); each side is warmed up on one prompt first (first-call allocations, lazy kernel
set-up), then the two are timed in turn, so that a load that comes and goes on a shared machine hits both."""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

Run = Callable[[list[str]], np.ndarray]


def psnr_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR (dB) of each uint8 image of `b` to its twin in `a`; identical images count as 100 dB."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return np.where(mse > 0, 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12)), 100.0)


def compare_generation(fake: Run, real: Run, prompts: Sequence[str], rounds: int = 2) -> dict:
    """s / image of `fake` and `real` (the faster of `rounds` interleaved passes over `prompts`, each side) and
    the real images' PSNR to the fake ones."""
    prompts = list(prompts)
    fake(prompts[:1]), real(prompts[:1])  # warm-up, not timed
    best = {"fake": float("inf"), "real": float("inf")}
    images = {}
    for _ in range(rounds):
        for side, run in (("fake", fake), ("real", real)):
            t0 = time.perf_counter()
            images[side] = run(prompts)
            best[side] = min(best[side], (time.perf_counter() - t0) / len(prompts))
    psnr = psnr_per_image(images["fake"], images["real"])
    return {"n_images": len(prompts), "rounds": rounds, "fake_s_per_image": best["fake"],
            "real_s_per_image": best["real"], "speedup": best["fake"] / best["real"],
            "psnr_min": float(psnr.min()), "psnr_median": float(np.median(psnr))}
