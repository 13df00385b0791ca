"""The calibration recipe of the calibrate stage: which method fills the
quantizers, in which order, with what resumes.

  naive:  min-max (or L_p) ranges observed on FP trajectories, round-to-nearest;
  qdiff:  calibration data, then BRECQ/AdaRound reconstruction unit by unit
          and LSQ activation step sizes (Q-Diffusion); resumable per unit;
  ptqd:   qdiff, then PTQD's noise-correction statistics;
  --progressive (PCR): time-aware step sizes learned step by step on the
          quantized trajectory (after qdiff's weights), resumable per step;
  relaxing (PCR): some steps at a higher activation bit-width."""
from __future__ import annotations

import time
from pathlib import Path

from pipeline.calibration.data import CalibrationData, collect
from pipeline.calibration.naive import calibrate_naive
from pipeline.calibration.pcr import apply_relaxing, calibrate_progressive, default_relax_end, relaxed_steps
from pipeline.calibration.ptqd import ptqd_statistics
from pipeline.calibration.qdiff import calibrate_qdiff
from pipeline.engine import fp_autocast, is_global_zero, stage_device
from pipeline.quant import QuantConfig, check_bits, quantize_unet
from pipeline.sampling import check_own_sampler
from pipeline.shards import DEFAULT_RAM_CAP_GIB, running_share

METHODS = ("naive", "qdiff", "ptqd")  # ptqd = qdiff + PTQD noise correction
LEARNED = ("qdiff", "ptqd")


def quant_config_for(method: str, *, w_bits: int, a_bits: int, a_bit_options: list[int] | None, steps: int,
                     time_aware: bool, bos_aware: bool, softmax_bits: int, act_init: str, weight_init: str,
                     relax_tau: float = 0.0, relax_bits: int = 10, relax_end: str | None = None,
                     w_bit_options: list[int] | None = None, weight_symmetric: bool = False) -> QuantConfig:
    """The QuantConfig a method calibrates (validates every bit option first)."""
    if method not in METHODS:
        raise ValueError(f"--method {method!r} is not available; choose one of {METHODS}")
    if w_bit_options and w_bits not in w_bit_options:
        raise ValueError(f"--w-bits {w_bits} is not one of --w-bit-options {','.join(map(str, w_bit_options))}; "
                         f"add it there or change --w-bits")
    if a_bit_options and a_bits not in a_bit_options:  # named by flag here; QuantConfig checks it too
        raise ValueError(f"--a-bits {a_bits} is not one of --a-bit-options {','.join(map(str, a_bit_options))}; "
                         f"add it there or change --a-bits")
    options = a_bit_options or [a_bits]
    if relax_tau:
        relaxed_steps(steps, relax_tau, relax_end or "x0")  # validates tau and end (None: the model's)
        check_bits(relax_bits, "relax_bits")
        options = sorted(set(options) | {relax_bits})  # the relaxed steps need their own quantizers
    learned = method in LEARNED
    return QuantConfig(
        w_bits=w_bits, a_bits=a_bits, a_bit_options=options, w_bit_options=w_bit_options or [], n_steps=steps,
        time_aware=time_aware,
        bos_aware=bos_aware, softmax_bits=softmax_bits,
        act_init="lp" if learned and act_init == "minmax" else act_init,
        weight_init="lp" if learned and weight_init == "minmax" else weight_init,
        weight_rounding="adaround" if learned else "nearest", weight_symmetric=weight_symmetric,
    )


def calibrate_pipeline(pipe, qcfg: QuantConfig, method: str, prompts: list[str], *, steps: int, guidance: float,
                       batch_size: int, seed: int, cali_st: int, iters_w: int, iters_a: int, progressive: bool,
                       relax_tau: float, relax_bits: int, relax_end: str | None, cali_dir: str | Path,
                       partial_dir: str | Path, trainer: dict | None, signature: dict,
                       ram_cap_gib: float | None = DEFAULT_RAM_CAP_GIB, discard_stale: bool = False,
                       recon_inputs: str = "quantized", adaround_init: str = "fp") -> tuple[dict, dict]:
    """Quantize `pipe.unet` with `qcfg` and calibrate it by `method`.

    Returns (extra tensors for the state, e.g. PTQD's statistics; metrics).
    `signature` (model id, prompts) ties resumable progress to this run; `ram_cap_gib` bounds the
    reconstruction's items in RAM (the rest go to disk shards; the result is the same). `relax_end`
    None: the model family's (`default_relax_end`). `discard_stale` (--overwrite): progress and
    calibration data of other settings are discarded instead of refused."""
    if method != "naive" or progressive:
        check_own_sampler(pipe, f"--method {method}" + (" --progressive true" if progressive else ""))
    t0 = time.time()
    extra_tensors, metrics = {}, {}
    device = stage_device(trainer)
    pipe.to(device)

    def relax():  # before progressive calibration and PTQD: their trajectories run the relaxed steps as sampled
        if relax_tau:
            metrics["relax_end"] = relax_end or default_relax_end(pipe)
            metrics["relaxed_steps"] = apply_relaxing(pipe.unet, relax_tau, relax_bits, metrics["relax_end"])

    if method == "naive":
        calibrate_naive(pipe, qcfg, prompts, steps, guidance, batch_size, seed, trainer)
        pipe.to(device)  # the predict Trainer's teardown left its module (the UNet) on the CPU
        relax()
        if progressive:
            calibrate_progressive(pipe, prompts, steps, guidance, seed, batch_size, partial_dir=partial_dir,
                                  is_rank_zero=is_global_zero(), signature={"model": signature.get("model")},
                                  discard_stale=discard_stale)
    else:
        with fp_autocast(trainer, device):  # an FP pass: --trainer.precision applies
            collect(pipe, prompts, cali_dir, steps=steps, cali_st=cali_st, guidance=guidance,
                    batch_size=batch_size, seed=seed, discard_stale=discard_stale, share=running_share(trainer))
        data = CalibrationData(cali_dir, pipe, steps=steps, guidance=guidance)
        quantize_unet(pipe.unet, qcfg)
        relax()
        # with --progressive, the step sizes are learned step by step afterwards instead (PCR)
        metrics["units"] = calibrate_qdiff(pipe.unet, data, partial_dir, iters_w, 0 if progressive else iters_a,
                                           trainer_kwargs=trainer or {}, seed=seed, is_rank_zero=is_global_zero(),
                                           signature=signature, ram_cap_gib=ram_cap_gib,
                                           discard_stale=discard_stale, recon_inputs=recon_inputs,
                                           adaround_init=adaround_init)
        if progressive:
            calibrate_progressive(pipe, prompts, steps, guidance, seed, batch_size, iters_a=iters_a,
                                  trainer_kwargs=trainer or {}, partial_dir=partial_dir,
                                  is_rank_zero=is_global_zero(), signature={"model": signature.get("model")},
                                  discard_stale=discard_stale)
        if method == "ptqd":
            extra_tensors = ptqd_statistics(pipe.unet, data, device, pipe=pipe)  # every step, every bit option
    metrics["calibration_seconds"] = time.time() - t0
    return extra_tensors, metrics
