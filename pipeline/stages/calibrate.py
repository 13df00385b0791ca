"""`python -m pipeline.fit calibrate`: quantize the UNet and calibrate it.

Writes <run-dir>/quant/{quant_state.safetensors, quant_config.json, manifest.json}."""
from __future__ import annotations

import os
import time
from pathlib import Path

USES_TRAINER = True
METHODS = ("naive", "qdiff", "ptqd")  # ptqd = qdiff + PTQD noise correction


def parse_bits_list(text: str | None) -> list[int] | None:
    if text in (None, ""):
        return None
    try:
        return [int(b) for b in str(text).split(",")]
    except ValueError:
        raise ValueError(f"--a-bit-options {text!r} must be comma-separated integers such as 8,16,32") from None


def add_arguments(parser) -> None:
    parser.add_argument("--method", type=str, default="naive", help="|".join(METHODS))
    parser.add_argument("--w-bits", type=int, default=8)
    parser.add_argument("--a-bits", type=int, default=8)
    parser.add_argument("--a-bit-options", type=str | None, default=None, help="e.g. 8,16,32 (default: a-bits)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps of the calibrated schedule")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--time-aware", type=bool, default=False, help="one activation quantizer per step")
    parser.add_argument("--bos-aware", type=bool, default=False, help="BOS token K/V in full precision")
    parser.add_argument("--softmax-bits", type=int, default=16)
    parser.add_argument("--act-init", type=str, default="minmax", help="minmax | lp")
    parser.add_argument("--weight-init", type=str, default="minmax", help="minmax | lp")
    parser.add_argument("--prompts", type=str, default="world", help="'world' or a .txt/.jsonl prompt file")
    parser.add_argument("--cali-n", type=int, default=16, help="calibration prompts")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cali-st", type=int, default=5, help="calibrated steps (uniformly spaced)")
    parser.add_argument("--iters-w", type=int, default=20000, help="AdaRound iterations per unit (qdiff/ptqd)")
    parser.add_argument("--iters-a", type=int, default=5000, help="activation step-size iterations per unit")
    parser.add_argument("--progressive", type=bool, default=False, help="PCR progressive calibration (time-aware)")
    parser.add_argument("--relax-tau", type=float, default=0.0, help="PCR relaxing: fraction of steps in [0, 1)")
    parser.add_argument("--relax-bits", type=int, default=10, help="activation bits of the relaxed steps")
    parser.add_argument("--relax-end", type=str, default="x0", help="x0 (SD-like) | xT (SDXL-like)")
    parser.add_argument("--cali-data", type=str | None, default=None,
                        help="calibration-data folder (default <run-dir>/cali_data; reused when it matches)")


def quant_config_from(cfg):
    from pipeline.calibration.pcr import relaxed_steps
    from pipeline.quant import QuantConfig, check_bits

    options = parse_bits_list(cfg.a_bit_options) or [cfg.a_bits]
    if cfg.relax_tau:
        relaxed_steps(cfg.steps, cfg.relax_tau, cfg.relax_end)  # validates tau and end
        check_bits(cfg.relax_bits, "relax_bits")
        options = sorted(set(options) | {cfg.relax_bits})  # the relaxed steps need their own quantizers
    learned = cfg.method in ("qdiff", "ptqd")
    return QuantConfig(
        w_bits=cfg.w_bits, a_bits=cfg.a_bits, a_bit_options=options, n_steps=cfg.steps,
        time_aware=cfg.time_aware or cfg.progressive, bos_aware=cfg.bos_aware, softmax_bits=cfg.softmax_bits,
        act_init="lp" if learned and cfg.act_init == "minmax" else cfg.act_init,
        weight_init="lp" if learned and cfg.weight_init == "minmax" else cfg.weight_init,
        weight_rounding="adaround" if learned else "nearest",
    )


