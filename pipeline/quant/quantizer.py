"""The one uniform affine quantizer: fake-quantize, range initialization, and
a per-channel weight quantizer module. Activation banks (layers.py) reuse the
same functions with per-tensor scales."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.quant.adaround import init_alpha, rectified_sigmoid

SUPPORTED_BITS = tuple(range(2, 17)) + (32,)  # 32 = pass-through (full precision)


def check_bits(bits: int, what: str = "bits") -> int:
    if int(bits) != bits or int(bits) not in SUPPORTED_BITS:
        raise ValueError(f"{what}={bits!r} is not supported: use an integer in 2..16, or 32 for full precision")
    return int(bits)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even) with a straight-through gradient."""
    return (x.round() - x).detach() + x


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Asymmetric uniform quantization: to int, clamp to [0, 2^b - 1], back to float.

    `scale`/`zero_point` broadcast against `x` (per-channel or per-tensor)."""
    qmax = 2**n_bits - 1
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        q = torch.clamp(round_ste(x / scale) + zero_point, 0, qmax)
        return (q - zero_point) * scale
    return quantize_codes(x, scale, zero_point, n_bits).mul_(scale)


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, n_bits: int) -> torch.Tensor:
    """The integer codes q - zero_point (as floats) that inference's fake_quantize multiplies by the scale:
    what pipeline/deploy packs, so that exported integers are these very values."""
    # In place, one allocation. With an integer zero point,
    # clamp(round(x/s) + z, 0, qmax) - z == clamp(round(x/s), -z, qmax - z).
    q = torch.div(x, scale).round_()
    return q.clamp_(-zero_point, 2**n_bits - 1 - zero_point)


def scale_zero_point(x_min: torch.Tensor, x_max: torch.Tensor, n_bits: int, symmetric: bool = False):
    """Scale and integer zero point of the range [x_min, x_max], widened to contain 0
    so that 0 is exactly representable (zero padding, ReLU/SiLU zeros).

    symmetric: the grid centred on 0, max(|x_min|, |x_max|) at code 2^(b-1) - 1 and the zero point at 2^(b-1), so
    that q - zero_point spans the signed range [-2^(b-1), 2^(b-1) - 1]: 8-bit weights then run on int8 kernels
    that take no weight zero point (pipeline/deploy) without a correction."""
    if symmetric:
        half = 2 ** (n_bits - 1)
        scale = torch.clamp(torch.maximum(-x_min, x_max) / (half - 1), min=1e-8)
        return scale, torch.full_like(scale, half)
    x_min = torch.clamp(x_min, max=0.0)
    x_max = torch.clamp(x_max, min=0.0)
    scale = torch.clamp((x_max - x_min) / (2**n_bits - 1), min=1e-8)  # a zero range still gives a valid scale
    zero_point = torch.round(-x_min / scale)
    return scale, zero_point


def _reduce(x: torch.Tensor, ch_axis: int | None, fn) -> torch.Tensor:
    if ch_axis is None:
        return fn(x.reshape(-1), dim=0)
    return fn(x.transpose(0, ch_axis).reshape(x.shape[ch_axis], -1), dim=1)


def minmax_range(x: torch.Tensor, ch_axis: int | None = None):
    return _reduce(x, ch_axis, lambda t, dim: t.amin(dim)), _reduce(x, ch_axis, lambda t, dim: t.amax(dim))


def lp_search_range(x: torch.Tensor, n_bits: int, ch_axis: int | None = None, p: float = 2.4,
                    n_candidates: int = 80, shrink: float = 0.01, symmetric: bool = False):
    """Q-Diffusion's range search: shrink the min-max range by 1% steps and keep,
    per channel (or per tensor), the candidate with the smallest L_p error."""
    x_min, x_max = minmax_range(x, ch_axis)
    shape = [1] * x.dim()
    if ch_axis is not None:
        shape[ch_axis] = -1
    best_err = best_min = best_max = None
    for i in range(n_candidates):
        c_min, c_max = x_min * (1 - shrink * i), x_max * (1 - shrink * i)
        scale, zp = scale_zero_point(c_min, c_max, n_bits, symmetric)
        err = (fake_quantize(x, scale.reshape(shape), zp.reshape(shape), n_bits) - x).abs().pow(p)
        err = _reduce(err, ch_axis, lambda t, dim: t.mean(dim))
        if best_err is None:
            best_err, best_min, best_max = err, c_min, c_max
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_min = torch.where(better, c_min, best_min)
            best_max = torch.where(better, c_max, best_max)
    return best_min, best_max


def init_range(x: torch.Tensor, n_bits: int, method: str, ch_axis: int | None = None, p: float = 2.4,
               n_candidates: int = 80, symmetric: bool = False):
    if method == "minmax":
        return minmax_range(x, ch_axis)
    if method == "lp":  # the search scores candidates on the grid they will get
        return lp_search_range(x, n_bits, ch_axis, p=p, n_candidates=n_candidates, symmetric=symmetric)
    raise ValueError(f"range init {method!r} is not supported: use 'minmax' or 'lp'")


class WeightQuantizer(nn.Module):
    """Per-output-channel weight quantizer: asymmetric, or with `symmetric` centred on 0 (scale_zero_point).

    Rounding is to nearest, or learned (AdaRound): `rounding="adaround"` adds
    a `round_up` mask buffer (hard decisions, what a state stores), and
    `start_learning_rounding` / `finish_learning_rounding` bracket the phase in
    which a soft, learnable `alpha` replaces it.

    `split` > 0 (a layer reading cat([h, skip], dim=1)): input channels [:split] and [split:] get their own
    per-output-channel ranges (`scale`/`zero_point` and `scale_skip`/`zero_point_skip`), as Q-Diffusion's
    QuantModule gives the two weight halves their own quantizers (qdiff/quant_layer.py, `split`); the rounding
    (AdaRound's one mask) covers both halves."""

    def __init__(self, n_bits: int, weight: torch.Tensor | None = None, method: str = "minmax", p: float = 2.4,
                 n_candidates: int = 80, init: bool = True, rounding: str = "nearest", split: int = 0,
                 symmetric: bool = False):
        super().__init__()
        self.n_bits = check_bits(n_bits, "w_bits")
        self.symmetric = symmetric
        if rounding not in ("nearest", "adaround"):
            raise ValueError(f"weight rounding {rounding!r} is not supported: use 'nearest' or 'adaround'")
        self.method, self.p, self.n_candidates, self.rounding = method, p, n_candidates, rounding
        self.split = split
        n_out = 0 if weight is None else weight.shape[0]
        shape = (n_out,) + (1,) * (0 if weight is None else weight.dim() - 1)
        dev = None if weight is None else weight.device
        self.register_buffer("scale", torch.ones(shape, device=dev))
        self.register_buffer("zero_point", torch.zeros(shape, device=dev))
        if split:
            self.register_buffer("scale_skip", torch.ones(shape, device=dev))
            self.register_buffer("zero_point_skip", torch.zeros(shape, device=dev))
        if rounding == "adaround" and weight is not None:
            # until learned, the mask reproduces round-to-nearest
            self.register_buffer("round_up", torch.zeros(weight.shape, dtype=torch.bool, device=dev))
        self.alpha: nn.Parameter | None = None
        if weight is not None and init and self.n_bits < 32:
            self.init_from(weight)

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor) -> None:
        halves = (("", weight[:, : self.split]), ("_skip", weight[:, self.split:])) if self.split else (("", weight),)
        for suffix, w in halves:
            lo, hi = init_range(w, self.n_bits, self.method, ch_axis=0, p=self.p, n_candidates=self.n_candidates,
                                symmetric=self.symmetric)
            scale, zp = scale_zero_point(lo, hi, self.n_bits, self.symmetric)
            setattr(self, "scale" + suffix, scale.reshape(self.scale.shape))
            setattr(self, "zero_point" + suffix, zp.reshape(self.zero_point.shape))
        if self.rounding == "adaround":
            ws = weight / self.grid(weight)[0]
            self.round_up = (ws.round() > ws.floor())  # nearest rounding as the starting point

    def grid(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) broadcastable against the weight `w`: per output channel, and per half if split."""
        if not self.split:
            return self.scale, self.zero_point
        n_out, n_in = w.shape[:2]
        rest = w.shape[2:]

        def spread(head, skip):
            return torch.cat([head.expand(n_out, self.split, *rest), skip.expand(n_out, n_in - self.split, *rest)], 1)

        return spread(self.scale, self.scale_skip), spread(self.zero_point, self.zero_point_skip)

    # -- AdaRound -----------------------------------------------------------
    def start_learning_rounding(self, weight: torch.Tensor, start: torch.Tensor | None = None) -> nn.Parameter:
        """A soft, learnable `alpha`: from the FP weight (AdaRound's start), or from `start` (adaround.init_alpha)."""
        if self.rounding != "adaround":
            raise ValueError("this weight quantizer rounds to nearest; build it with rounding='adaround'")
        start = None if start is None else start.detach()
        self.alpha = nn.Parameter(init_alpha(weight.detach(), self.grid(weight)[0], start))
        return self.alpha

    @torch.no_grad()
    def finish_learning_rounding(self) -> None:
        self.round_up = self.alpha >= 0  # h(alpha) >= 0.5
        self.alpha = None

    def state_tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor the forward reads besides the weight (a frozen layer's cache is stamped with them)."""
        return tuple(t for t in [*self._buffers.values(), *self._parameters.values()] if t is not None)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.n_bits == 32:
            return w
        scale, zero_point = self.grid(w)
        if self.rounding == "nearest":
            return fake_quantize(w, scale, zero_point, self.n_bits)
        if self.alpha is not None:
            offset = rectified_sigmoid(self.alpha)
        else:
            return self.codes(w) * scale
        q = torch.clamp(torch.floor(w.detach() / scale) + offset + zero_point, 0, 2**self.n_bits - 1)
        return (q - zero_point) * scale

    @torch.no_grad()
    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """The integer codes q - zero_point (floats, shaped as `w`) that the frozen forward multiplies by
        `grid(w)[0]`: what export packs (pipeline/deploy/pack.py)."""
        if self.n_bits == 32:
            raise ValueError("a 32-bit weight quantizer has no integer codes (the weight stays in float)")
        if self.alpha is not None:
            raise ValueError("AdaRound is still learning this layer's rounding (soft alpha): finish it first")
        scale, zero_point = self.grid(w)
        if self.rounding == "nearest":
            return quantize_codes(w, scale, zero_point, self.n_bits)
        q = torch.clamp(torch.floor(w / scale) + self.round_up.to(w.dtype) + zero_point, 0, 2**self.n_bits - 1)
        return q - zero_point

    def extra_repr(self) -> str:
        return f"w_bits={self.n_bits}, init={self.method}, rounding={self.rounding}" + (
            f", split={self.split}" if self.split else "") + (", symmetric" if self.symmetric else "")
