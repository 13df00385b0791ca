"""Measurements of a calibrated UNet against its FP twin (the calibration
benchmarks' procedures): the relative noise-prediction error over a set of
UNet calls, AdaRound's per-unit gain over round-to-nearest, and the mixed
A8/A16 policy that keeps the most sensitive layers' activations at 16 bits."""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from pipeline.metrics.cost import fab, layer_stats
from pipeline.prediction import PredictionSpace
from pipeline.quant import activation_sensitivity, get_bit_policy, layers_to_keep_high, set_bit_policy, set_step


@torch.no_grad()
def reference_outputs(unet, calls: Iterable) -> list[torch.Tensor]:
    """The UNet's raw outputs on `calls` [(step, kwargs)] (e.g. `CalibrationData.unet_calls()`), kept as
    the references of `eps_relative_error` (run it on the FP UNet)."""
    return [unet(**call).sample for _, call in calls]


def eps_relative_error(unet, calls: Iterable, refs: Sequence[torch.Tensor],
                       space: PredictionSpace | None = None) -> float:
    """||eps - eps_ref|| / ||eps_ref|| over all UNet calls [(step, kwargs)] together, against `refs`; a step of
    None leaves the UNet's step alone (an FP or single-step UNet). Output hooks (PTQD) apply. One number for
    the whole set, unlike the per-sample squared `pipeline.qlip.train.relative_error`.

    In eps space when given the UNet's `space` (e.g. `CalibrationData.space`): outputs and references are
    converted first. Without it, the raw output (eps only on an eps-predicting model)."""
    num = den = 0.0
    with torch.no_grad():
        for (step, call), ref in zip(calls, refs):
            if step is not None:
                set_step(unet, step)
            out = unet(**call).sample
            if space is not None:
                x_t, t = call["sample"], call["timestep"]
                out, ref = space.to_eps(out, x_t, t), space.to_eps(ref, x_t, t)
            num += float((out - ref).pow(2).sum())
            den += float(ref.pow(2).sum())
    return (num / den) ** 0.5


def adaround_gains(units: dict) -> tuple[dict[str, float], dict]:
    """Per-unit held-out MSE reduction of AdaRound over round-to-nearest, 1 - mse_adaround / mse_rtn, from
    `calibrate_qdiff`'s metrics (units without a weight phase are left out), and its summary: mean, median,
    min and how many units gain at least 30%."""
    gains = {n: 1 - m["mse_adaround"] / m["mse_rtn"] for n, m in units.items() if m.get("mse_rtn", 0) > 0}
    g = list(gains.values())
    stats = {"block_mse_reduction_mean": float(np.mean(g)), "block_mse_reduction_median": float(np.median(g)),
             "block_mse_reduction_min": float(np.min(g)),
             "blocks_with_30pct_reduction": f"{sum(x >= 0.3 for x in g)}/{len(g)}"}
    return gains, stats


def mixed_a16(unet, rank_error: Callable[[], float], held_error: Callable[[], float], target: float) -> dict:
    """A8 with the most sensitive layers at A16, on a UNet with activation options {8, 16}.

    Ranks the layers by the error their 8-bit activations add alone (`rank_error()`, on ranking inputs),
    predicts the all-A8 error as the root-sum-square of the additions, keeps the fewest top-ranked layers at
    A16 whose predicted error is under 90% of `target`, and reports that policy's `held_error()` and FAB.
    The UNet is left at A8 everywhere."""
    set_bit_policy(unet, 8)
    all8 = rank_error()
    set_bit_policy(unet, 16)
    floor = rank_error()
    sens = activation_sensitivity(unet, rank_error, low=8, high=16)
    rss = (floor ** 2 + sum(max(e * e - floor * floor, 0.0) for e in sens.values())) ** 0.5
    high = layers_to_keep_high(sens, floor, 0.9 * target)
    set_bit_policy(unet, 8)
    set_bit_policy(unet, {n: 16 for n in high})
    out = {"all_a8": all8, "a16_everywhere": floor, "rss_prediction": rss, "layers": len(sens),
           "layers_at_a16": len(high), "held_out_error": held_error(),
           "fab": fab(layer_stats(unet), get_bit_policy(unet), list(sens))["fab"], "a16_layers": high,
           "one_layer_at_a8": sens}
    set_bit_policy(unet, 8)
    return out
