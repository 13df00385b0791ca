"""Analyses of a trained QLIP (T2Q + Q2B) behind the Q2B benchmark: FAB by
caption richness, FAB against batch size, the per-prompt overhead of choosing
bits, and Q2B's storage at paper scale. `qlip` is a `QLIPPipeline`."""
from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch
from torch import nn

from pipeline.models import meta_unet
from pipeline.sampling import encode_prompts, generate
from pipeline.world.richness import richness_series


def richness_fab(qlip, n_scenes: int = 64, seed: int = 0) -> dict:
    """Caption series of the world's validation scenes at richness 0..4 -> predicted quality q and FAB:
    per-level means and the first four series in full."""
    series = richness_series(n_scenes, seed, split="val")
    flat = [c for s in series for c in s]
    q = qlip.quality_source.predict(flat).float()
    fab = qlip.fab_of(qlip.q2b(q))
    q, fab = q.reshape(n_scenes, 5), fab.reshape(n_scenes, 5)
    return {"mean_q": q.mean(0).tolist(), "mean_fab": fab.mean(0).tolist(),
            "examples": [{"captions": series[i], "q": q[i].tolist(), "fab": fab[i].tolist()} for i in range(4)]}


def batch_size_fab(qlip, prompts: Sequence[str], sizes=(1, 2, 4, 8, 16, 32), seed: int = 0) -> dict[int, float]:
    """Mean FAB per image when random batches of each size take the max bits over their prompts."""
    q = qlip.quality_source.predict(prompts).float()
    tables = qlip.q2b(q)
    perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))
    out = {}
    for bs in sizes:
        fabs = [float(qlip.fab_of(tables[perm[i:i + bs]].amax(0))) * len(perm[i:i + bs])
                for i in range(0, len(perm), bs)]
        out[bs] = sum(fabs) / len(perm)
    return out


def bits_overhead(qlip, prompt: str, steps: int, repeats: int = 5) -> dict:
    """Quality + Q2B + policy switch for one prompt vs one generation (batch 1), medians.

    When the T2Q reads the pipeline's own text encoder, its CLIP pass is the one generation
    makes anyway (`QLIPPipeline.__call__` shares it): that pass is timed and reported but
    not counted as overhead; otherwise the quality source's own encoding is counted."""
    t_text, t_bits, t_gen = [], [], []
    generate(qlip.pipe, [prompt], [0], steps=steps, progress=False)  # warm-up
    for _ in range(repeats):
        t = time.perf_counter()
        pooled = encode_prompts(qlip.pipe, [prompt]).pooled
        t_text.append(time.perf_counter() - t)
        t = time.perf_counter()
        qlip.set_bits([prompt], pooled=pooled)
        t_bits.append(time.perf_counter() - t)
        t = time.perf_counter()
        generate(qlip.pipe, [prompt], [0], steps=steps, progress=False)
        t_gen.append(time.perf_counter() - t)
    bits, gen = statistics.median(t_bits), statistics.median(t_gen)
    return {"t2q_q2b_s": bits, "generation_s": gen, "ratio": bits / gen,
            "text_encoder_shared": qlip.shares_text_encoder, "shared_text_pass_s": statistics.median(t_text)}


def q2b_bytes_at_scale(model: str = "bk-sdm-tiny", steps: int = 25) -> dict:
    """Q2B storage for a reference UNet's layers (meta device) at bit options {8,16,32}: fp16 tables of a gate
    scale and bias per layer and a low and a high logit per layer and step. BK-SDM-Tiny at 25 steps compares
    with the paper's 12.1 KB."""
    n = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in meta_unet(model).modules())
    return {"layers": n, "steps": steps, "bytes": 2 * (2 * n + 2 * n * steps)}
