"""A Lightning callback that measures paired quality to FP and FAB on a fixed
validation split while QLIP trains, logs them and keeps the best checkpoint by
them (issue 18; the measurement itself is pipeline/qlip/monitor.py).

Attached to Q2B training (the q2b stage's `--eval-every N`) it generates the
val prompts with the Q2B being trained; attached to T2Q training, `measure`
would generate with the T2Q being trained as the quality source of a fixed Q2B.
Either way the callback only needs `measure(pl_module) -> dict` (keys include
the `monitor` one) and `save(pl_module, folder, record)`.

The measurement is observational: the random state (Q2B's Gumbel noise and the
loader draw from the global generator) is put back afterwards, so training with
the callback ends exactly as training without it (tests/test_evaluation_callback.py)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

from pipeline.artifacts import write_json_atomic
from pipeline.qlip.monitor import MONITORED

MODES = ("max", "min")


class PairedEvaluationCallback(L.Callback):
    """Every `every_n_epochs` (and after the last epoch): `measure(pl_module)`, logged as `eval/<key>`, kept in
    `history`, written to `out_dir`/evaluation.json; when `monitor` improves (`mode`), `save(pl_module,
    out_dir / "best", record)` keeps that checkpoint (e.g. save_q2b: safetensors + JSON)."""

    def __init__(self, measure: Callable[[L.LightningModule], dict], out_dir: str | Path, every_n_epochs: int = 1,
                 monitor: str = "psnr", mode: str = "max",
                 save: Callable[[L.LightningModule, Path, dict], None] | None = None):
        if every_n_epochs < 1:
            raise ValueError(f"--eval-every {every_n_epochs} must be >= 1 (0 turns the evaluation off)")
        if monitor not in MONITORED:
            raise ValueError(f"--eval-monitor {monitor!r} is not measured; choose one of {MONITORED}")
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: use one of {MODES}")
        self.measure, self.out_dir, self.every = measure, Path(out_dir), every_n_epochs
        self.monitor, self.mode, self.save = monitor, mode, save
        self.history: list[dict] = []
        self.best: dict | None = None

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best[self.monitor] if self.mode == "max" else value < self.best[self.monitor]

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        offset = getattr(pl_module, "epoch_offset", 0)  # epochs done before a resumed fit
        epoch = offset + trainer.current_epoch
        last = trainer.current_epoch + 1 == trainer.max_epochs
        if (epoch + 1) % self.every and not last:
            return
        if trainer.is_global_zero:
            rng = torch.get_rng_state()  # generation must not move training's random stream
            cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() \
                else None
            try:
                record = {"epoch": epoch, **self.measure(pl_module)}
            finally:
                torch.set_rng_state(rng)
                if cuda is not None:
                    torch.cuda.set_rng_state_all(cuda)
            self.history.append(record)
            if self._better(record[self.monitor]):
                self.best = record
                if self.save is not None:
                    self.save(pl_module, self.out_dir / "best", record)
            write_json_atomic(self.out_dir / "evaluation.json", self.summary())
            scalars = {f"eval/{k}": float(v) for k, v in record.items() if k in MONITORED}
            pl_module.log_dict(scalars, rank_zero_only=True)
        trainer.strategy.barrier()  # the other processes wait for rank 0's generation

    def summary(self) -> dict:
        return {"monitor": self.monitor, "mode": self.mode, "every_n_epochs": self.every, "best": self.best,
                "history": self.history}
