"""`python -m pipeline.fit calibrate`: quantize the UNet and calibrate it.

Writes <run-dir>/quant/{quant_state.safetensors, quant_config.json, manifest.json};
qdiff/ptqd also keep <run-dir>/cali_data (reused when it matches) and
<run-dir>/partial (resumable reconstruction progress)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L

from data.prompts import draw_prompts, parse_fractions
from pipeline.artifacts import ARTIFACTS, PARTIAL, prepare_artifact, write_manifest
from pipeline.calibration.gptq import check_adaround_init
from pipeline.calibration.qdiff import check_recon_inputs
from pipeline.calibration.recipe import calibrate_pipeline, quant_config_for
from pipeline.engine import StageConfig, check_flags, is_global_zero
from pipeline.metrics.cost import quantized_summary
from pipeline.models import load_pipeline, sampling_defaults
from pipeline.quant import save_quantized
from pipeline.quant.config import parse_bits
from pipeline.shards import DEFAULT_RAM_CAP_GIB


@dataclass
class CalibrateConfig(StageConfig):
    """Settings of the calibrate stage."""

    method: str = "naive"
    """naive | qdiff | ptqd (= qdiff + PTQD noise correction)"""
    w_bits: int = 8
    """weight bits (per output channel)"""
    a_bits: int = 8
    """activation bits every layer starts at"""
    a_bit_options: str | None = None
    """activation quantizer bank, e.g. 8,16,32 (default: a-bits)"""
    w_bit_options: str | None = None
    """weight quantizers per layer, e.g. 2,4,8 (default: w-bits; each layer runs at w-bits until a policy such
    as the mixdq stage's sets its own; qdiff/ptqd learn AdaRound for every option)"""
    steps: int | None = None
    """sampling steps of the calibrated schedule (default: the model's, pipeline.models.sampling_defaults)"""
    guidance: float | None = None
    """classifier-free guidance scale (default: the model's)"""
    time_aware: bool = False
    """one activation quantizer per step"""
    bos_aware: bool = False
    """BOS token K/V in full precision (MixDQ)"""
    softmax_bits: int = 16
    """bits of the attention probabilities"""
    act_init: str = "minmax"
    """activation range init: minmax | lp"""
    weight_init: str = "minmax"
    """weight range init: minmax | lp"""
    weight_symmetric: bool = False
    """weight grids centred on 0: W8 then deploys on int8 kernels without the zero-point correction (faster;
    docs/deploy.md#w8)"""
    prompts: str = "world"
    """prompt source: world[:train|val|test|unseen] | builtin | coco:FILE.json|NAME | cc:FILE.tsv |
    parti:FILE.tsv | sd-prompts[:FILE] | FILE.txt|.jsonl|.json|.tsv|.csv|.parquet, split by the SHA-1 of each
    prompt into train/val/test (--split-fractions; docs/prompts.md); this stage draws from train"""
    split_fractions: str = "0.8,0.1,0.1"
    """train,val,test fractions of the hashed prompt split (use the same in every stage of a run)"""
    cali_n: int = 16
    """calibration prompts"""
    batch_size: int = 8
    """prompts per calibration batch"""
    cali_st: int = 5
    """calibrated steps (uniformly spaced)"""
    iters_w: int = 20000
    """AdaRound iterations per unit (qdiff/ptqd)"""
    iters_a: int = 5000
    """activation step-size iterations per unit"""
    recon_inputs: str = "quantized"
    """quantized (Q-Diffusion/BRECQ asym, in their two passes: each unit on the inputs the units that run before
    it produce, quantized) | fp (each unit on the FP model's inputs); qdiff/ptqd. docs/calibration.md has the
    measurements"""
    adaround_init: str = "fp"
    """AdaRound's start: fp (the FP weights, nearest rounding) | gptq (GPTQ's closed-form rounding of each layer
    first: the same held-out error in far fewer --iters-w; docs/calibration.md#time-to-quality); qdiff/ptqd"""
    progressive: bool = False
    """PCR progressive calibration (time-aware)"""
    relax_tau: float = 0.0
    """PCR relaxing: fraction of steps in [0, 1)"""
    relax_bits: int = 10
    """activation bits of the relaxed steps"""
    relax_end: str | None = None
    """x0 | xT: the end whose steps are relaxed (default: the model's, as PCR: x0 for SD, xT for SDXL)"""
    cali_data: str | None = None
    """calibration-data folder (default <run-dir>/cali_data; reused when it matches)"""
    ram_cap_gib: float = DEFAULT_RAM_CAP_GIB
    """GiB of a unit's reconstruction inputs/outputs kept in RAM (qdiff/ptqd); the rest go to disk shards in
    <run-dir>/partial/spill (same result, slower)"""


def calibrate(cfg: CalibrateConfig, trainer: dict | None = None) -> Path:
    check_flags(cfg)  # before anything loads or is written

    def quant_config(steps: int, relax_tau: float):
        return quant_config_for(cfg.method, w_bits=cfg.w_bits, a_bits=cfg.a_bits,
                                a_bit_options=parse_bits(cfg.a_bit_options), steps=steps,
                                time_aware=cfg.time_aware or cfg.progressive, bos_aware=cfg.bos_aware,
                                softmax_bits=cfg.softmax_bits, act_init=cfg.act_init, weight_init=cfg.weight_init,
                                relax_tau=relax_tau, relax_bits=cfg.relax_bits, relax_end=cfg.relax_end,
                                w_bit_options=parse_bits(cfg.w_bit_options, "--w-bit-options"),
                                weight_symmetric=cfg.weight_symmetric)

    # a bad flag fails before the model loads; without --steps the relaxing checks (they need the
    # steps, which the model gives) wait for it
    quant_config(cfg.steps or 1, cfg.relax_tau if cfg.steps else 0.0)
    draw = draw_prompts(cfg.prompts, "train", cfg.cali_n, parse_fractions(cfg.split_fractions), seed=cfg.seed)
    prompts = draw.prompts
    check_recon_inputs(cfg.recon_inputs)  # before anything is loaded
    check_adaround_init(cfg.adaround_init)
    run_dir = Path(cfg.run_dir)
    # --overwrite keeps partial/ and cali_data/ where they were made under these settings (--fresh: neither)
    out = prepare_artifact(run_dir, ARTIFACTS["calibrate"], cfg.overwrite, cfg.fresh)
    L.seed_everything(cfg.seed, verbose=False)
    pipe = load_pipeline(cfg.model, **cfg.load_options())  # calibrate_pipeline puts it on the stage's device
    sampling = sampling_defaults(pipe, cfg.steps, cfg.guidance)
    qcfg = quant_config(sampling.steps, cfg.relax_tau)
    extra_tensors, metrics = calibrate_pipeline(
        pipe, qcfg, cfg.method, prompts, steps=sampling.steps, guidance=sampling.guidance, batch_size=cfg.batch_size,
        seed=cfg.seed, cali_st=cfg.cali_st, iters_w=cfg.iters_w, iters_a=cfg.iters_a, progressive=cfg.progressive,
        relax_tau=cfg.relax_tau, relax_bits=cfg.relax_bits, relax_end=cfg.relax_end,
        cali_dir=cfg.cali_data or run_dir / "cali_data", partial_dir=run_dir / PARTIAL, trainer=trainer,
        signature={"model": cfg.model, "prompts": prompts}, ram_cap_gib=cfg.ram_cap_gib, recon_inputs=cfg.recon_inputs,
        discard_stale=cfg.overwrite or cfg.fresh, adaround_init=cfg.adaround_init)
    if not is_global_zero():
        return out
    summary = {**quantized_summary(pipe.unet), **{k: v for k, v in metrics.items() if k != "units"}}
    save_quantized(pipe.unet, out, extra_tensors=extra_tensors,
                   extra={"method": cfg.method, "model": cfg.model, "steps": sampling.steps,
                          "guidance": sampling.guidance, "scheduler": sampling.scheduler, "prompts": cfg.prompts,
                          "cali_n": len(prompts), "progressive": cfg.progressive, "relax_tau": cfg.relax_tau})
    write_manifest(out, "calibrate", cfg, summary, units=metrics.get("units", {}), sampling=sampling.as_dict(),
                   prompt_split=draw.describe())
    print(f"calibrated {cfg.method} W{cfg.w_bits}A{cfg.a_bits} -> {out}  (BitOPs {summary['bitops_T']:.4g} T, "
          f"FAB {summary['fab']:.2f}, {summary['size_bytes'] / 2**20:.2f} MiB, {summary['calibration_seconds']:.1f} s)")
    return out
