"""Runtime backends behind one interface: `prepare(layer)` once after loading, `part_call(layer, i, codes,
x_scale, x_zero, bias)` for each integer call (codes = the input's q - zero_point, floats; the result is the
float output of weight part i, with `bias` added when given).

- `reference`: pure PyTorch integer emulation (exact integer accumulators in float64), the test oracle.
- `onednn`: CPU int8 conv/linear (`torch.ops.onednn.qconv_pointwise` / `qlinear_pointwise`, weights prepacked
  once). The kernels take per-tensor uint8 activations with our own scale and zero point per call, so one
  prepacked weight serves every step slot and every activation option of <= 8 bits. They ignore a weight zero
  point, so they take q - z codes (<= 7 bits) and 8-bit weights get the exact zero-point correction.
- `gpu`: torchao, CUDA only (not written yet; a clear error).
Calls at 16 or 32 bits run the layer's weight-only path on every backend (layer.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.deploy.layer import RealQuantLayer
from pipeline.quant.config import QuantConfig

BACKENDS = ("reference", "onednn", "gpu")


class Backend:
    name = "float"
    integer = False  # whether <= 8-bit calls run on integers

    def prepare(self, layer) -> None:
        layer.kernels = []

    def part_call(self, layer, i: int, codes: torch.Tensor, x_scale: float, x_zero: int, bias):
        raise NotImplementedError


def _receptive_sum(layer, codes: torch.Tensor) -> torch.Tensor:
    """Sum of the input codes over each output's receptive field (all input channels): the term that a
    weight zero point multiplies. Exact: integer-valued floats far below 2^24."""
    if layer.kind == "linear":
        return codes.sum(-1, keepdim=True)
    kw = layer.conv_kwargs
    kernel = codes.new_ones(1, 1, *layer.parts[0][3][2:])
    return F.conv2d(codes.sum(1, keepdim=True), kernel, stride=kw["stride"], padding=kw["padding"],
                    dilation=kw["dilation"])


def _channel_shape(layer, v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1) if layer.kind == "conv" else v


class ReferenceBackend(Backend):
    name = "reference"
    integer = True

    def prepare(self, layer) -> None:
        layer.kernels = [layer.part(i).codes().double() for i in range(len(layer.parts))]

    def accumulate(self, layer, i: int, codes: torch.Tensor) -> torch.Tensor:
        """sum (q_x - z_x)(q_w - z_w): integers, exact in float64."""
        if layer.kind == "conv":
            return F.conv2d(codes.double(), layer.kernels[i], **layer.conv_kwargs)
        return F.linear(codes.double(), layer.kernels[i])

    def part_call(self, layer, i, codes, x_scale, x_zero, bias):
        acc = self.accumulate(layer, i, codes)
        out = (acc * (x_scale * _channel_shape(layer, layer.part(i).scale.double()))).float()
        return out if bias is None else out + _channel_shape(layer, bias)


def check_weight_zero_point(zero_point: torch.Tensor, where: str) -> None:
    """oneDNN's int8 kernels take a weight zero point argument and silently ignore it: refuse a non-zero one."""
    bad = torch.nonzero(zero_point.reshape(-1)).reshape(-1)
    if len(bad):
        raise ValueError(f"{where}: weight zero point {int(zero_point.reshape(-1)[bad[0]])} in output channel "
                         f"{int(bad[0])} would be ignored by the oneDNN int8 kernel; give it q - zero_point codes "
                         f"(weights of <= 7 bits) or use the zero-point correction (8-bit weights)")


