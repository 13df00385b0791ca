"""A deployed layer's input quantize pass: x -> uint8 codes q = clamp(round(x / s), -z, qmax - z) + z, with the
per-tensor (scale s, zero point z) of the call's bit option and step slot; the int8 kernels take q and z.

It is the fake quantizer's own code path (`ActQuantBank.codes`: divide, round half to even, clamp), shifted and
cast: bit-exact with the fake-quant model in fp32; in the bf16 runtime, the same arithmetic on the input's values
cast up (`codes` computes half-precision inputs in fp32).

Measured and not used: a torch.compile'd one-pass kernel (inductor, x * (1/s)) spends 20 ms less CPU per
BK-SDM-Tiny call but is slower in wall time at 2 threads (its OpenMP pool competes with PyTorch's), and
`torch.quantize_per_tensor` rounds x * (1/s) and is deprecated (docs/deploy.md)."""
from __future__ import annotations

import torch


def uint8_codes(bank, x: torch.Tensor, k: int, slot: int) -> torch.Tensor:
    """The uint8 codes of `x` under `bank`'s quantizer (bit option k, step slot)."""
    lo = bank._inference_params()[k][slot][1]
    return bank.codes(x, k, slot).add_(-lo).to(torch.uint8)
