"""`python -m pipeline.fit calibrate`: quantize the UNet and calibrate it.

Writes <run-dir>/quant/{quant_state.safetensors, quant_config.json, manifest.json}."""
from __future__ import annotations

import time

USES_TRAINER = True
METHODS = ("naive",)  # qdiff / ptqd / PCR arrive with the calibration issue


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


def quant_config_from(cfg):
    from pipeline.quant import QuantConfig

    return QuantConfig(
        w_bits=cfg.w_bits, a_bits=cfg.a_bits, a_bit_options=parse_bits_list(cfg.a_bit_options) or [],
        n_steps=cfg.steps, time_aware=cfg.time_aware, bos_aware=cfg.bos_aware, softmax_bits=cfg.softmax_bits,
        act_init=cfg.act_init, weight_init=cfg.weight_init,
    )


def run(cfg):
    import lightning as L

    from data.prompts import load_prompts
    from pipeline.accounting import quantized_summary
    from pipeline.calibration.naive import calibrate_naive
    from pipeline.models import load_pipeline
    from pipeline.quant import save_quantized
    from pipeline.runs import prepare_artifact, write_manifest

    if cfg.method not in METHODS:
        raise ValueError(f"--method {cfg.method!r} is not available; choose one of {METHODS}")
    qcfg = quant_config_from(cfg)  # validates bits before anything slow happens
    out = prepare_artifact(cfg.run_dir, "quant", cfg.overwrite)
    L.seed_everything(cfg.seed, verbose=False)
    prompts = load_prompts(cfg.prompts, limit=cfg.cali_n, split="train", seed=cfg.seed)
    pipe = load_pipeline(cfg.model, allow_download=cfg.allow_download)
    t0 = time.time()
    trainer_kwargs = {k: v for k, v in vars(cfg.trainer).items() if v is not None}
    trainer = calibrate_naive(pipe, qcfg, prompts, cfg.steps, cfg.guidance, cfg.batch_size, cfg.seed, trainer_kwargs)
    summary = quantized_summary(pipe.unet)
    summary["calibration_seconds"] = time.time() - t0
    if trainer.is_global_zero:
        save_quantized(pipe.unet, out, extra={"method": cfg.method, "model": cfg.model, "steps": cfg.steps,
                                              "guidance": cfg.guidance, "prompts": cfg.prompts,
                                              "cali_n": len(prompts)})
        write_manifest(out, "calibrate", cfg, summary)
        print(f"calibrated {cfg.method} W{cfg.w_bits}A{cfg.a_bits} -> {out}  "
              f"(BitOPs {summary['bitops_T']:.4g} T, FAB {summary['fab']:.2f}, "
              f"{summary['size_bytes'] / 2**20:.2f} MiB, {summary['calibration_seconds']:.1f} s)")
    return out