def run(cfg):
    import lightning as L

    from data.prompts import load_prompts
    from pipeline.metrics.cost import quantized_summary
    from pipeline.calibration.naive import calibrate_naive
    from pipeline.models import load_pipeline
    from pipeline.quant import quantize_unet, save_quantized
    from pipeline.runs import prepare_artifact, write_manifest

    if cfg.method not in METHODS:
        raise ValueError(f"--method {cfg.method!r} is not available; choose one of {METHODS}")
    qcfg = quant_config_from(cfg)  # validates bits before anything slow happens
    out = prepare_artifact(cfg.run_dir, "quant", cfg.overwrite)
    if cfg.overwrite and (Path(cfg.run_dir) / "partial").is_dir():
        import shutil

        shutil.rmtree(Path(cfg.run_dir) / "partial")  # start the reconstruction over
    L.seed_everything(cfg.seed, verbose=False)
    prompts = load_prompts(cfg.prompts, limit=cfg.cali_n, split="train", seed=cfg.seed)
    pipe = load_pipeline(cfg.model, allow_download=cfg.allow_download)
    t0 = time.time()
    trainer_kwargs = {k: v for k, v in vars(cfg.trainer).items() if v is not None}
    extra_tensors, metrics = {}, {}
    if cfg.method == "naive":
        trainer = calibrate_naive(pipe, qcfg, prompts, cfg.steps, cfg.guidance, cfg.batch_size, cfg.seed,
                                  trainer_kwargs)
        is_zero = trainer.is_global_zero
        if cfg.progressive:
            from pipeline.calibration.pcr import calibrate_progressive

            calibrate_progressive(pipe, prompts, cfg.steps, cfg.guidance, cfg.seed, cfg.batch_size)
    else:
        from pipeline.calibration.data import CalibrationData, collect
        from pipeline.calibration.ptqd import ptqd_statistics
        from pipeline.calibration.qdiff import calibrate_qdiff

        cali_dir = cfg.cali_data or str(Path(cfg.run_dir) / "cali_data")
        collect(pipe, prompts, cali_dir, steps=cfg.steps, cali_st=cfg.cali_st, guidance=cfg.guidance,
                batch_size=cfg.batch_size, seed=cfg.seed)
        data = CalibrationData(cali_dir, pipe, steps=cfg.steps, guidance=cfg.guidance)
        quantize_unet(pipe.unet, qcfg)
        is_zero = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0
        # with --progressive, the step sizes are learned step by step afterwards instead (PCR)
        iters_a = 0 if cfg.progressive else cfg.iters_a
        metrics["units"] = calibrate_qdiff(pipe.unet, data, Path(cfg.run_dir) / "partial", cfg.iters_w, iters_a,
                                           trainer_kwargs=trainer_kwargs, seed=cfg.seed, is_rank_zero=is_zero,
                                           signature={"model": cfg.model, "prompts": prompts})
        if cfg.progressive:
            from pipeline.calibration.pcr import calibrate_progressive

            calibrate_progressive(pipe, prompts, cfg.steps, cfg.guidance, cfg.seed, cfg.batch_size,
                                  iters_a=cfg.iters_a, trainer_kwargs=trainer_kwargs,
                                  partial_dir=Path(cfg.run_dir) / "partial", is_rank_zero=is_zero,
                                  signature={"model": cfg.model})
        if cfg.method == "ptqd":
            extra_tensors = ptqd_statistics(pipe.unet, data)
    if cfg.relax_tau:
        from pipeline.calibration.pcr import apply_relaxing

        metrics["relaxed_steps"] = apply_relaxing(pipe.unet, cfg.relax_tau, cfg.relax_bits, cfg.relax_end)
    summary = quantized_summary(pipe.unet)
    summary["calibration_seconds"] = time.time() - t0
    summary.update({k: v for k, v in metrics.items() if k != "units"})
    if is_zero:
        save_quantized(pipe.unet, out, extra_tensors=extra_tensors, extra={"method": cfg.method, "model": cfg.model, "steps": cfg.steps,
                                              "guidance": cfg.guidance, "prompts": cfg.prompts,
                                              "cali_n": len(prompts), "progressive": cfg.progressive,
                                              "relax_tau": cfg.relax_tau})
        write_manifest(out, "calibrate", cfg, summary, units=metrics.get("units", {}))
        print(f"calibrated {cfg.method} W{cfg.w_bits}A{cfg.a_bits} -> {out}  "
              f"(BitOPs {summary['bitops_T']:.4g} T, FAB {summary['fab']:.2f}, "
              f"{summary['size_bytes'] / 2**20:.2f} MiB, {summary['calibration_seconds']:.1f} s)")
    return out
