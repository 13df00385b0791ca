"""Q2B (QLIP): predicted quality q -> layer- and step-wise activation bits.

The project's reading of supplementary Fig. S2 (docs/q2b.md#q2b-as-built). The K
sorted bit options are split into a low side and a high side of ceil(K/2)
options each (they share the middle option when K is odd):

    {8, 16}            low {8}        high {16}         p_q alone
    {8, 16, 32}        low {8, 16}    high {16, 32}     p_q + p_low[l,t] + p_high[l,t]
    {6, 8, 16, 32}     low {6, 8}     high {16, 32}     p_q + p_low[l,t] + p_high[l,t]
    {4, 6, 8, 16, 32}  low {4, 6, 8}  high {8, 16, 32}  two terms per side (p_low, p_mlow | p_mhigh, p_high)

Per layer l, the quality gate p_q,l = sigmoid(a_l * z + b_l) picks the side,
with z = (q - mu) / sigma standardized over the training prompts (the same
family as sigmoid(a q + b), better conditioned when a T2Q's outputs cluster)
and a_l = softplus(.) >= 0. Per (layer, step) logits pick the option within
the side. Hard decisions: high side iff p_q >= 0.5, then the argmax within it.
Every low-side option is <= every high-side option, so a layer's bits never
decrease as q grows: text-awareness is structural, the thresholds are learned.

Stored as q2b.safetensors (fp16 tables, the deployed form) + q2b.json."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.artifacts import ArtifactFormat, load_artifact_tensors, read_artifact_meta, require_keys, save_artifact
from pipeline.quant.policy import act_banks, quant_layers
from pipeline.quant.quantizer import check_bits

Q2B_FORMAT = ArtifactFormat("qlip-q2b", 1, "q2b.safetensors", "q2b.json", "Q2B checkpoint",
                            "train one with `python -m pipeline.fit q2b`",
                            required=("layers", "n_steps", "bit_options"))
# what deploying a q2b-stage folder reads besides the tables (QLIPPipeline, evaluate); the q2b stage writes them
DEPLOYED_KEYS = ("model", "quant_state", "criterion", "steps", "guidance")


def check_target_fab(target: float, bit_options: Sequence[int]) -> float:
    lo, hi = min(bit_options), max(bit_options)
    if not lo <= target <= hi:
        raise ValueError(f"target FAB {target} is outside [{lo}, {hi}], the range that bit options "
                         f"{sorted(bit_options)} allow")
    return float(target)


class Q2BModule(nn.Module):
    """`Q2BModule(q)` -> per-prompt bit tables [N, n_layers, n_steps] (hard decisions)."""

    def __init__(self, layers: Sequence[str], n_steps: int, bit_options: Sequence[int], q_mean: float = 0.5,
                 q_std: float = 0.25):
        super().__init__()
        opts = [check_bits(b, "Q2B bit option") for b in bit_options]
        if len(set(opts)) != len(opts) or len(opts) < 2:
            raise ValueError(f"Q2B needs at least two distinct bit options, got {list(bit_options)}")
        if not layers or n_steps < 1:
            raise ValueError(f"Q2B needs layers and steps (got {len(layers)} layers, {n_steps} steps)")
        if not q_std > 0:
            raise ValueError(f"q_std={q_std} must be > 0 (the training prompts' qualities do not vary)")
        self.layers, self.n_steps, self.bit_options = list(layers), int(n_steps), sorted(opts)
        K, L = len(opts), len(layers)
        self.side = (K + 1) // 2  # options per side
        self.gate_scale = nn.Parameter(torch.full((L,), math.log(math.e - 1)))  # softplus -> a_l = 1
        self.gate_bias = nn.Parameter(torch.zeros(L))
        # within-side logits; the side's lowest option has an implicit logit 0
        self.low = nn.Parameter(torch.zeros(L, n_steps, self.side - 1))
        self.high = nn.Parameter(torch.zeros(L, n_steps, self.side - 1))
        self.register_buffer("q_mean", torch.tensor(float(q_mean)))
        self.register_buffer("q_std", torch.tensor(float(q_std)))
        self.register_buffer("options", torch.tensor(self.bit_options, dtype=torch.float32), persistent=False)

    # -- the pieces ---------------------------------------------------------
    def gate_logits(self, q: torch.Tensor) -> torch.Tensor:
        """[N, L] logits of p_q (>= 0: high side)."""
        q = torch.as_tensor(q, dtype=torch.float32, device=self.gate_bias.device).reshape(-1)
        z = (q - self.q_mean) / self.q_std
        return F.softplus(self.gate_scale) * z[:, None] + self.gate_bias

    def side_logits(self, steps=slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """Within-side logits [L, S, side] of the low and the high side."""
        pad = lambda t: F.pad(t[:, steps], (1, 0))  # noqa: E731
        return pad(self.low), pad(self.high)

    def _embed(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """Side distributions [..., side] -> distributions over all K options."""
        shift = len(self.bit_options) - self.side
        return F.pad(low, (0, shift)) + F.pad(high, (shift, 0))

    # -- decisions ----------------------------------------------------------
    def probs(self, q: torch.Tensor, steps=slice(None)) -> torch.Tensor:
        """Expected decision: option probabilities [N, L, S, K]."""
        p = torch.sigmoid(self.gate_logits(q))[:, :, None, None]
        low, high = (t.softmax(-1) for t in self.side_logits(steps))
        return self._embed((1 - p) * low, p * high)

    def decide(self, q: torch.Tensor) -> torch.Tensor:
        """Hard option indices [N, L, T]."""
        high_side = self.gate_logits(q) >= 0
        low, high = self.side_logits()
        shift = len(self.bit_options) - self.side
        return torch.where(high_side[:, :, None], high.argmax(-1) + shift, low.argmax(-1))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """Per-prompt bit tables [N, L, T] (int16 bit values)."""
        return self.options[self.decide(q)].to(torch.int16)

    def batch_policy(self, q: torch.Tensor) -> torch.Tensor:
        """A batch's [L, T] table: per layer and step, the maximum over its prompts."""
        return self(q).amax(dim=0)

    def relaxed(self, q: torch.Tensor, steps=slice(None), tau: float = 1.0, noise: bool = True) -> torch.Tensor:
        """Straight-through decision [N, L, S, K]: the hard one-hot in the forward
        pass (a Gumbel sample of the two-level choice when `noise`, else the
        deterministic decision), the tempered soft decision's gradient backward."""
        gate = self.gate_logits(q)[:, :, None, None]
        low, high = (t.expand(gate.shape[0], *t.shape) for t in self.side_logits(steps))
        if noise:  # logistic noise on the binary gate = Gumbel noise on its two logits
            u = torch.rand_like(gate).clamp(1e-6, 1 - 1e-6)
            gate = gate + torch.log(u) - torch.log1p(-u)
            low = low - torch.log(-torch.log(torch.rand_like(low).clamp(1e-6, 1 - 1e-6)))
            high = high - torch.log(-torch.log(torch.rand_like(high).clamp(1e-6, 1 - 1e-6)))
        p = torch.sigmoid(gate / tau)
        soft = self._embed((1 - p) * (low / tau).softmax(-1), p * (high / tau).softmax(-1))
        h = (gate >= 0).to(soft.dtype)
        onehot = lambda t: F.one_hot(t.argmax(-1), t.shape[-1]).to(soft.dtype)  # noqa: E731
        hard = self._embed((1 - h) * onehot(low), h * onehot(high))
        return hard - soft.detach() + soft

    # -- bookkeeping --------------------------------------------------------
    # diffusers-style names for what save_q2b / load_q2b do
    def save_pretrained(self, path: str | Path, extra: dict | None = None) -> Path:
        return save_q2b(self, path, extra)

    @classmethod
    def from_pretrained(cls, path: str | Path, bit_options: Sequence[int] | None = None, device="cpu") -> "Q2BModule":
        return load_q2b(path, bit_options, device)

    def memory_bytes(self) -> int:
        """Storage of the learned tables at their stored precision (fp16)."""
        return sum(p.numel() for p in self.parameters()) * 2

    def check_layout(self, layers: Sequence[str], n_steps: int, a_bit_options: Sequence[int],
                     where: str = "the quantized UNet") -> None:
        """Refuse a UNet (or state) whose layers, steps or bit options this Q2B does not fit."""
        if list(layers) != self.layers:
            missing = [n for n in self.layers if n not in layers]
            extra = [n for n in layers if n not in self.layers]
            detail = (f"missing {missing[:3]}, unexpected {extra[:3]}" if missing or extra
                      else "same layers, other order")
            raise ValueError(f"this Q2B checkpoint was trained for another layer list than {where} ({detail})")
        if int(n_steps) != self.n_steps:
            raise ValueError(f"this Q2B checkpoint addresses {self.n_steps} sampling steps but {where} "
                             f"was calibrated for {n_steps}")
        lacking = [b for b in self.bit_options if b not in a_bit_options]
        if lacking:
            raise ValueError(f"{where} lacks the {lacking}-bit activation quantizers that Q2B may choose "
                             f"(it has {sorted(a_bit_options)}); calibrate with --a-bit-options "
                             f"{','.join(map(str, sorted(set(a_bit_options) | set(self.bit_options))))}")

    def check_unet(self, unet: nn.Module) -> None:
        """check_layout on a quantized UNet, plus: every bank holds calibrated
        quantizers for every option Q2B may choose."""

        cfg = unet.quant_config
        self.check_layout(list(quant_layers(unet)), cfg.n_steps, cfg.a_bit_options)
        for name, bank in act_banks(unet).items():
            for b in self.bit_options:
                if b in bank.bit_options and not bool(bank.calibrated[bank.bit_options.index(b)].all()):
                    raise ValueError(f"the calibrated state has no calibrated {b}-bit quantizer at {name}, "
                                     f"an option Q2B may choose; calibrate it with that option")

    def check_options(self, bit_options: Sequence[int]) -> None:
        if sorted(int(b) for b in bit_options) != self.bit_options:
            raise ValueError(f"this Q2B checkpoint was trained for bit options {self.bit_options}, "
                             f"not {sorted(bit_options)}")

    def extra_repr(self) -> str:
        return f"layers={len(self.layers)}, steps={self.n_steps}, bit_options={self.bit_options}, side={self.side}"


