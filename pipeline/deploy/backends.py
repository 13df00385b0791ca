"""Runtime backends behind one interface: `prepare(layer)` once after loading, `part_call(layer, i, xq,
x_scale, x_zero, bias, out_dtype)` for each integer call (xq = the input's uint8 codes q, per-tensor zero point
x_zero: codes.py; the result is weight part i's output in `out_dtype`, the runtime's fp32 or bf16, with `bias`
added when given).

- `reference`: pure PyTorch integer emulation (exact integer accumulators in float64), the test oracle.
- `onednn`: CPU int8 conv/linear (`torch.ops.onednn.qconv_pointwise` / `qlinear_pointwise`, weights prepacked
  once). The kernels take per-tensor uint8 activations with our own scale and zero point per call, so one
  prepacked weight serves every step slot and every activation option of <= 8 bits. They ignore a weight zero
  point, so they take q - z codes (<= 7 bits, or 8 symmetric bits) and 8-bit asymmetric weights get the exact
  zero-point correction.
- `gpu`: CUDA int8 matmul for Linear (torchao's `int_matmul`: cuBLASLt `_int_mm`, compiled with torch.compile) from
  our own integer weights and per-call activation qparams; convs weight-only. torchao is imported only here.
Calls at 16 or 32 bits run the layer's weight-only path on every backend (layer.py)."""
from __future__ import annotations

import functools

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

    def runs_integer(self, layer) -> bool:
        """Whether `layer`'s <= 8-bit calls run on this backend's integer kernel (else weight-only)."""
        return self.integer

    def part_call(self, layer, i: int, xq: torch.Tensor, x_scale: float, x_zero: int, bias,
                  out_dtype: torch.dtype = torch.float32):
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

    def part_call(self, layer, i, xq, x_scale, x_zero, bias, out_dtype=torch.float32):
        acc = self.accumulate(layer, i, xq.double() - x_zero)
        out = (acc * (x_scale * _channel_shape(layer, layer.part(i).scale.double()))).float()
        return (out if bias is None else out + _channel_shape(layer, bias.float())).to(out_dtype)


def fits_int8(part) -> bool:
    """Whether a weight part's codes q - z are int8: up to 7 bits, or 8 symmetric bits (z = 128, stored as 0)."""
    return part.bits <= 7 or not part.zero.any()


def check_weight_zero_point(zero_point: torch.Tensor, where: str) -> None:
    """oneDNN's int8 kernels take a weight zero point argument and silently ignore it: refuse a non-zero one."""
    bad = torch.nonzero(zero_point.reshape(-1)).reshape(-1)
    if len(bad):
        raise ValueError(f"{where}: weight zero point {int(zero_point.reshape(-1)[bad[0]])} in output channel "
                         f"{int(bad[0])} would be ignored by the oneDNN int8 kernel; give it q - zero_point codes "
                         f"(weights of <= 7 bits, or 8 symmetric bits) or use the zero-point correction "
                         f"(8-bit asymmetric weights)")


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
            if fits_int8(part):  # q - z is the kernel's int8 weight, its zero point 0
                weight, correction = part.codes().to(torch.int8), None
            else:  # 8 bits: q - 128 with zero point z - 128, corrected exactly after the kernel
                weight, correction = part.stored.reshape(part.shape), part.zero.float() * part.scale
                if layer.kind == "conv" and layer.conv_kwargs["groups"] != 1:
                    raise ValueError("the 8-bit zero-point correction covers convs with groups=1 only")
            zeros = torch.zeros(part.shape[0], dtype=torch.long)
            layer.kernels.append((onednn_prepack(layer, weight, part.scale, zeros), part.scale, zeros, correction))

    def part_call(self, layer, i, xq, x_scale, x_zero, bias, out_dtype=torch.float32):
        packed, w_scale, zeros, correction = layer.kernels[i]
        fix = None if correction is None else _receptive_sum(layer, xq.float() - x_zero)
        if layer.kind == "conv":
            kw = layer.conv_kwargs
            y = torch.ops.onednn.qconv_pointwise(xq, x_scale, x_zero, packed, w_scale, zeros, bias,
                                                 list(kw["stride"]), list(kw["padding"]), list(kw["dilation"]),
                                                 kw["groups"], 1.0, 0, out_dtype, "none", [], "")
        else:
            y = torch.ops.onednn.qlinear_pointwise(xq, x_scale, x_zero, packed, w_scale, zeros, bias, 1.0, 0,
                                                   out_dtype, "none", [], "")
        # sum x (q_w' - z_w') = sum x q_w' - z_w' sum x, with q_w' = q_w - 128 (a bf16 output is corrected after
        # its rounding: an error of bf16's own size)
        if fix is not None:
            if y.dim() == 4:  # the kernel's channels-last layout: a mixed-layout broadcast is several times slower
                fix = fix.contiguous(memory_format=torch.channels_last)
            y = y.addcmul_(fix, _channel_shape(layer, correction * x_scale), value=-1)  # one pass, no temporary
        return y


