"""Paired quality to FP on a fixed validation split, measured while QLIP trains
(callbacks/evaluation.py calls it every N epochs; issue 18).

The FP images of the split's prompts are made once, before the quantized state
is loaded, each prompt with its own fixed seed (`data.prompts.prompt_seed`).
Every measurement then generates the same prompts with the same seeds through
`QLIPPipeline` (per prompt: its own bits, as deployed with batch size 1) and
scores each image against its FP twin: PSNR and SSIM per image
(pipeline/metrics/fidelity.py) with percentile-bootstrap 95% intervals of their
means (pipeline/evaluation/statistics.py), and the mean FAB of the bits used
(pipeline/metrics/cost.py, through QLIPPipeline's FAB weights).

    val = PairedValidation(prompts, steps=10, guidance=5.0)
    val.record_fp(pipe)                       # FP pipe, before quantize_pipeline
    ...
    val.measure_qlip(pipe, q2b, quality)      # {"psnr", "psnr_ci", "ssim", "ssim_ci", "fab", "n_images", ...}
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from data.prompts import prompt_seed
from pipeline.evaluation.statistics import mean_ci
from pipeline.metrics.fidelity import FidelityToFP, as_nchw
from pipeline.qlip.pipeline import QLIPPipeline
from pipeline.qlip.q2b import to_stored_precision
from pipeline.quant import get_bit_policy, set_bit_policy
from pipeline.sampling import generate

MONITORED = ("psnr", "ssim", "fab")  # what a measurement reports and a best checkpoint may be chosen by
EVAL_MONITORS = ("psnr", "ssim")  # what --eval-monitor may choose the best checkpoint by (higher is better)


class PairedValidation:
    def __init__(self, prompts: Sequence[str], steps: int, guidance: float, seed: int = 0):
        self.prompts = list(prompts)
        if not self.prompts:
            raise ValueError("the paired validation needs prompts: the val split is empty (raise --val-n)")
        self.seeds = [prompt_seed(p, seed) for p in self.prompts]
        self.steps, self.guidance = steps, guidance
        self.fp: np.ndarray | None = None

    def describe(self) -> dict:
        return {"n_prompts": len(self.prompts), "images_per_prompt": 1, "steps": self.steps,
                "guidance": self.guidance, "prompts": self.prompts, "seeds": self.seeds}

    @torch.no_grad()
    def record_fp(self, pipe) -> None:
        """The FP images of the split (run it on the unquantized pipeline)."""
        if getattr(pipe.unet, "quant_config", None) is not None:
            raise ValueError("PairedValidation.record_fp needs the FP pipeline; it was given a quantized UNet")
        self.fp = generate(pipe, self.prompts, self.seeds, steps=self.steps, guidance=self.guidance, batch_size=1,
                           progress=False)

    def measure(self, images: np.ndarray, fab: Sequence[float]) -> dict:
        """Paired PSNR / SSIM of `images` (the split's prompts, in order) to the FP images, with 95% intervals,
        and the mean of the per-image `fab`."""
        if self.fp is None:
            raise ValueError("no FP images yet: call record_fp(pipe) before the state is loaded")
        if len(images) != len(self.fp) or len(fab) != len(self.fp):
            raise ValueError(f"{len(images)} images and {len(fab)} FAB values for {len(self.fp)} FP images")
        metric = FidelityToFP()
        metric.update(as_nchw(self.fp), as_nchw(images))
        per = metric.per_image()
        out = {"n_images": len(images), "n_prompts": len(set(self.prompts))}
        for name in ("psnr", "ssim"):
            mean, lo, hi = mean_ci(per[name], groups=self.prompts)
            out.update({name: mean, f"{name}_ci": [lo, hi]})
        out["fab"] = float(np.mean(fab))
        return out

    @torch.no_grad()
    def measure_qlip(self, pipe, q2b, quality) -> dict:
        """Generate the split with text-aware bits (Q2B `q2b` fed by `quality`, e.g. a T2Q) on the quantized
        `pipe` and measure it. The UNet's bit policy is put back afterwards (training sets its own per item)."""
        before = get_bit_policy(pipe.unet)
        # a copy on the host (where QLIPPipeline decides) in the stored fp16 form, so that the measured bits are
        # those of the checkpoint a best measurement saves; the trained module stays untouched
        q2b = to_stored_precision(copy.deepcopy(q2b).cpu())
        try:
            result = QLIPPipeline(pipe, q2b, quality, self.steps, self.guidance)(
                self.prompts, self.seeds, batch_size=1, progress=False)
        finally:
            set_bit_policy(pipe.unet, before)
        return self.measure(result.images, [b["fab"] for b in result.batches])