def relative_link(target: str | Path | None, q2b_dir: str | Path) -> str | None:
    """How q2b.json records another artifact (the quantized state, the T2Q):
    relative to the Q2B folder, so a run directory can move as a whole."""
    import os

    return None if target is None else os.path.relpath(Path(target).resolve(), Path(q2b_dir).resolve())


def follow_link(q2b_dir: str | Path, recorded: str | None) -> str | None:
    """The path of an artifact recorded by `relative_link`, usable from here."""
    if recorded is None:
        return None
    return str(Path(recorded) if Path(recorded).is_absolute() else Path(q2b_dir) / recorded)


@torch.no_grad()
def to_stored_precision(module: Q2BModule) -> Q2BModule:
    """Round the module's parameters to fp16 in place (the stored form), so it decides as its saved copy will."""
    for p in module.parameters():
        p.copy_(p.half().float())
    return module


def q2b_state(module: Q2BModule) -> tuple[dict[str, torch.Tensor], dict]:
    """The stored form of a Q2B module: its tensors (fp16 tables, float buffers) and the JSON fields that
    `q2b_from_state` rebuilds it from. The parameters are rounded to fp16 in place first, so the module in
    memory decides exactly as the stored one will. Shared by the q2b folder and the deployable artifact."""
    to_stored_precision(module)
    params = dict(module.named_parameters())
    tensors = {k: v.detach().half() if k in params else v.detach() for k, v in module.state_dict().items()}
    meta = {"bit_options": module.bit_options, "n_steps": module.n_steps, "layers": module.layers,
            "memory_bytes": module.memory_bytes()}
    return tensors, meta


