"""`RealQuantLayer`: a QuantLayer whose weight is stored as integers (pack.py) and whose calls run on a backend.

It is a QuantLayer (same policy, step slots, activation banks, `set_bit_policy`, `set_schedule`, the attention
processor's q/k/v routing), so a QLIP policy routes each (layer, step) call at run time:

- activation option <= 8 bits and a backend with an integer kernel for this layer (`runs_integer`): the
  input's uint8 codes (codes.py: in fp32 the bank's own `codes`), the kernel on integers (one call per weight
  part: a split shortcut runs as two convs over its two halves);
- 16 or 32 bits (or the float-only path): weight-only, the fake-quantized input times the dequantized weight,
  cached once, which is the fake-quant layer's own arithmetic; with fine_grids="drop", the float input as is.

Both paths compute in the runtime's dtype (`runtime_dtype`, load_unet(dtype=)): fp32 by default; in the bf16
runtime the int8 kernels write bf16 and the weight-only path multiplies bf16 inputs by bf16 weights."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.deploy.codes import uint8_codes
from pipeline.deploy.pack import Part
from pipeline.quant.attention import FINE_BITS
from pipeline.quant.layers import QuantLayer, fp32_math


@dataclass(frozen=True)
class WeightBits:
    """What bit accounting reads of a layer's weight quantizer (`m.w_quant.n_bits`), without its tensors."""

    n_bits: int
    split: int = 0


class RealQuantLayer(QuantLayer):
    def __init__(self, source: QuantLayer, parts: list[Part]):
        nn.Module.__init__(self)
        for name in ("kind", "in_features", "out_features", "ctx", "split", "bit_options", "time_aware", "policy",
                     "quant_act"):
            setattr(self, name, getattr(source, name))
        self.conv_kwargs = dict(getattr(source, "conv_kwargs", {}))
        self.act, self.act_skip, self.bias = source.act, source.act_skip, source.bias
        self.mixture = None
        self.quant_weight = bool(parts)
        self.w_quant = WeightBits(parts[0].bits if parts else 32, source.split)
        self.w_bits, self.w_options = self.w_quant.n_bits, None  # the one weight option the artifact holds
        self.weight = None if parts else source.weight  # a 32-bit weight stays in float
        self.parts = [(p.start, p.stop, p.bits, p.shape) for p in parts]
        for i, p in enumerate(parts):
            self.register_buffer(f"qweight{i}", p.stored)
            self.register_buffer(f"w_zero{i}", p.zero)
            self.register_buffer(f"w_scale{i}", p.scale)
        self.backend = None
        self.drop_fine_grids = False  # load_unet(fine_grids="drop")
        self.kernels: list = []  # the backend's prepared weights, one per part
        self.runtime_dtype = torch.float32  # load_unet(dtype=): what the float path and the kernels' outputs use
        self._float_weight: torch.Tensor | None = None

    def part(self, i: int) -> Part:
        start, stop, bits, shape = self.parts[i]
        return Part(start, stop, bits, getattr(self, f"qweight{i}"), getattr(self, f"w_zero{i}"),
                    getattr(self, f"w_scale{i}"), shape)

    def dequantized_weight(self) -> torch.Tensor:
        """codes * scale, per part, concatenated along the input channels: torch.equal to the fake-quant weight."""
        if self.weight is not None:
            return self.weight
        return torch.cat([self.part(i).dequantized() for i in range(len(self.parts))], dim=1)

    def quantized_weight(self) -> torch.Tensor:
        """The weight the float path multiplies: dequantized once (on the device the UNet runs on), in the
        runtime's dtype; a conv's channels-last on CPU (`float_call`)."""
        if self._float_weight is None:
            w = self.dequantized_weight().to(self.runtime_dtype)
            self._float_weight = w.contiguous(memory_format=torch.channels_last) if self._channels_last(w) else w
        return self._float_weight

    def _channels_last(self, t: torch.Tensor) -> bool:
        return self.kind == "conv" and t.device.type == "cpu"

    def fp_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("a deployed layer has no full-precision weight (BOS-aware K/V needs it); "
                         "export a state calibrated without --bos-aware")

    def float_call(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight()
        if self.kind == "conv":
            # On CPU the float convs run channels-last, as the int8 kernels do: a policy that mixes the two then
            # never hands a conv a layout that differs from its weight's, which oneDNN runs 20-80% slower, and
            # never adds tensors of two layouts (several times slower than one)
            if self._channels_last(x):
                x = x.contiguous(memory_format=torch.channels_last)
            return F.conv2d(x, w, self.bias, **self.conv_kwargs)
        return F.linear(x, w, self.bias)

    @fp32_math
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mixture is not None:
            raise ValueError("a relaxed bit mixture (Q2B training) runs on the fake-quant UNet; a deployed UNet "
                             "takes hard per-(layer, step) policies (set_bit_policy)")
        if not self.quant_act:
            return self.float_call(x)
        k, slot = self.bit_index(), self.slot()
        if self.drop_fine_grids and self.bit_options[k] >= FINE_BITS:  # fine_grids="drop": float input as is
            return self.float_call(x)
        if self.parts and self.bit_options[k] <= 8 and self.backend is not None and self.backend.runs_integer(self):
            return self.integer_call(x, k, slot)
        return self.float_call(self._quantize(x, k, slot))

    def integer_call(self, x: torch.Tensor, k: int, slot: int) -> torch.Tensor:
        out = None
        for i, (start, stop, _, _) in enumerate(self.parts):
            bank = self.act if i == 0 else self.act_skip
            xs = x if len(self.parts) == 1 else x[:, start:stop]
            scale, lo, _ = bank._inference_params()[k][slot]
            xq = uint8_codes(bank, xs, k, slot)
            y = self.backend.part_call(self, i, xq, scale, int(-lo), self.bias if i == 0 else None, x.dtype)
            out = y if out is None else out.add_(y)
        return out

    def extra_repr(self) -> str:
        return (f"{self.kind}, {self.in_features}->{self.out_features}, w_bits={self.w_quant.n_bits}, "
                f"parts={len(self.parts)}, backend={getattr(self.backend, 'name', None)}")
