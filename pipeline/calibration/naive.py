"""Naive PTQ: min-max (or L_p) activation ranges observed on full-precision
sampling trajectories, round-to-nearest weights. A LightningModule so that
`--trainer.*` flags (devices, strategy) apply; ranks merge their statistics."""
from __future__ import annotations

import lightning as L
import torch
import torch.distributed as dist

from pipeline.engine import make_trainer
from pipeline.quant import act_banks, observing, quantize_unet, set_step
from pipeline.sampling import generate


def sync_banks_from_rank0(unet) -> None:
    """After finalize, make every rank hold rank 0's quantizers."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for bank in act_banks(unet).values():
        for t in (bank.scale.data, bank.zero_point, bank.calibrated):
            dist.broadcast(t, src=0)


def merge_observations(unet) -> None:
    """All-reduce each bank's observed min/max across ranks (the L_p sample stays local)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for bank in act_banks(unet).values():
        for slot in sorted(bank._obs):
            o = bank._obs[slot]
            dist.all_reduce(o["min"], op=dist.ReduceOp.MIN)
            dist.all_reduce(o["max"], op=dist.ReduceOp.MAX)


def ranges_from_calls(unet, calls, act_init: str = "minmax"):
    """Every activation bank's ranges from FP UNet calls already recorded ((step, kwargs) pairs, e.g.
    `CalibrationData.unet_calls()`), in one process; returns `unet`."""
    with observing(unet), torch.no_grad():
        for step, call in calls:
            set_step(unet, step)
            unet(**call)
    cfg = unet.quant_config
    for bank in act_banks(unet).values():
        bank.finalize(act_init, p=cfg.lp_norm, n_candidates=cfg.lp_candidates)
    return unet


class NaiveCalibration(L.LightningModule):
    """predict_step samples FP trajectories for a batch of prompts while every
    activation bank records statistics; on_predict_end sets the quantizers."""

    def __init__(self, pipe, steps: int, guidance: float, act_init: str = "minmax", seed: int = 0):
        super().__init__()
        self.pipe = pipe
        self.unet = pipe.unet
        self.steps, self.guidance, self.act_init, self.seed = steps, guidance, act_init, seed
        self._observing = None

    def on_predict_start(self) -> None:
        self.pipe.to(self.device)
        self._observing = observing(self.unet)
        self._observing.__enter__()

    def predict_step(self, batch, batch_idx):
        prompts, seeds = batch
        generate(self.pipe, list(prompts), [int(s) for s in seeds], steps=self.steps, guidance=self.guidance,
                 batch_size=len(prompts), progress=False)
        return None

    def on_predict_end(self) -> None:
        self._observing.__exit__(None, None, None)
        merge_observations(self.unet)
        cfg = self.unet.quant_config
        for bank in act_banks(self.unet).values():
            bank.finalize(self.act_init, p=cfg.lp_norm, n_candidates=cfg.lp_candidates)
        sync_banks_from_rank0(self.unet)


def calibrate_naive(pipe, qcfg, prompts, steps: int, guidance: float, batch_size: int = 8, seed: int = 0,
                    trainer_kwargs: dict | None = None):
    """Quantize `pipe.unet` with `qcfg` and calibrate it on FP trajectories of `prompts`."""
    from torch.utils.data import DataLoader

    quantize_unet(pipe.unet, qcfg)
    module = NaiveCalibration(pipe, steps, guidance, qcfg.act_init, seed)
    loader = DataLoader(list(zip(prompts, range(len(prompts)))), batch_size=batch_size, shuffle=False)
    trainer = make_trainer(trainer_kwargs, progress=True)
    trainer.predict(module, loader, return_predictions=False)
    return trainer
