"""A deployed layer's input quantize pass: x -> uint8 codes q = clamp(round(x / s), -z, qmax - z) + z, with the
per-tensor (scale s, zero point z) of the call's bit option and step slot; the int8 kernels take q and z.

It is the fake quantizer's own arithmetic (`ActQuantBank.codes`: divide, round half to even, clamp), shifted and
cast: bit-exact with the fake-quant model in fp32; in the bf16 runtime, the same arithmetic on the input's values
cast up. It runs as one fused pass (pipeline/quant/kernels.py, the same codes bit for bit) and falls back to the
eager one where that does not apply (a strided slice of a split layer's input, no compiler).

Measured and not used: a torch.compile'd one-pass kernel (inductor, x * (1/s)) was slower in wall time at 2
threads, from dynamo's per-call overhead, and `torch.quantize_per_tensor` rounds x * (1/s) and is deprecated
(docs/deploy.md)."""
from __future__ import annotations

import torch

from pipeline.quant import kernels


def uint8_codes(bank, x: torch.Tensor, k: int, slot: int) -> torch.Tensor:
    """The uint8 codes of `x` under `bank`'s quantizer (bit option k, step slot)."""
    scale, lo, hi = bank._inference_params()[k][slot]
    fused = kernels.uint8_codes(x, scale, lo, hi)  # one pass, the same codes (pipeline/quant/kernels.py)
    if fused is not None:
        return fused
    return bank.codes(x, k, slot).add_(-lo).to(torch.uint8)
