"""`python -m pipeline.fit policy`: a static control of QLIP at equal bits, as a quantized state.

Reads a calibrate output (`--quant-state`, with its activation banks) and writes <run-dir>/policy/, the same
quantizers with another stored bit table: `--control uniform --bits 8` (every layer and step at 8 bits) or
`--control random --target-fab 10` (random options at that FAB, `pipeline.qlip.controls.random_table`).
The evaluate stage takes the folder as one of its --quant-states. The text-blind Q2B control is the q2b
stage with `--criterion text-blind`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import ARTIFACTS, prepare_artifact, write_manifest
from pipeline.engine import StageConfig, check_flags
from pipeline.errors import UserError
from pipeline.metrics.cost import fab, fab_weights, layer_stats
from pipeline.models import load_pipeline
from pipeline.qlip.controls import CONTROLS, random_table, uniform_table
from pipeline.quant import quant_layers, set_bit_policy
from pipeline.quant.state import load_quantized, read_meta, save_quantized


@dataclass
class PolicyConfig(StageConfig):
    """Settings of the policy stage."""

    quant_state: str | None = None
    """a calibrate output folder whose activation banks hold the options (e.g. runs/x/quant)"""
    control: str = "random"
    """uniform (every layer and step at --bits) | random (random options at --target-fab)"""
    bits: int | None = None
    """the one activation option of --control uniform"""
    target_fab: float | None = None
    """the FAB of --control random"""


def policy(cfg: PolicyConfig) -> Path:
    check_flags(cfg)  # before anything loads or is written
    if not cfg.quant_state:
        raise UserError("--quant-state is required: a calibrate output folder such as runs/x/quant")
    if cfg.control not in CONTROLS:
        raise UserError(f"--control {cfg.control!r}: use one of {CONTROLS}")
    if cfg.control == "uniform" and cfg.bits is None:
        raise UserError("--control uniform needs --bits, e.g. --bits 8")
    if cfg.control == "random" and cfg.target_fab is None:
        raise UserError("--control random needs --target-fab, e.g. --target-fab 10")
    meta = read_meta(cfg.quant_state, "--quant-state")
    qcfg = meta["quant_config"]
    options, n_steps = qcfg["a_bit_options"], qcfg["n_steps"]
    if cfg.control == "uniform":
        uniform_table(1, 1, cfg.bits, options)  # the option check, before the model loads
    out = prepare_artifact(cfg.run_dir, ARTIFACTS["policy"], cfg.overwrite, cfg.fresh)
    pipe = load_pipeline(cfg.model, **cfg.load_options())
    _, meta, extra_tensors = load_quantized(pipe.unet, cfg.quant_state)
    layers = list(quant_layers(pipe.unet))
    stats = layer_stats(pipe.unet)
    if cfg.control == "uniform":
        table = uniform_table(len(layers), n_steps, cfg.bits, options)
        name = f"uniform A{cfg.bits}"
    else:
        table = random_table(fab_weights(stats, layers), n_steps, options, cfg.target_fab, cfg.seed)
        name = f"random FAB {cfg.target_fab:g}"
    set_bit_policy(pipe.unet, table)
    reached = fab(stats, table, layers)
    base = meta.get("extra", {}).get("method", "quant")
    save_quantized(pipe.unet, out, extra_tensors=extra_tensors,
                   extra={**meta.get("extra", {}), "method": f"{base} {name}",
                          "control": {"kind": cfg.control, "bits": cfg.bits, "target_fab": cfg.target_fab,
                                      "seed": cfg.seed, "quant_state": str(cfg.quant_state),
                                      "quant_state_sha256": meta.get("sha256")}})
    write_manifest(out, "policy", cfg, reached)
    print(f"{name} on {cfg.quant_state}: FAB {reached['fab']:.3f} -> {out}")
    return out
