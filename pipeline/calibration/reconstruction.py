"""BRECQ block reconstruction as a LightningModule (Q-Diffusion's recipe).

One unit (block or lone layer) at a time, against cached full-precision
outputs for full-precision inputs:
  1. weights: AdaRound, loss = sum_c (out_q - out_fp)^2 + 0.01 * rounding
     regularizer, beta 20 -> 2 after a 20% warm-up, Adam;
  2. activations: step sizes learned LSQ-style (Adam lr 4e-4, cosine), one
     phase per (bit option, time slot) so each quantizer of the bank learns
     from its own data with its own optimizer state.
The data loader draws the cached items each iteration needs (a phase-aware
sampler); the Trainer supplies devices and DDP."""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Sampler

from pipeline.calibration.blocks import unit_banks, unit_layers
from pipeline.calibration.gptq import check_adaround_init, gptq_starts
from pipeline.engine import make_trainer
from pipeline.quant.adaround import BetaSchedule, rounding_regularizer
from pipeline.shards import item_field


def rec_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BRECQ's reconstruction loss: squared error summed over channels, averaged over the rest."""
    return (out - target).pow(2).sum(1).mean()


@dataclass
class Phase:
    kind: str  # "weight" | "act"
    iters: int
    k: int = 0  # bit-option index (act phases)
    slot: int | None = None  # time slot (act phases of time-aware banks)


class ItemDataset(Dataset):
    def __init__(self, items: Sequence[dict]):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class PhaseSampler(Sampler):
    """Yields, per iteration, a random item suited to the current phase (its time slot).

    Each DDP rank draws its own stream (seed + rank)."""

    def __init__(self, items: Sequence[dict], phases: list[Phase], slot_of, seed: int = 0, rank: int = 0):
        self.items, self.phases, self.slot_of = items, phases, slot_of
        self.seed, self.rank = seed, rank

    def __len__(self):
        return sum(p.iters for p in self.phases)

    def __iter__(self):
        rng = random.Random(self.seed * 7919 + self.rank)
        for p in self.phases:
            pool = [i for i in range(len(self.items))  # steps read without loading items stored on disk
                    if p.slot is None or self.slot_of(item_field(self.items, i, "step")) == p.slot]
            if not pool:  # the caller gives phases only to slots with data (qdiff.observed_slots)
                raise ValueError(f"no calibration item addresses time slot {p.slot}")
            for _ in range(p.iters):
                yield rng.choice(pool)


class UnitReconstruction(L.LightningModule):
    """Reconstruct one unit through a list of phases (all "weight" or all "act")."""

    def __init__(self, unit: nn.Module, ctx, phases: list[Phase], lr: float, reg_weight: float = 0.01,
                 unit_name: str = "unit", banks=None):
        super().__init__()
        self.unit = unit
        self.ctx = ctx
        self.phases = phases
        self.lr, self.reg_weight, self.unit_name = lr, reg_weight, unit_name
        self.automatic_optimization = False
        self.layers = unit_layers(unit)
        self.banks = unit_banks(unit) if banks is None else banks
        self._bounds = [0]
        for p in phases:
            self._bounds.append(self._bounds[-1] + p.iters)
        self.losses: list[float] = []

    def configure_optimizers(self):
        """One Adam per phase: each (bit option, slot) keeps its own moment estimates."""
        opts = []
        for p in self.phases:
            if p.kind == "weight":
                params = [layer.wq.alpha for layer in self.layers if layer.wq.alpha is not None]
            else:
                params = [b.scale for b in self.banks]
            opts.append(torch.optim.Adam(params, lr=self.lr))
        return opts

    def _phase(self, it: int) -> tuple[int, Phase, int]:
        for j, p in enumerate(self.phases):
            if it < self._bounds[j + 1]:
                return j, p, it - self._bounds[j]
        raise IndexError(it)

    def training_step(self, item, batch_idx):
        j, phase, it = self._phase(self.global_step)
        opts = self.optimizers()
        opt = opts[j] if isinstance(opts, list) else opts
        self.ctx.step = int(item["step"])
        if phase.kind == "act":
            for layer in self.layers:
                layer.policy = [phase.k] * len(layer.policy)
            for g in opt.param_groups:  # cosine decay within the phase
                g["lr"] = 0.5 * self.lr * (1 + math.cos(math.pi * it / max(1, phase.iters)))
        out = self.unit(*item["args"], **item["kwargs"])
        out = out[0] if isinstance(out, tuple) else out
        loss = rec_loss(out, item["out"])
        if phase.kind == "weight":
            beta, active = BetaSchedule(phase.iters)(it)
            if active:
                reg = sum(rounding_regularizer(layer.wq.alpha, beta) for layer in self.layers
                          if layer.wq.alpha is not None)
                loss = loss + self.reg_weight * reg
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite reconstruction loss in {self.unit_name} at step {self.global_step} "
                                     f"({phase.kind} phase); lower the learning rate or check the data")
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()
        self.losses.append(float(loss.detach()))
        return loss


