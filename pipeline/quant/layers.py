"""Quantized Conv2d/Linear with a bank of activation quantizers.

A bank holds one per-tensor activation quantizer per candidate bit option
(and per sampling step when time-aware). The layer's bit policy picks, per
call, which one runs; 32 bits is pass-through. The step comes from a
QuantContext shared by all layers of one UNet (set by the UNet's pre-hook).
For Q2B training a layer may instead hold a per-sample mixture of options
(`policy.bit_mixture`); inference never takes that path."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.quant import kernels
from pipeline.quant.config import QuantConfig
from pipeline.quant.quantizer import WeightQuantizer, fake_quantize, init_range, scale_zero_point


def _version_of(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version  # inference tensors have no version counter


class Stamp:
    """What a cached value was computed from: the tensors themselves, their storages' addresses and in-place
    versions. It holds the tensors and their storages, so that no new tensor can take over their ids or
    addresses while the cache lives: a key of addresses and versions alone matched a new tensor that the
    allocator put where a freed one was (an AdaRound end, new `round_up` at an old address, was handed the
    start's cached weight)."""

    def __init__(self, *tensors: torch.Tensor):
        self.tensors = tensors
        self.pins = tuple(t.detach() for t in tensors)  # keeps each storage alive across `.data =` swaps
        self.versions = tuple(_version_of(t) for t in tensors)

    def matches(self, *tensors: torch.Tensor) -> bool:
        return len(tensors) == len(self.tensors) and all(
            a is b and a.data_ptr() == p.data_ptr() and _version_of(a) == v
            for a, b, p, v in zip(tensors, self.tensors, self.pins, self.versions))


def fp32_math(forward):
    """Run a fake-quantizing forward in fp32 inside an autocast region (--trainer.precision
    16-mixed / bf16-mixed): its rounding grid and ranges must not be re-rounded to half
    precision. Half inputs are cast up; outside autocast the forward runs unchanged."""

    @functools.wraps(forward)
    def wrapped(self, *args, **kwargs):
        x = next((a for a in args if torch.is_tensor(a)), None)
        if x is None or x.device.type == "meta" or not torch.is_autocast_enabled(x.device.type):  # meta: no math
            return forward(self, *args, **kwargs)
        up = lambda a: a.float() if torch.is_tensor(a) and a.is_floating_point() else a  # noqa: E731
        with torch.autocast(x.device.type, enabled=False):
            return forward(self, *[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})

    return wrapped


def mix_options(quantize, indices: list[int], weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """sum_k weights[:, k] * quantize(indices[k]): a per-sample mixture of a bank's
    bit options (Q2B training). With straight-through one-hot weights the forward
    is exactly the chosen quantizer, and the weights still receive gradients."""
    if weights.shape[0] != like.shape[0]:
        raise ValueError(f"a bit mixture for {weights.shape[0]} samples was set, but this call has "
                         f"{like.shape[0]}; set one weight row per sample of the UNet batch (both CFG halves)")
    w = weights.to(like.dtype).reshape(weights.shape + (1,) * (like.dim() - 1))
    return sum(w[:, j] * quantize(k) for j, k in enumerate(indices))


@dataclass
class QuantContext:
    """Per-model runtime state: the current sampling-step index and schedule.

    With a schedule registered (`set_schedule`), the step index comes from the
    sampler's own call counter: call k of a run is step `call_steps[k]`, and
    `timesteps[k]` is the timestep that call must carry (a check, not a lookup)."""

    step: int = 0
    timesteps: list[float] = field(default_factory=list)  # per UNet call of one sampling run
    call_steps: list[int] = field(default_factory=list)  # step index of each call
    calls: int = 0  # calls made in the current run


class ActQuantBank(nn.Module):
    """Per-tensor activation quantizers indexed by (bit option, step slot).

    Calibration: `observing=True` records ranges (and a value sample for the
    L_p search) per step slot and passes activations through unchanged;
    `finalize()` then sets every (bit, slot) quantizer."""

    def __init__(self, bit_options: list[int], n_slots: int = 1, samples: int = 4096):
        super().__init__()
        self.bit_options = list(bit_options)
        self.n_slots = n_slots
        self.samples = samples
        k = len(self.bit_options)
        self.scale = nn.Parameter(torch.ones(k, n_slots))  # learnable LSQ-style
        self.register_buffer("zero_point", torch.zeros(k, n_slots))
        self.register_buffer("calibrated", torch.zeros(k, n_slots, dtype=torch.bool))
        self.observing = False
        self._obs: dict[int, dict] = {}
        self._frozen: tuple[Stamp, list] | None = None  # (stamp, python-float quantizers) for inference

    def forward(self, x: torch.Tensor, k: int, slot: int, inplace: bool = False) -> torch.Tensor:
        """Fake-quantize `x` with quantizer (bit option k, step slot); `inplace`
        lets inference overwrite `x` (a temporary the caller owns)."""
        bits = self.bit_options[k]
        if self.observing:
            self._observe(x, slot)
            return x
        if bits == 32:
            return x
        if torch.is_grad_enabled() and self.scale.requires_grad:
            return fake_quantize(x, self.scale[k, slot], self.zero_point[k, slot], bits)
        if torch.is_grad_enabled() and x.requires_grad:
            # Frozen quantizer, gradient wanted upstream (Q2B training): plain
            # straight-through over the fast path, half the autograd work of
            # fake_quantize (no clipping mask: nothing here learns a range).
            with torch.no_grad():
                q = self._fast(x, k, slot, inplace=False)
            return x + (q - x).detach()
        return self._fast(x, k, slot, inplace)

    def _fast(self, x: torch.Tensor, k: int, slot: int, inplace: bool) -> torch.Tensor:
        """Inference fast path: the same arithmetic with python-float bounds
        (tensor-bounded clamps and per-call indexing dominate small layers)."""
        if x.is_meta:  # a shape trace of a published architecture (its quantizers are on meta too)
            return x
        scale, lo, hi = self._inference_params()[k][slot]
        fused = kernels.fake_quantize(x, scale, lo, hi, inplace)  # one pass, the same values (kernels.py)
        if fused is not None:
            return fused
        return self.codes(x, k, slot, inplace).mul_(scale).to(x.dtype)

    def codes(self, x: torch.Tensor, k: int, slot: int, inplace: bool = False) -> torch.Tensor:
        """The integer codes q - zero_point (floats) that the inference path multiplies by the scale of
        quantizer (k, slot): what the real-kernel runtime feeds its int8 kernels (pipeline/deploy). A bf16 or
        fp16 input (the deployed bf16 runtime) gets fp32 codes of its values: the grid is not re-rounded to half
        precision."""
        s, lo, hi = self._inference_params()[k][slot]
        if x.dtype in (torch.bfloat16, torch.float16):  # x / fp32(s) in fp32: the division does the cast
            q = torch.div(x, torch.tensor([s], dtype=torch.float32, device=x.device))
        else:
            q = x.div_(s) if inplace else torch.div(x, s)
        return q.round_().clamp_(lo, hi)

    def _inference_params(self):
        if self._frozen is None or not self._frozen[0].matches(self.scale, self.zero_point):
            scale, zp = self.scale.detach().double().tolist(), self.zero_point.tolist()
            params = [[(s, -z, 2**b - 1 - z) for s, z in zip(scale[k], zp[k])] for k, b in enumerate(self.bit_options)]
            self._frozen = (Stamp(self.scale, self.zero_point), params)
        return self._frozen[1]

    @torch.no_grad()
    def _observe(self, x: torch.Tensor, slot: int) -> None:
        """Min/max, and a uniform sample for the L_p search: each call draws `samples` values at random
        positions, each drawn value gets a random key, and the `samples` smallest keys over all calls
        are kept (a bottom-k sample: every call is equally represented, however many calls there are)."""
        x = x.detach().float().reshape(-1)
        o = self._obs.get(slot)
        if o is None:  # one generator per slot, seeded: the same sample on every run
            o = self._obs[slot] = {"min": x.min(), "max": x.max(), "sample": [], "keys": None,
                                   "gen": torch.Generator(device="cpu").manual_seed(slot)}
        o["min"], o["max"] = torch.minimum(o["min"], x.min()), torch.maximum(o["max"], x.max())
        if not self.samples:
            return
        g = o["gen"]
        idx = torch.randint(0, x.numel(), (min(self.samples, x.numel()),), generator=g)
        values, keys = x[idx.to(x.device)], torch.rand(len(idx), generator=g)
        if o["keys"] is not None:
            values, keys = torch.cat([o["sample"][0], values]), torch.cat([o["keys"], keys])
        keep = keys.argsort()[: self.samples]
        o["sample"], o["keys"] = [values[keep.to(values.device)]], keys[keep]

    @torch.no_grad()
    def finalize(self, method: str = "minmax", p: float = 2.4, n_candidates: int = 80,
                 slots: list[int] | None = None) -> None:
        """Set every quantizer (or those of `slots`) from the observations; slots
        never observed share the statistics pooled over all observed slots."""
        if not self._obs:
            raise RuntimeError("finalize() without observations: run calibration data through the model first")
        pooled = {
            "min": torch.stack([o["min"] for o in self._obs.values()]).min(),
            "max": torch.stack([o["max"] for o in self._obs.values()]).max(),
            "sample": [s for o in self._obs.values() for s in o["sample"]],
        }
        for slot in range(self.n_slots) if slots is None else slots:
            o = self._obs.get(slot, pooled)
            for k, bits in enumerate(self.bit_options):
                if bits == 32:
                    self.calibrated[k, slot] = True
                    continue
                if method == "lp" and o["sample"]:
                    sample = torch.cat(o["sample"] + [o["min"].reshape(1), o["max"].reshape(1)])
                    lo, hi = init_range(sample, bits, "lp", p=p, n_candidates=n_candidates)
                else:
                    lo, hi = o["min"], o["max"]
                scale, zp = scale_zero_point(lo, hi, bits)
                self.scale[k, slot] = scale
                self.zero_point[k, slot] = zp
                self.calibrated[k, slot] = True
        self._obs = {}
        self.observing = False

    def extra_repr(self) -> str:
        return f"bit_options={self.bit_options}, slots={self.n_slots}"


class QuantLayer(nn.Module):
    """Drop-in replacement of an nn.Conv2d or nn.Linear (same parameters,
    same call) that fake-quantizes its weight and its input activation.

    `split` > 0 marks a decoder layer whose input is cat([h, skip], dim=1):
    channels [:split] and [split:] get separate activation banks and weight ranges."""

    def __init__(self, module: nn.Module, config: QuantConfig, ctx: QuantContext, split: int = 0,
                 init: bool = True):
        super().__init__()
        if isinstance(module, nn.Conv2d):
            self.kind = "conv"
            self.conv_kwargs = dict(stride=module.stride, padding=module.padding, dilation=module.dilation,
                                    groups=module.groups)
            if module.padding_mode != "zeros":
                raise ValueError(f"Conv2d padding_mode={module.padding_mode!r} is not supported")
            self.in_features, self.out_features = module.in_channels, module.out_channels
        elif isinstance(module, nn.Linear):
            self.kind = "linear"
            self.in_features, self.out_features = module.in_features, module.out_features
        else:
            raise TypeError(f"cannot quantize {type(module).__name__}: only nn.Conv2d and nn.Linear are supported")
        self.weight = module.weight  # the same Parameter objects: no copy
        self.bias = module.bias
        self.ctx = ctx
        self.split = split
        self.w_quant = WeightQuantizer(config.w_bits, module.weight, config.weight_init, config.lp_norm,
                                       config.lp_candidates, init=init, rounding=config.weight_rounding, split=split,
                                       symmetric=config.weight_symmetric)
        # The other weight options (MixDQ): their own ranges and rounding; `w_quant` stays the default
        # option under its old name, so states saved before per-layer weight bits load unchanged.
        self.w_options = nn.ModuleDict({
            str(b): WeightQuantizer(b, module.weight, config.weight_init, config.lp_norm, config.lp_candidates,
                                    init=init, rounding=config.weight_rounding, split=split,
                                    symmetric=config.weight_symmetric)
            for b in config.w_bit_options if b != config.w_bits}) if config.mixed_weights else None
        self.w_bits = config.w_bits  # the weight option in force (policy.set_weight_bits)
        self.act = ActQuantBank(config.a_bit_options, config.bank_steps, config.act_samples)
        self.act_skip = ActQuantBank(config.a_bit_options, config.bank_steps, config.act_samples) if split else None
        for bank in self.banks():  # where the layer's weight is (the UNet may already be on its device)
            bank.to(module.weight.device)
        self.bit_options = list(config.a_bit_options)
        self.time_aware = config.time_aware
        self.policy = [self.bit_options.index(config.a_bits)] * config.n_steps  # bit-option index per step
        self.quant_weight = config.w_bits < 32
        self.quant_act = True
        self.mixture: tuple[list[int], torch.Tensor] | None = None  # set by policy.bit_mixture (Q2B training)
        self._wq_cache = None

    # -- the policy ---------------------------------------------------------
    def bit_index(self) -> int:
        step = self.ctx.step
        if len(self.policy) == 1:
            return self.policy[0]
        if not 0 <= step < len(self.policy):
            raise IndexError(f"step {step} is outside this layer's {len(self.policy)}-step bit policy")
        return self.policy[step]

    def act_bits(self) -> int:
        return self.bit_options[self.bit_index()]

    @property
    def wq(self) -> WeightQuantizer:
        """The weight quantizer of the weight option in force (`w_quant` unless another option is set)."""
        return self.weight_quantizer(self.w_bits)

    def weight_quantizer(self, bits: int) -> WeightQuantizer:
        if bits == self.w_quant.n_bits:
            return self.w_quant
        if self.w_options is None or str(bits) not in self.w_options:
            have = [self.w_quant.n_bits] + ([int(b) for b in self.w_options] if self.w_options else [])
            raise ValueError(f"{bits}-bit weights have no quantizer in this layer; its options are {sorted(have)} "
                             f"(calibrate with --w-bit-options including {bits})")
        return self.w_options[str(bits)]

    def slot(self) -> int:
        return min(self.ctx.step, self.act.n_slots - 1) if self.time_aware else 0

    # -- forward ------------------------------------------------------------
    def quantized_weight(self) -> torch.Tensor:
        if not self.quant_weight:
            return self.weight
        wq = self.wq
        if torch.is_grad_enabled() and (self.weight.requires_grad or any(p.requires_grad for p in wq.parameters())):
            return wq(self.weight)
        # Frozen weights: fake-quantize once, reuse until weight, option or quantizer change.
        sources = (self.weight, *wq.state_tensors())  # the option in force is wq's identity
        if self._wq_cache is None or not self._wq_cache[0].matches(*sources):
            with torch.no_grad():
                self._wq_cache = (Stamp(*sources), wq(self.weight))
        return self._wq_cache[1]

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quant_act:
            return x
        if self.mixture is not None:  # relaxed per-sample choice: the policy is not used
            return mix_options(lambda k: self._quantize(x, k, self.slot()), *self.mixture, like=x)
        return self._quantize(x, self.bit_index(), self.slot())

    def _quantize(self, x: torch.Tensor, k: int, slot: int) -> torch.Tensor:
        if self.act_skip is None:
            return self.act(x, k, slot)
        return torch.cat([self.act(x[:, : self.split], k, slot), self.act_skip(x[:, self.split:], k, slot)], dim=1)

    @fp32_math
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
        w = self.quantized_weight()
        if self.kind == "conv":
            return F.conv2d(x, w, self.bias, **self.conv_kwargs)
        return F.linear(x, w, self.bias)

    def fp_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The original full-precision layer (used for BOS-aware K/V)."""
        if self.kind == "conv":
            return F.conv2d(x, self.weight, self.bias, **self.conv_kwargs)
        return F.linear(x, self.weight, self.bias)

    def banks(self) -> list[ActQuantBank]:
        return [b for b in (self.act, self.act_skip) if b is not None]

    def extra_repr(self) -> str:
        s = f"{self.kind}, {self.in_features}->{self.out_features}, w_bits={self.w_bits}"
        return s + (f", split={self.split}" if self.split else "")
