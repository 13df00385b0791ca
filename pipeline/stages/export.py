"""`python -m pipeline.fit export --quant-state runs/x/quant --run-dir runs/x`: the deployable artifact of a
calibrated state (integer weights, per-channel scales, activation qparams, policy), into `<run-dir>/deploy/`.
docs/deploy.md."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import ARTIFACTS, prepare_artifact, write_manifest
from pipeline.deploy import DEPLOY, check_backend, export_unet
from pipeline.engine import StageConfig, check_flags
from pipeline.errors import UserError
from pipeline.models import load_pipeline
from pipeline.quant.config import QuantConfig
from pipeline.quant.state import load_quantized, read_meta


@dataclass
class ExportConfig(StageConfig):
    """Settings of the export stage."""

    quant_state: str | None = None
    """a calibrate output folder (e.g. runs/x/quant) to export as integers"""
    backend: str = "onednn"
    """the runtime the artifact must run on, checked before anything loads: onednn (CPU int8 kernels),
    reference (pure PyTorch integer emulation), gpu (torchao; CUDA only)"""


def export(cfg: ExportConfig) -> Path:
    check_flags(cfg)
    if not cfg.quant_state:
        raise UserError("--quant-state is required: a calibrate output folder such as runs/x/quant")
    meta = read_meta(cfg.quant_state, "--quant-state")
    check_backend(cfg.backend, QuantConfig.from_dict(meta["quant_config"]))
    out = prepare_artifact(cfg.run_dir, ARTIFACTS["export"], cfg.overwrite, cfg.fresh)
    pipe = load_pipeline(cfg.model, **cfg.load_options())
    fp_bytes = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    _, _, extra = load_quantized(pipe.unet, cfg.quant_state)
    export_unet(pipe.unet, out, extra_tensors=extra, extra={"quant_state": str(Path(cfg.quant_state).resolve())})
    size = (out / DEPLOY.tensors).stat().st_size
    metrics = {"artifact_bytes": size, "fp32_unet_bytes": fp_bytes, "size_ratio": size / fp_bytes}
    write_manifest(out, "export", cfg, metrics)
    print(f"deployable UNet -> {out} ({size / 2**20:.2f} MiB, {metrics['size_ratio']:.3f}x the FP32 UNet)")
    return out