def held_out_mse(unit: nn.Module, ctx, items: Sequence[dict], k: int | None = None) -> float:
    """Mean reconstruction loss of the unit on `items` under its current state."""
    layers = unit_layers(unit)
    saved = [list(layer.policy) for layer in layers]
    total = 0.0
    with torch.no_grad():
        for it in items:
            ctx.step = int(it["step"])
            if k is not None:
                for layer in layers:
                    layer.policy = [k] * len(layer.policy)
            out = unit(*it["args"], **it["kwargs"])
            out = out[0] if isinstance(out, tuple) else out
            total += float(rec_loss(out, it["out"]))
    for layer, p in zip(layers, saved):
        layer.policy = p
    return total / max(1, len(items))


def fit_unit(unit, ctx, items, phases, lr, trainer_kwargs, seed, unit_name, reg_weight=0.01, banks=None):
    """Run the phases with a Lightning Trainer; returns the module (its losses)."""
    module = UnitReconstruction(unit, ctx, phases, lr, reg_weight, unit_name, banks)
    total = sum(p.iters for p in phases)
    if total == 0:
        return module
    # one of many fits in a stage: the stage's own bar over units shows progress, not this Trainer's
    trainer = make_trainer(trainer_kwargs, forced={"max_steps": total, "max_epochs": 1,
                                                   "use_distributed_sampler": False, "num_sanity_val_steps": 0,
                                                   "enable_progress_bar": False})
    n_slots = max((b.n_slots for b in module.banks), default=1)
    slot_of = (lambda step: min(step, n_slots - 1)) if n_slots > 1 else (lambda step: 0)
    sampler = PhaseSampler(items, phases, slot_of, seed=seed, rank=trainer.global_rank)
    loader = torch.utils.data.DataLoader(ItemDataset(items), batch_size=None, sampler=sampler)
    device = next(unit.parameters()).device
    trainer.fit(module, loader)
    unit.to(device)  # the Trainer's teardown moves its module to the CPU; the rest of the UNet is on `device`
    return module


def hard_rounding_mse(unit: nn.Module, ctx, items: Sequence[dict]) -> float:
    """`held_out_mse` with every learning weight quantizer at its current hard decisions (alpha >= 0)."""
    saved = []
    for layer in unit_layers(unit):
        wq = layer.wq
        if wq.alpha is not None:
            saved.append((wq, wq.alpha, wq.round_up))
            wq.round_up, wq.alpha = (wq.alpha >= 0).detach(), None
    try:
        return held_out_mse(unit, ctx, items)
    finally:
        for wq, alpha, round_up in saved:
            wq.alpha, wq.round_up = alpha, round_up


def fit_rounding(unit, ctx, items, iters, lr, trainer_kwargs, seed, unit_name, init: str = "fp", reg_weight=0.01,
                 select: Sequence[dict] | None = None):
    """AdaRound on the unit's weight-quantized layers (activations as the caller set them), ending with hard
    decisions in each quantizer's `round_up`; returns the module (its losses; `kept_start`).

    `init` "fp": AdaRound's own start (soft = the FP weights, hard = nearest); "gptq": GPTQ's closed-form
    rounding of each layer on its inputs in `items` (pipeline.calibration.gptq), which alone is already below
    the error of many AdaRound iterations (docs/calibration.md#time-to-quality). `select` (items not fitted
    on): the start's hard decisions are kept instead of AdaRound's end where they have the lower error there
    (a short schedule from a good start can end worse than it began); `module.kept_start` says which won."""
    check_adaround_init(init)
    layers = [layer for layer in unit_layers(unit) if layer.quant_weight]
    starts = gptq_starts(unit, ctx, items) if init == "gptq" else {}
    for layer in layers:
        layer.wq.start_learning_rounding(layer.weight, start=starts.get(layer))
    first = [(layer.wq.alpha >= 0).detach().clone() for layer in layers]
    selecting = select is not None and len(select) > 0 and bool(layers)
    start_error = hard_rounding_mse(unit, ctx, select) if selecting else None
    try:
        module = fit_unit(unit, ctx, items, [Phase("weight", iters)], lr, trainer_kwargs, seed, unit_name, reg_weight)
    finally:  # hard decisions also when the fit fails, so that the unit is left usable
        for layer in layers:
            layer.wq.finish_learning_rounding()
    if selecting:
        device = layers[0].weight.device
        end_error = held_out_mse(unit, ctx, select)
        module.kept_start = _mean_over_ranks(start_error, len(select), device) < _mean_over_ranks(
            end_error, len(select), device)
    else:
        module.kept_start = False
    if module.kept_start:
        for layer, up in zip(layers, first):
            layer.wq.round_up = up
    return module


def _mean_over_ranks(mean: float, n: int, device) -> float:
    """A per-rank mean over n items as the mean over every DDP rank's items (every rank decides alike)."""
    if not (dist.is_available() and dist.is_initialized()):
        return mean
    t = torch.tensor([mean * n, float(n)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0] / t[1])
