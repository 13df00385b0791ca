"""`python -m pipeline.fit export --quant-state runs/x/quant --run-dir runs/x`: the deployable artifact of a
calibrated state (integer weights, per-channel scales, activation qparams, policy), into `<run-dir>/deploy/`.
With `--q2b runs/x/q2b` it also holds Q2B's tables and the T2Q head, for text-aware generation
(`pipeline.deploy.load_qlip`); the state defaults to the one the Q2B was trained on. docs/deploy.md."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import ARTIFACTS, prepare_artifact, write_manifest
from pipeline.deploy import DEPLOY, check_backend, export_unet
from pipeline.deploy.qlip import qlip_payload
from pipeline.engine import StageConfig, check_flags
from pipeline.errors import UserError
from pipeline.models import load_pipeline
from pipeline.qlip.q2b import follow_link, read_q2b_meta
from pipeline.quant.config import QuantConfig
from pipeline.quant.state import load_quantized, read_meta


@dataclass
class ExportConfig(StageConfig):
    """Settings of the export stage."""

    quant_state: str | None = None
    """a calibrate output folder (e.g. runs/x/quant) to export as integers (default with --q2b: its state)"""
    q2b: str | None = None
    """a q2b output folder (e.g. runs/x/q2b): its Q2B tables and T2Q head go into the artifact, so that a loaded
    artifact generates with text-aware bits (pipeline.deploy.load_qlip)"""
    backend: str = "onednn"
    """the runtime the artifact must run on, checked before anything loads: onednn (CPU int8 kernels),
    reference (pure PyTorch integer emulation), gpu (torchao; CUDA only)"""


def export(cfg: ExportConfig) -> Path:
    check_flags(cfg)
    state = cfg.quant_state
    if cfg.q2b:
        q2b_meta = read_q2b_meta(cfg.q2b, "--q2b", deployed=True)
        trained_on = follow_link(cfg.q2b, q2b_meta["quant_state"])
        if state and read_meta(state, "--quant-state")["sha256"] != read_meta(trained_on)["sha256"]:
            raise UserError(f"--q2b {cfg.q2b} was trained on the state {trained_on}, not on --quant-state {state}; "
                            f"leave --quant-state out to export the Q2B's own state")
        state = state or trained_on
    if not state:
        raise UserError("--quant-state is required: a calibrate output folder such as runs/x/quant")
    meta = read_meta(state, "--quant-state")
    check_backend(cfg.backend, QuantConfig.from_dict(meta["quant_config"]))
    out = prepare_artifact(cfg.run_dir, ARTIFACTS["export"], cfg.overwrite, cfg.fresh)
    pipe = load_pipeline(cfg.model, **cfg.load_options())
    fp_bytes = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    _, _, extra = load_quantized(pipe.unet, state)
    qlip = qlip_payload(cfg.q2b, pipe.unet, cfg.model) if cfg.q2b else None  # checked against the fake-quant UNet
    export_unet(pipe.unet, out, extra_tensors=extra, extra={"quant_state": str(Path(state).resolve())}, qlip=qlip)
    size = (out / DEPLOY.tensors).stat().st_size
    metrics = {"artifact_bytes": size, "fp32_unet_bytes": fp_bytes, "size_ratio": size / fp_bytes,
               "text_aware": qlip is not None}
    write_manifest(out, "export", cfg, metrics)
    print(f"deployable UNet -> {out} ({size / 2**20:.2f} MiB, {metrics['size_ratio']:.3f}x the FP32 UNet)")
    return out
