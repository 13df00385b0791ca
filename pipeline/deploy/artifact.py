"""The deployable artifact (format `qlip-deploy/1`): `unet.safetensors` (the deployed UNet's whole state dict:
packed integer weights, per-channel scales, every activation quantizer's (scale, zero point) per (option, step
slot), biases, norms and other float parameters, PTQD's statistics as `extra.*`) plus `deploy.json` (the UNet
config, the quantization config, each layer's weight parts, the policy), written and checksummed by
`save_artifact`. It loads without the FP weights: `load_unet(folder)` builds the UNet from its config on the
meta device and assigns the artifact's tensors."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from pipeline.artifacts import ArtifactFormat, load_artifact_tensors, read_artifact_meta, save_artifact
from pipeline.calibration.ptqd import apply_ptqd
from pipeline.deploy.backends import check_backend, onednn_bf16_missing, set_backend
from pipeline.deploy.layer import RealQuantLayer
from pipeline.deploy.pack import PACKED_BITS, empty_part, pack_layer
from pipeline.quant.attention import QuantAttnProcessor
from pipeline.quant.config import QuantConfig
from pipeline.quant.layers import ActQuantBank
from pipeline.quant.policy import quant_layers
from pipeline.quant.state import model_fingerprint
from pipeline.quant.wrap import _set_module, quantize_unet

DEPLOY = ArtifactFormat("qlip-deploy", 1, "unet.safetensors", "deploy.json", "deployable quantized UNet",
                        "run the export stage: `python -m pipeline.fit export --quant-state <calibrate folder>`",
                        required=("unet_config", "quant_config", "layers", "policy"))
QLIP_PREFIX = "qlip."  # the text-aware policy's tensors (Q2B tables, T2Q head): deploy/qlip.py


def _unet_config(unet: nn.Module) -> dict:
    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    return json.loads(json.dumps(cfg, default=list))


@torch.no_grad()
def to_real(unet: nn.Module) -> dict[str, list]:
    """Replace every QuantLayer of a fake-quantized UNet (in place) by a RealQuantLayer holding its integer
    weights; each dequantized weight is checked torch.equal to the fake-quant weight. Returns the layers' parts
    [[start, stop, bits, shape], ...] (what deploy.json records)."""
    layout = {}
    for name, layer in quant_layers(unet).items():
        parts = pack_layer(layer) if layer.quant_weight else []
        real = RealQuantLayer(layer, parts)
        if parts and not torch.equal(real.dequantized_weight(), layer.quantized_weight()):
            raise RuntimeError(f"{name}: the packed integers do not give back the fake-quant weight exactly")
        _set_module(unet, name, real)
        layout[name] = [[p.start, p.stop, p.bits, list(p.shape)] for p in parts]
    return layout


def take_prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove the tensors named `prefix...` from `tensors`; returned without the prefix."""
    return {k[len(prefix):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}


def export_unet(unet: nn.Module, folder: str | Path, extra_tensors: dict | None = None,
                extra: dict | None = None, qlip: tuple[dict, dict] | None = None) -> Path:
    """Write the deployable artifact of fake-quantized `unet` into `folder` (the UNet becomes the deployed one).
    `qlip`: (tensors, record) of `deploy.qlip.qlip_payload`, stored as `qlip.*` tensors and deploy.json's "qlip"."""
    fingerprint = model_fingerprint(unet)
    policy = {n: list(m.policy) for n, m in quant_layers(unet).items()}
    config = unet.quant_config
    layout = to_real(unet)
    tensors = {k: v.detach().contiguous() for k, v in unet.state_dict().items()}
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra.{k}"] = v
    meta = {"unet_config": _unet_config(unet), "quant_config": config.to_dict(), "layers": layout,
            "policy": policy, "model": fingerprint, "extra": extra or {}}
    if qlip is not None:
        tensors.update({f"{QLIP_PREFIX}{k}": v for k, v in qlip[0].items()})
        meta["qlip"] = qlip[1]
    return save_artifact(folder, DEPLOY, tensors, meta)


def read_deploy_meta(folder: str | Path, flag: str | None = None) -> dict:
    return read_artifact_meta(folder, DEPLOY, flag)


FINE_GRIDS = ("keep", "drop")
RUNTIME_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class DeployedUNet(UNet2DConditionModel):
    """A UNet2DConditionModel whose quantized layers are RealQuantLayers. Its runtime dtype is internal: in the
    bf16 runtime it casts `sample` and `encoder_hidden_states` to bf16 at the door and gives its output back in
    the dtype `sample` came in, and `dtype` reports fp32, so a pipeline's latents and scheduler stay in fp32."""

    runtime_dtype = torch.float32

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        low = self.runtime_dtype
        if low == torch.float32 or not sample.is_floating_point():
            return super().forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
        out = super().forward(sample.to(low), timestep, encoder_hidden_states.to(low), *args, **kwargs)
        if isinstance(out, tuple):
            return (out[0].to(sample.dtype),) + out[1:]
        out.sample = out.sample.to(sample.dtype)
        return out


def _to_runtime_dtype(unet: nn.Module, dtype: torch.dtype) -> None:
    """Cast every float parameter and buffer to `dtype`, except the quantizers' own: integer weights with their
    scales and zero points, and the activation grids, which stay exactly as exported."""
    quantizers = [m for m in list(unet.modules()) + list(unet.attn_processors.values()) if isinstance(m, ActQuantBank)]
    keep = {id(t) for m in quantizers for t in list(m.parameters()) + list(m.buffers())}
    for m in unet.modules():
        if isinstance(m, RealQuantLayer):
            keep |= {id(t) for n, t in m.named_buffers(recurse=False) if n.startswith(("qweight", "w_zero", "w_scale"))}
            m.runtime_dtype = dtype
    for m in unet.modules():
        for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if t.is_floating_point() and id(t) not in keep:
                t.data = t.data.to(dtype)
    unet.runtime_dtype = dtype


def check_runtime(backend: str, dtype: str, flag: str = "dtype=") -> None:
    """Refuse a runtime dtype that is not one, or that this machine's int8 kernels cannot write; `flag`: how the
    caller names the option (the generate stage: "--runtime ")."""
    if dtype not in RUNTIME_DTYPES:
        raise ValueError(f"{flag}{dtype!r}: choose one of {', '.join(RUNTIME_DTYPES)}")
    if dtype == "bf16" and backend == "onednn" and onednn_bf16_missing():
        raise ValueError(f"{flag}'bf16' with --backend onednn: {onednn_bf16_missing()}; use {flag}'fp32'")


def load_unet(folder: str | Path, backend: str = "onednn", device="cpu", fine_grids: str | None = None,
              dtype: str = "fp32") -> DeployedUNet:
    """The deployed UNet of an export folder, without the FP weights:
    `unet = pipeline.deploy.load_unet("runs/x/deploy")`; then `pipe.unet = unet` (or `attach`).

    fine_grids "keep" (the default in fp32): the fake-quant UNet's own arithmetic, 16-bit grids included. "drop":
    every activation grid of >= 16 bits (16-bit layer inputs of a QLIP table, q/k/v at 16 bits, Q-Diffusion's
    16-bit softmax) is left out, so those calls run the float kernels directly and attention runs as SDPA.
    Faster on CPU, but a 2^-17 change flips 8-bit codes downstream, so sampled images drift from the fake-quant
    ones (33-38 dB PSNR on the embedded world, docs/deploy.md).

    dtype "fp32" (default) or "bf16": the bf16 runtime keeps the integer kernels for every <= 8-bit call (they
    write bf16) and runs everything else in bf16: norms, attention, and each 16- or 32-bit call as a bf16 GEMM on
    the raw input. It has no 16-bit grids, so its fine_grids is "drop" ("keep" is refused). It takes and returns
    fp32 (DeployedUNet), so pipelines run it unchanged."""
    check_runtime(backend, dtype)
    fine_grids = fine_grids or ("keep" if dtype == "fp32" else "drop")
    if fine_grids not in FINE_GRIDS:
        raise ValueError(f"fine_grids={fine_grids!r}: choose one of {FINE_GRIDS}")
    if dtype != "fp32" and fine_grids == "keep":
        raise ValueError(f"dtype={dtype!r} cannot keep the 16-bit activation grids (a bf16 value has 8 significant "
                         f"bits): load with fine_grids='drop', or dtype='fp32' for the fake-quant arithmetic")
    folder = Path(folder)
    meta = read_deploy_meta(folder)
    config = QuantConfig.from_dict(meta["quant_config"])
    check_backend(backend, config)
    with torch.device("meta"):  # no memory, no random init: every tensor comes from the artifact
        unet = DeployedUNet.from_config(meta["unet_config"])
    quantize_unet(unet, config, only=list(meta["layers"]), init_weights=False)
    for name, layer in quant_layers(unet).items():
        parts = [empty_part(a, b, bits, shape) for a, b, bits, shape in meta["layers"][name]]
        if any(p.bits not in PACKED_BITS for p in parts):
            raise ValueError(f"{folder / DEPLOY.meta}: layer {name} records weight bits outside {PACKED_BITS}")
        _set_module(unet, name, RealQuantLayer(layer, parts))
    tensors = load_artifact_tensors(folder, DEPLOY, device=device)
    extra = take_prefixed(tensors, "extra.")
    qlip = take_prefixed(tensors, QLIP_PREFIX)
    try:
        unet.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{folder / DEPLOY.tensors} does not fit the UNet its {DEPLOY.meta} describes "
                         f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}); "
                         f"{DEPLOY.made_by} again") from e
    for name, layer in quant_layers(unet).items():
        layer.policy = list(meta["policy"][name])
    unet.quant_context.step = 0
    for m in list(unet.modules()) + list(unet.attn_processors.values()):
        if isinstance(m, (QuantAttnProcessor, RealQuantLayer)):
            m.drop_fine_grids = fine_grids == "drop"
    _to_runtime_dtype(unet, RUNTIME_DTYPES[dtype])
    set_backend(unet, backend)
    unet.deploy_extra = extra
    unet.deploy_qlip = qlip  # Q2B's tables and the T2Q head, when exported with them (deploy.qlip.load_qlip)
    return unet.eval()


def attach(pipe, folder: str | Path, backend: str = "onednn", fine_grids: str | None = None, dtype: str = "fp32"):
    """Put the deployed UNet of `folder` into `pipe` (its text encoders, VAE and scheduler), in place, after
    checking that the artifact was exported from this pipeline's UNet architecture; PTQD's correction too.
    `fine_grids`, `dtype`: as load_unet's."""
    meta = read_deploy_meta(folder)
    want, have = meta["unet_config"], _unet_config(pipe.unet)
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if diff:
        detail = ", ".join(f"{k}: artifact {want.get(k)!r} vs model {have.get(k)!r}" for k in diff[:4])
        raise ValueError(f"deployable artifact {folder} belongs to another UNet architecture ({detail}); "
                         f"export it from this model's quantized state")
    device = pipe.unet.device if pipe.unet.device.type != "meta" else "cpu"  # meta: load_pipeline(unet_weights=False)
    pipe.unet = load_unet(folder, backend, device="cpu", fine_grids=fine_grids, dtype=dtype).to(device)
    if "ptqd_k" in pipe.unet.deploy_extra:
        apply_ptqd(pipe.unet, pipe.unet.deploy_extra, pipe)
    return pipe
