"""Seconds spent generating and scoring, summed over batches and processes."""
from __future__ import annotations

import torch
from torchmetrics import Metric


class Timing(Metric):
    """Sums of generation and metric seconds and of images (dist_reduce_fx="sum").

    Under DDP the sums add every process's time, so seconds per image is
    device-seconds per image (independent of the process count); wall-clock
    throughput is measured around the whole run by the caller."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("generate_seconds", "metric_seconds"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_images", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, generate_seconds: float, metric_seconds: float, n_images: int) -> None:
        self.generate_seconds += float(generate_seconds)
        self.metric_seconds += float(metric_seconds)
        self.n_images += int(n_images)

    def compute(self) -> dict:
        n = self.n_images.clamp(min=1)
        total = self.generate_seconds + self.metric_seconds
        return {"n_images": self.n_images, "seconds_per_image": self.generate_seconds / n,
                "metric_seconds_per_image": self.metric_seconds / n,
                "generate_share": self.generate_seconds / total if total > 0 else torch.tensor(float("nan"))}
