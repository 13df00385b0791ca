"""Save / load a quantized UNet's state: safetensors for tensors, JSON for the
rest. Only quantizer tensors are stored (the FP weights come from the model),
so a state is small and is tied to its model by a fingerprint."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from pipeline.artifacts import ArtifactFormat, load_artifact_tensors, read_artifact_meta, save_artifact
from pipeline.quant.config import QuantConfig
from pipeline.quant.layers import ActQuantBank
from pipeline.quant.policy import quant_layers, set_weight_bits
from pipeline.quant.quantizer import WeightQuantizer
from pipeline.quant.wrap import quantize_unet

QUANT_STATE = ArtifactFormat("qlip-quant-state", 1, "quant_state.safetensors", "quant_config.json",
                            "quantized state", "run the calibrate stage: `python -m pipeline.fit calibrate`",
                            required=("quant_config.w_bits", "quant_config.a_bit_options", "quant_config.n_steps",
                                      "layers", "policy", "model.unet_config", "model.weights_sha256"))


def model_fingerprint(unet: nn.Module) -> dict:
    """What a quantized state must match: the UNet config and a weight checksum."""
    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    h = hashlib.sha256()
    quantizer_params = {id(p) for m in unet.modules() if isinstance(m, (WeightQuantizer, ActQuantBank))
                        for p in m.parameters()}
    for name, p in unet.named_parameters():
        if id(p) in quantizer_params:
            continue
        if p.device.type == "meta":
            h.update(f"{name}{tuple(p.shape)}".encode())
            continue
        flat = p.detach().reshape(-1).cpu()  # summed on the CPU: the same checksum from any device
        h.update(name.encode())
        h.update(flat[:256].float().cpu().numpy().tobytes())
        h.update(str(round(float(flat.double().sum()), 4)).encode())
    return {"unet_config": json.loads(json.dumps(cfg, default=list)), "weights_sha256": h.hexdigest()}


def quantizer_state(module: nn.Module, prefix: str = "",
                    kinds: tuple[type, ...] = (WeightQuantizer, ActQuantBank)) -> dict[str, torch.Tensor]:
    """Tensors of every quantizer under `module` (of `kinds`: `(WeightQuantizer,)` gives every weight option's,
    the default one's `w_quant` and the others' `w_options.<bits>`), keyed by their names in the UNet
    (`prefix` = the module's own name when it is a submodule)."""
    state = {}
    for name, m in module.named_modules(prefix=prefix):
        if isinstance(m, kinds):
            for k, v in m.state_dict().items():
                state[f"{name}.{k}"] = v.detach().contiguous()
    return state


def assign_quantizer_tensors(unet: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put saved quantizer tensors back in place (parameters keep their identity)."""
    modules = dict(unet.named_modules())
    homeless = sorted({k.rpartition(".")[0] for k in tensors} - set(modules))
    if homeless:  # e.g. a weight option the receiving UNet was not wrapped with
        raise ValueError(f"{len(homeless)} quantizers of the saved tensors do not exist in this UNet "
                         f"({', '.join(homeless[:3])}); wrap it with the same quantization settings (the same "
                         f"--w-bits and --w-bit-options) as the UNet they were taken from")
    with torch.no_grad():
        for key, value in tensors.items():
            mod_name, _, attr = key.rpartition(".")
            module = modules[mod_name]
            current = getattr(module, attr)
            if isinstance(current, nn.Parameter):
                current.data = value.to(current.dtype)
            else:
                setattr(module, attr, value)


def save_quantized(unet: nn.Module, path: str | Path, extra: dict | None = None,
                   extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the state (quant_state.safetensors + quant_config.json) into folder `path`."""

    tensors = quantizer_state(unet)
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra.{k}"] = v
    meta = {
        "quant_config": unet.quant_config.to_dict(),
        "layers": list(quant_layers(unet)),
        "policy": {n: m.policy for n, m in quant_layers(unet).items()},
        "model": model_fingerprint(unet),
        "extra": extra or {},
    }
    if unet.quant_config.mixed_weights:  # per-layer weight bits (only then: one-option states stay as before)
        meta["w_policy"] = {n: m.w_bits for n, m in quant_layers(unet).items()}
    return save_artifact(path, QUANT_STATE, tensors, meta)


def read_meta(path: str | Path, flag: str | None = None) -> dict:
    return read_artifact_meta(path, QUANT_STATE, flag)


def check_same_model(meta: dict, unet: nn.Module, path) -> None:
    want, have = meta["model"], model_fingerprint(unet)
    diff = [k for k in set(want["unet_config"]) | set(have["unet_config"])
            if want["unet_config"].get(k) != have["unet_config"].get(k)]
    if diff:
        detail = ", ".join(f"{k}: state {want['unet_config'].get(k)!r} vs model {have['unet_config'].get(k)!r}"
                           for k in sorted(diff)[:4])
        kinds = [_family(c) for c in (want["unet_config"], have["unet_config"])]
        family = f"a state of an {kinds[0]} UNet loaded into an {kinds[1]} UNet; " if kinds[0] != kinds[1] else ""
        raise ValueError(f"quantized state {path} belongs to another UNet architecture ({family}{detail})")
    if want["weights_sha256"] != have["weights_sha256"]:
        raise ValueError(f"quantized state {path} was calibrated on other weights of this architecture "
                         f"(checksum {want['weights_sha256'][:12]} vs {have['weights_sha256'][:12]})")


def _family(unet_config: dict) -> str:
    return "SDXL" if unet_config.get("addition_embed_type") == "text_time" else "SD 1.x/2.x"


def load_quantized(unet: nn.Module, path: str | Path, strict_model: bool = True):
    """Quantize `unet` as recorded in `path` and load the quantizer tensors.

    Returns (unet, meta, extra_tensors)."""

    path = Path(path)
    meta = read_meta(path)
    if strict_model:
        check_same_model(meta, unet, path)
    cfg = QuantConfig.from_dict(meta["quant_config"])
    quantize_unet(unet, cfg, only=meta["layers"], init_weights=False)
    tensors = load_artifact_tensors(path, QUANT_STATE, device=next(unet.parameters()).device)
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    tensors = {k: v for k, v in tensors.items() if not k.startswith("extra.")}
    expected = set(quantizer_state(unet))
    old = [k for k in expected - set(tensors) if k.endswith("_skip") and k[: -len("_skip")] in tensors]
    if old:  # a state from before split weight ranges: its one range served both halves, and still does
        print(f"note: {path} has one weight range for both halves of {len(old) // 2} split layer(s); kept as saved")
        tensors.update({k: tensors[k[: -len("_skip")]] for k in old})
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"{path / QUANT_STATE.tensors} does not match the quantized model: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    assign_quantizer_tensors(unet, tensors)
    for name, layer in quant_layers(unet).items():
        layer.policy = list(meta["policy"][name])
    if "w_policy" in meta:
        set_weight_bits(unet, meta["w_policy"])
    return unet, meta, extra