def q2b_from_state(meta: dict, tensors: dict[str, torch.Tensor], where: str | Path, device="cpu") -> Q2BModule:
    """The Q2B module of stored tensors and their JSON fields (`q2b_state`); `where` names them in errors."""
    for key in ("q_mean", "q_std"):
        if key not in tensors:
            raise ValueError(f"{where} holds no Q2B {key!r} tensor (written by another version, or edited)")
    module = Q2BModule(meta["layers"], meta["n_steps"], meta["bit_options"], float(tensors["q_mean"]),
                       float(tensors["q_std"])).to(device)
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in tensors.items()}
    if want != have:
        raise ValueError(f"{where}: the Q2B tensors do not match their JSON (tensors {have} vs {want})")
    module.load_state_dict({k: v.float() for k, v in tensors.items()})
    return module


def save_q2b(module: Q2BModule, path: str | Path, extra: dict | None = None) -> Path:
    """Write q2b.safetensors (fp16 tables) + q2b.json into folder `path` (the module is rounded to its stored
    precision in place: `q2b_state`)."""
    tensors, meta = q2b_state(module)
    return save_artifact(path, Q2B_FORMAT, tensors, {**meta, **(extra or {})})


def read_q2b_meta(path: str | Path, flag: str | None = None, deployed: bool = False) -> dict:
    """q2b.json; `deployed`: also what deploying it needs (DEPLOYED_KEYS: a q2b-stage folder, not a bare module)."""
    meta = read_artifact_meta(path, Q2B_FORMAT, flag)
    if deployed:
        require_keys(meta, DEPLOYED_KEYS, Path(path) / Q2B_FORMAT.meta, f"{Q2B_FORMAT.made_by} again")
    return meta


def load_q2b(path: str | Path, bit_options: Sequence[int] | None = None, device="cpu",
             deployed: bool = False) -> Q2BModule:
    """Load a Q2B checkpoint (`.meta` holds its JSON). `bit_options`, when given,
    must be those it was trained for; `deployed`: see read_q2b_meta."""
    meta = read_q2b_meta(path, deployed=deployed)
    tensors = load_artifact_tensors(path, Q2B_FORMAT, device)
    module = q2b_from_state(meta, tensors, Path(path) / Q2B_FORMAT.tensors, device)
    module.meta = meta
    if bit_options is not None:
        module.check_options(bit_options)
    return module
