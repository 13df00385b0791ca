"""QuantConfig: everything that defines a quantized UNet, serializable to JSON."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pipeline.quant.quantizer import check_bits


def parse_bits(text: str | None, flag: str = "--a-bit-options") -> list[int] | None:
    """'8,16,32' -> [8, 16, 32]; None or '' -> None. Each width is supported and given once."""
    if text in (None, ""):
        return None
    try:
        bits = [int(b) for b in str(text).split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text!r} must be comma-separated integers such as 8,16,32") from None
    for b in bits:
        check_bits(b, f"{flag} {text!r}: the entry")
    twice = sorted({b for b in bits if bits.count(b) > 1})
    if twice:
        raise ValueError(f"{flag} {text!r} lists {', '.join(map(str, twice))} more than once; give each bit width "
                         f"once, e.g. 8,16,32")
    return bits


@dataclass
class QuantConfig:
    """How to quantize a UNet.

    w_bits: weight bits of every Conv2d/Linear (per output channel), and the
        bits a layer starts at when it carries several weight options.
    w_bit_options: one weight quantizer per option per layer (MixDQ's
        per-layer weight bits); defaults to [w_bits].
    a_bits: the default activation bit option every layer starts at.
    a_bit_options: the bank of activation quantizers each layer carries
        (QLIP switches among them per layer and step); defaults to [a_bits].
    n_steps: sampling steps a policy addresses (and time-aware banks hold).
    time_aware: one activation quantizer per sampling step (PCR, TDQ-style).
    softmax_bits: bits of the attention probabilities (Q-Diffusion's sm_abit).
    split_shortcut: separate quantizers for the two halves of the decoder's
        skip-concatenated input (Q-Diffusion).
    bos_aware: keep the BOS token's K/V in full precision (MixDQ).
    weight_symmetric: weight grids centred on 0 (q - zero_point signed): 8-bit weights then deploy on int8
        kernels without the zero-point correction (docs/deploy.md#w8).
    """

    w_bits: int = 8
    a_bits: int = 8
    w_bit_options: list[int] = field(default_factory=list)
    a_bit_options: list[int] = field(default_factory=list)
    n_steps: int = 1
    time_aware: bool = False
    softmax_bits: int = 16
    quant_attention: bool = True
    split_shortcut: bool = True
    bos_aware: bool = False
    weight_init: str = "minmax"  # minmax | lp
    weight_rounding: str = "nearest"  # nearest | adaround
    weight_symmetric: bool = False
    act_init: str = "minmax"  # minmax | lp
    lp_norm: float = 2.4
    lp_candidates: int = 80
    act_samples: int = 4096  # activation values kept per (layer, step) for the lp search
    exclude: list[str] = field(default_factory=list)  # module names left in full precision

    def __post_init__(self):
        check_bits(self.w_bits, "w_bits")
        check_bits(self.a_bits, "a_bits")
        check_bits(self.softmax_bits, "softmax_bits")
        opts = [int(b) for b in (self.a_bit_options or [self.a_bits])]
        for b in opts:
            check_bits(b, "a_bit_options entry")
        if len(set(opts)) != len(opts):
            raise ValueError(f"a_bit_options={opts} has duplicates")
        if self.a_bits not in opts:
            raise ValueError(f"a_bits={self.a_bits} is not one of a_bit_options={opts}; add it or change a_bits")
        self.a_bit_options = sorted(opts)
        w_opts = [int(b) for b in (self.w_bit_options or [self.w_bits])]
        for b in w_opts:
            check_bits(b, "w_bit_options entry")
        if len(set(w_opts)) != len(w_opts):
            raise ValueError(f"w_bit_options={w_opts} has duplicates")
        if self.w_bits not in w_opts:
            raise ValueError(f"w_bits={self.w_bits} is not one of w_bit_options={w_opts}; add it or change w_bits")
        self.w_bit_options = sorted(w_opts)
        if self.n_steps < 1:
            raise ValueError(f"n_steps={self.n_steps} must be >= 1")
        if self.weight_rounding not in ("nearest", "adaround"):
            raise ValueError(f"weight_rounding={self.weight_rounding!r}: use 'nearest' or 'adaround'")
        for name in ("weight_init", "act_init"):
            if getattr(self, name) not in ("minmax", "lp"):
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported: use 'minmax' or 'lp'")

    @property
    def bank_steps(self) -> int:
        return self.n_steps if self.time_aware else 1

    @property
    def mixed_weights(self) -> bool:
        """Whether layers carry more than one weight quantizer."""
        return len(self.w_bit_options) > 1

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not self.mixed_weights:  # one weight option: the JSON (and every progress signature) stays as before
            del d["w_bit_options"]
        if not self.weight_symmetric:  # likewise for the default, asymmetric weights
            del d["weight_symmetric"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown QuantConfig keys {sorted(unknown)}")
        return cls(**d)