def _int8_linear(codes, x_zero, x_scale, w_t, w_scale, w_sum, w_zero, bias):
    """A Linear on int8 from the activation codes c = q_x - z_x (floats, [..., K]). The GPU kernel takes signed
    int8, so it gets a = q_x - 128 and the result is corrected exactly: sum c w = sum a w - (z_x - 128) sum w.
    8-bit weights arrive as w = q_w - 128 with zero point `w_zero` = z_w - 128: sum c (w - w_zero) = sum c w -
    w_zero sum c. Integer accumulators are int32 (exact); `x_zero` / `x_scale` are 0-d tensors, so one compiled
    graph serves every call of a shape."""
    from torchao.kernel.intmm import int_matmul  # lazy: torchao is an optional, GPU-only dependency

    shape = codes.shape
    c = codes.reshape(-1, shape[-1])
    acc = int_matmul((c + (x_zero - 128)).to(torch.int8), w_t).float()
    acc = acc - (x_zero - 128).float() * w_sum
    if w_zero is not None:
        acc = acc - c.sum(-1, keepdim=True) * w_zero
    y = acc * (x_scale * w_scale)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], -1)


class GPUBackend(Backend):
    """Static int8 Linear on CUDA (torchao `int_matmul` under torch.compile); convs run weight-only."""

    name = "gpu"
    integer = True

    def __init__(self, compile: bool = True):
        self.compile = compile  # False: eager (a check of the arithmetic where inductor cannot run)
        self._fn = None

    def runs_integer(self, layer) -> bool:
        return layer.kind == "linear"

    def prepare(self, layer) -> None:
        layer.kernels = []
        if layer.kind != "linear":
            return
        for i in range(len(layer.parts)):
            part = layer.part(i)
            if fits_int8(part):  # q - z: no weight zero point left
                w, w_zero = part.codes().to(torch.int8), None
            else:  # 8 bits: stored q - 128, zero point z - 128 (corrected in _int8_linear)
                w, w_zero = part.stored.reshape(part.shape), part.zero.float()
            layer.kernels.append((w.t().contiguous(), part.scale.float(), w.sum(1, dtype=torch.int32).float(),
                                  w_zero))

    def part_call(self, layer, i, xq, x_scale, x_zero, bias, out_dtype=torch.float32):
        codes = xq.float() - x_zero
        if self._fn is None:
            self._fn = torch.compile(_int8_linear, dynamic=True) if self.compile else _int8_linear
        if layer.kernels[i][0].device != codes.device:  # the UNet moved after prepare (attach(..).to(cuda))
            layer.kernels[i] = tuple(t if t is None else t.to(codes.device) for t in layer.kernels[i])
        w_t, w_scale, w_sum, w_zero = layer.kernels[i]
        as_tensor = lambda v, dtype: torch.tensor(v, dtype=dtype, device=codes.device)  # noqa: E731
        return self._fn(codes, as_tensor(x_zero, torch.float32), as_tensor(x_scale, torch.float32), w_t, w_scale,
                        w_sum, w_zero, None if bias is None else bias.float()).to(out_dtype)


def gpu_missing() -> str | None:
    """Why the GPU backend cannot run here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import torchao.kernel.intmm  # noqa: F401  lazy: an optional dependency, checked only when asked for
    except ImportError as e:
        return f"torchao is not installed ({e}; pip install torchao)"
    return None


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


@functools.cache
def onednn_bf16_missing() -> str | None:
    """Why the oneDNN int8 kernels cannot write bf16 here (the bf16 runtime), or None: probed once on a tiny
    Linear, since oneDNN decides per CPU (bf16 output needs AVX-512 or newer)."""
    if missing := onednn_missing():
        return missing
    try:
        w = torch.ops.onednn.qlinear_prepack(torch.ones(2, 4, dtype=torch.int8), None)
        y = torch.ops.onednn.qlinear_pointwise(torch.ones(1, 4, dtype=torch.uint8), 1.0, 0, w, torch.ones(2),
                                               torch.zeros(2, dtype=torch.long), None, 1.0, 0, torch.bfloat16,
                                               "none", [], "")
    except RuntimeError as e:
        return f"oneDNN's int8 kernels do not write bf16 on this CPU ({str(e).splitlines()[0]})"
    if y.dtype != torch.bfloat16 or y.float().tolist() != [[4.0, 4.0]]:
        return f"oneDNN's int8 kernel wrote {y.dtype} {y.float().tolist()} for a bf16 probe (expected 4.0, 4.0)"
    return None


def check_backend(name: str, config: QuantConfig | None = None) -> None:
    """Refuse, before anything loads, a backend this machine lacks or options no deployed kernel serves."""
    if name not in BACKENDS:
        raise ValueError(f"--backend {name!r} is not known: choose one of {', '.join(BACKENDS)}")
    if name == "onednn" and onednn_missing():
        raise ValueError(f"--backend onednn needs oneDNN's int8 kernels: {onednn_missing()}; use --backend reference")
    if name == "gpu" and gpu_missing():
        raise ValueError(f"--backend gpu (torchao static int8 Linear under torch.compile) is not on this machine: "
                         f"{gpu_missing()}; use --backend onednn (CPU int8) or reference")
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
    return {"reference": ReferenceBackend, "onednn": OneDNNBackend, "gpu": GPUBackend}[name]()


def set_backend(unet, name: str) -> None:
    """Run every deployed layer of `unet` on backend `name` (weights prepared once here)."""
    backend = make_backend(name)
    for m in unet.modules():
        if isinstance(m, RealQuantLayer):
            backend.prepare(m)
            m.backend = backend
    unet.deploy_backend = name