def onednn_prepack(layer, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """The kernel's prepacked int8 weight, after the zero-point guard."""
    check_weight_zero_point(zero_point, f"{layer.kind} {layer.in_features}->{layer.out_features}")
    if layer.kind == "linear":
        return torch.ops.onednn.qlinear_prepack(weight, None)
    kw = layer.conv_kwargs
    return torch.ops.onednn.qconv_prepack(weight, scale, 1.0, 0, list(kw["stride"]), list(kw["padding"]),
                                          list(kw["dilation"]), kw["groups"], None)


class OneDNNBackend(Backend):
    name = "onednn"
    integer = True

    def prepare(self, layer) -> None:
        layer.kernels = []
        for i in range(len(layer.parts)):
            part = layer.part(i)
            if part.bits <= 7:  # q - z fits int8: the kernel's zero point is 0
                weight, correction = part.codes().to(torch.int8), None
            else:  # 8 bits: q - 128 with zero point z - 128, corrected exactly after the kernel
                weight, correction = part.stored.reshape(part.shape), part.zero.float() * part.scale
                if layer.kind == "conv" and layer.conv_kwargs["groups"] != 1:
                    raise ValueError("the 8-bit zero-point correction covers convs with groups=1 only")
            zeros = torch.zeros(part.shape[0], dtype=torch.long)
            layer.kernels.append((onednn_prepack(layer, weight, part.scale, zeros), part.scale, zeros, correction))

    def part_call(self, layer, i, codes, x_scale, x_zero, bias):
        packed, w_scale, zeros, correction = layer.kernels[i]
        fix = None if correction is None else _receptive_sum(layer, codes)
        xq = codes.add_(x_zero).to(torch.uint8)
        if layer.kind == "conv":
            kw = layer.conv_kwargs
            y = torch.ops.onednn.qconv_pointwise(xq, x_scale, x_zero, packed, w_scale, zeros, bias,
                                                 list(kw["stride"]), list(kw["padding"]), list(kw["dilation"]),
                                                 kw["groups"], 1.0, 0, torch.float32, "none", [], "")
        else:
            y = torch.ops.onednn.qlinear_pointwise(xq, x_scale, x_zero, packed, w_scale, zeros, bias, 1.0, 0,
                                                   torch.float32, "none", [], "")
        if fix is not None:  # sum x (q_w' - z_w') = sum x q_w' - z_w' sum x, with q_w' = q_w - 128
            if y.dim() == 4:  # the kernel's channels-last layout: a mixed-layout broadcast is several times slower
                fix = fix.contiguous(memory_format=torch.channels_last)
            y = y.sub_(fix * _channel_shape(layer, correction * x_scale))
        return y


def onednn_missing() -> str | None:
    """Why the oneDNN int8 kernels cannot run here, or None."""
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    for op in ("qconv_prepack", "qconv_pointwise", "qlinear_prepack", "qlinear_pointwise"):
        try:
            getattr(torch.ops.onednn, op)
        except (AttributeError, RuntimeError):
            return f"torch.ops.onednn.{op} is missing in torch {torch.__version__}"
    return None


def check_backend(name: str, config: QuantConfig | None = None) -> None:
    """Refuse, before anything loads, a backend this machine lacks or options no deployed kernel serves."""
    if name not in BACKENDS:
        raise ValueError(f"--backend {name!r} is not known: choose one of {', '.join(BACKENDS)}")
    if name == "onednn" and onednn_missing():
        raise ValueError(f"--backend onednn needs oneDNN's int8 kernels: {onednn_missing()}; use --backend reference")
    if name == "gpu":
        where = "not on this machine (no CUDA device)" if not torch.cuda.is_available() else "not written yet"
        raise ValueError(f"--backend gpu (torchao static int8 Linear under torch.compile) is {where}; "
                         f"use --backend onednn (CPU int8) or reference")
    if config is None:
        return
    if 8 < config.w_bits < 32:
        raise ValueError(f"{config.w_bits}-bit weights (--w-bits) have no integer kernel: the deployable runtime "
                         f"packs weights of 2..8 bits, or keeps 32-bit weights in float")
    if config.bos_aware:
        raise ValueError("BOS-aware K/V (--bos-aware) runs to_k/to_v in full precision on the BOS token, and the "
                         "deployable artifact holds no full-precision weights; calibrate without --bos-aware")


def make_backend(name: str) -> Backend:
    check_backend(name)
    return {"reference": ReferenceBackend, "onednn": OneDNNBackend}[name]()


def set_backend(unet, name: str) -> None:
    """Run every deployed layer of `unet` on backend `name` (weights prepared once here)."""
    backend = make_backend(name)
    for m in unet.modules():
        if isinstance(m, RealQuantLayer):
            backend.prepare(m)
            m.backend = backend
    unet.deploy_backend = name
