"""AdaRound (Nagel et al., 2020): learn, per weight, whether to round up or down.

h(alpha) = clip(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1) is the soft
rounding offset added to floor(w / s); the regularizer pushes h to 0 or 1 as
beta anneals from 20 to 2. Defaults (docs/calibration.md#q-diffusion): gamma -0.1, zeta 1.1, lambda 0.01,
warm-up 20% of the iterations without the regularizer."""
from __future__ import annotations

import math

import torch

GAMMA, ZETA = -0.1, 1.1


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)


def init_alpha(weight: torch.Tensor, scale: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """alpha such that h(alpha) equals the fractional part of w / s (soft = exact weight), or with `start`
    (e.g. GPTQ's compensated weights) its position between floor(w / s) and floor(w / s) + 1, clipped to that
    interval: the soft weight is then `start` clipped, and the hard one (alpha >= 0) rounds `start`."""
    rest = (weight if start is None else start) / scale - torch.floor(weight / scale)
    if start is not None:
        rest = torch.clamp(rest, 0, 1)
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)


def rounding_regularizer(alpha: torch.Tensor, beta: float) -> torch.Tensor:
    return (1 - (2 * rectified_sigmoid(alpha) - 1).abs().pow(beta)).sum()


class BetaSchedule:
    """beta annealed linearly from `start` to `end` after a warm-up; 0 weight during warm-up."""

    def __init__(self, iters: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0):
        self.iters, self.warmup, self.start, self.end = iters, warmup, start, end

    def __call__(self, it: int) -> tuple[float, bool]:
        """(beta, regularizer active) at iteration `it`."""
        w = int(self.warmup * self.iters)
        if it < w:
            return self.start, False
        frac = (it - w) / max(1, self.iters - w)
        return self.end + (self.start - self.end) * max(0.0, 1 - frac), True


def cosine_lr(base: float, it: int, iters: int) -> float:
    return 0.5 * base * (1 + math.cos(math.pi * min(it, iters) / max(1, iters)))
