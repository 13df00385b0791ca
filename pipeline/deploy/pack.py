"""Integer weights from a fake-quantized layer, and back.

A quantized layer's weight is `codes * scale`, where `codes = q - zero_point` come from its own
`WeightQuantizer.codes` (never recomputed here from the float weight). A layer is stored as one part, or two
for a split shortcut (input channels [:split] and [split:], each with its own per-output-channel grid):

- 2..4 bits: q in [0, 2^b - 1] packed two per byte (low nibble first, along the flattened weight), with the
  per-channel zero point as uint8;
- 5..8 bits: q - 2^(b-1) as int8 and zero_point - 2^(b-1) as int8 (so q - zero_point is their difference).

`unpack` gives the codes back as int8 for 2..7 bits (|q - z| <= 127); 8-bit codes span [-255, 255], so an int8
kernel takes the stored int8 `q - 128` with its zero point `z - 128` and the runtime adds the exact zero-point
correction (docs/deploy.md#w8)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

PACKED_BITS = tuple(range(2, 9))  # weight bits that export packs; 32 stays float


@dataclass
class Part:
    """One weight grid of a layer: input channels [start, stop), integers as stored, per-channel grid."""

    start: int
    stop: int
    bits: int
    stored: torch.Tensor  # uint8 nibbles (bits <= 4) or int8 (5..8)
    zero: torch.Tensor  # [out] uint8 (bits <= 4) or int8: the zero point in the stored integers' offset
    scale: torch.Tensor  # [out] float32
    shape: tuple  # the part's weight shape [out, stop - start, *kernel]

    def codes(self) -> torch.Tensor:
        """q - zero_point as int16 (exact for every width), shaped as the part's weight."""
        q = unpack_nibbles(self.stored, self.shape) if self.bits <= 4 else self.stored.reshape(self.shape)
        return q.to(torch.int16) - self.zero.to(torch.int16).reshape(-1, *([1] * (len(self.shape) - 1)))

    def dequantized(self) -> torch.Tensor:
        return self.codes().float() * self.scale.reshape(-1, *([1] * (len(self.shape) - 1)))


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 values in [0, 15], flattened, two per byte (low nibble first; an odd count is padded by 0)."""
    flat = q.reshape(-1).to(torch.uint8)
    if flat.numel() and int(flat.max()) > 15:
        raise ValueError("pack_nibbles takes values in [0, 15]")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, shape) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= int(d)
    both = torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)
    return both[:n].reshape(shape)


def stored_size(bits: int, shape) -> tuple[tuple, torch.dtype]:
    """The stored integers' shape and dtype for a part of weight shape `shape` (meta-device loading)."""
    n = 1
    for d in shape:
        n *= int(d)
    if bits <= 4:
        return ((n + 1) // 2,), torch.uint8
    return tuple(shape), torch.int8


def pack_part(codes: torch.Tensor, zero_point: torch.Tensor, scale: torch.Tensor, bits: int, start: int,
              stop: int) -> Part:
    """Store exact codes q - zero_point (floats holding integers) with their per-channel grid."""
    if bits not in PACKED_BITS:
        raise ValueError(f"{bits}-bit weights have no integer kernel: export packs weights of 2..8 bits "
                         f"(or keeps 32-bit weights in float); calibrate with --w-bits 4 or 8")
    zp = zero_point.reshape(-1).round()
    q = codes + zp.reshape(-1, *([1] * (codes.dim() - 1)))
    if q.min() < 0 or q.max() > 2**bits - 1 or not torch.equal(q, q.round()):
        raise ValueError(f"weight codes outside the {bits}-bit grid [0, {2**bits - 1}]: not a frozen quantizer's")
    if bits <= 4:
        stored, zero = pack_nibbles(q.to(torch.uint8)), zp.to(torch.uint8)
    else:
        half = 2 ** (bits - 1)
        stored, zero = (q - half).to(torch.int8), (zp - half).to(torch.int8)
    return Part(start, stop, bits, stored, zero, scale.reshape(-1).float().contiguous(), tuple(codes.shape))


def empty_part(start: int, stop: int, bits: int, shape) -> Part:
    """A part with uninitialized tensors on the meta device, filled when the artifact's tensors load."""
    stored_shape, dtype = stored_size(bits, shape)
    zero_dtype = torch.uint8 if bits <= 4 else torch.int8
    with torch.device("meta"):
        return Part(start, stop, bits, torch.empty(stored_shape, dtype=dtype), torch.empty(shape[0], dtype=zero_dtype),
                    torch.empty(shape[0]), tuple(shape))


@torch.no_grad()
def pack_layer(layer) -> list[Part]:
    """The parts of a QuantLayer's weight, from the quantizer in force's own codes (`WeightQuantizer.codes`;
    `layer.wq`: a MixDQ state sets each layer's weight option)."""
    wq, w = layer.wq, layer.weight.detach()
    codes = wq.codes(w)
    halves = [(0, w.shape[1], wq.scale, wq.zero_point)]
    if wq.split:
        halves = [(0, wq.split, wq.scale, wq.zero_point), (wq.split, w.shape[1], wq.scale_skip, wq.zero_point_skip)]
    return [pack_part(codes[:, a:b], zp, s, wq.n_bits, a, b) for a, b, s, zp in halves]
