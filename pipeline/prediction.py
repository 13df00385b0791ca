"""The space a UNet's output lives in, and its conversion to the noise (eps) space, defined once.

A diffusers UNet predicts, per its scheduler's `prediction_type`, the noise eps ("epsilon", SD 1.x), the
velocity v = sqrt(a) eps - sqrt(1 - a) x0 ("v_prediction", SD 2.x 768) or x0 itself ("sample"), where
x_t = sqrt(a) x0 + sqrt(1 - a) eps is the UNet's *input* and a = alpha_bar of the call. Hence

    eps = sqrt(a) v + sqrt(1 - a) x_t                    (v_prediction)
    eps = (x_t - sqrt(a) x0) / sqrt(1 - a)               (sample)

a is what the scheduler itself uses at that call: alphas_cumprod[t] for the alpha-indexed samplers (DDIM,
DDPM, PNDM, LCM), 1 / (1 + sigma^2) at the step's index for the sigma-indexed ones (Euler, Heun, DPM-Solver),
whose timesteps may be floats (Euler's interpolated schedule) or rounded (Karras sigmas), so alphas_cumprod[t]
would be wrong there. Euler-type samplers divide their latent by sqrt(sigma^2 + 1) before the UNet, which is
exactly the x_t above, so the UNet input is always the x_t of these formulas.

Which quantity lives in which space: docs/calibration.md#prediction-types."""
from __future__ import annotations

import math

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(prediction_type, where: str = "the model's scheduler") -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{where} has prediction_type {prediction_type!r}, which this project does not support; "
                         f"supported: {', '.join(PREDICTION_TYPES)}")
    return prediction_type


class PredictionSpace:
    """A prediction type plus alpha_bar at each timestep of one schedule.

    A snapshot: a later `set_timesteps` on the scheduler does not change it. Timesteps outside the table fall
    back to alphas_cumprod[t] for integer t when the scheduler indexes by alpha (`alphas_cumprod` given)."""

    def __init__(self, prediction_type: str, timesteps, alpha_bar, alphas_cumprod: torch.Tensor | None = None):
        self.prediction_type = check_prediction_type(prediction_type)
        self.timesteps = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1)
        self.alpha_bars = torch.as_tensor(alpha_bar, dtype=torch.float64).reshape(-1)
        if len(self.timesteps) != len(self.alpha_bars):
            raise ValueError(f"{len(self.timesteps)} timesteps but {len(self.alpha_bars)} alpha_bar values")
        self.alphas_cumprod = None if alphas_cumprod is None else alphas_cumprod.detach().double().cpu()

    @property
    def identity(self) -> bool:
        """True when the UNet already predicts eps (every conversion returns its input unchanged)."""
        return self.prediction_type == "epsilon"

    def alpha_bar(self, t) -> float:
        t = float(t)
        hit = torch.nonzero(torch.isclose(self.timesteps, torch.tensor(t, dtype=torch.float64), rtol=1e-6,
                                          atol=1e-4))
        if len(hit):
            return float(self.alpha_bars[hit[0, 0]])
        ac = self.alphas_cumprod
        if ac is not None and t.is_integer() and 0 <= t < len(ac):
            return float(ac[int(t)])
        raise ValueError(f"timestep {t} is not in the schedule this prediction space was taken from "
                         f"({len(self.timesteps)} timesteps); call scheduler.set_timesteps(steps) with the "
                         f"sampling steps before converting")

    def eps_coefficients(self, t) -> tuple[float, float]:
        """(c_out, c_x) with eps = c_out * output + c_x * x_t at timestep t."""
        if self.identity:
            return 1.0, 0.0
        a = self.alpha_bar(t)
        if self.prediction_type == "v_prediction":
            return math.sqrt(a), math.sqrt(1 - a)
        if a >= 1:
            raise ValueError(f"alpha_bar = {a} at timestep {float(t)}: an x0 prediction carries no noise there, "
                             f"so it has no eps equivalent")
        return -math.sqrt(a / (1 - a)), 1 / math.sqrt(1 - a)

    def _coefficients(self, t, like: torch.Tensor):
        """Scalars for a scalar t; [B, 1, ...] tensors for one timestep per row."""
        if not torch.is_tensor(t) or t.numel() == 1:
            return self.eps_coefficients(t)
        pairs = [self.eps_coefficients(v) for v in t.reshape(-1).tolist()]
        shape = (-1,) + (1,) * (like.dim() - 1)
        return tuple(torch.tensor(c, dtype=like.dtype, device=like.device).reshape(shape) for c in zip(*pairs))

    def to_eps(self, output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """The UNet `output` at input `x_t` and timestep `t`, as a noise prediction."""
        if self.identity:
            return output
        c_out, c_x = self._coefficients(t, output)
        return c_out * output + c_x * x_t.to(output.dtype)

    def from_eps(self, eps: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """The inverse of `to_eps`: a noise prediction in this UNet's own output space."""
        if self.identity:
            return eps
        c_out, c_x = self._coefficients(t, eps)
        return (eps - c_x * x_t.to(eps.dtype)) / c_out

    def to_meta(self) -> dict:
        return {"prediction_type": self.prediction_type, "timesteps": self.timesteps.tolist(),
                "alpha_bar": self.alpha_bars.tolist()}

    @classmethod
    def from_meta(cls, meta: dict) -> "PredictionSpace":
        return cls(meta["prediction_type"], meta["timesteps"], meta["alpha_bar"])


def prediction_space(scheduler) -> PredictionSpace:
    """The prediction space of `scheduler` at its current schedule (after `set_timesteps`)."""
    name = type(scheduler).__name__
    ptype = check_prediction_type(getattr(scheduler.config, "prediction_type", None), f"scheduler {name}")
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        raise ValueError(f"scheduler {name} has no alphas_cumprod, so its outputs cannot be converted to eps; "
                         f"use a DDPM-family scheduler (DDIM, PNDM, Euler, DPM-Solver, ...)")
    ac = torch.as_tensor(ac).double().cpu()
    timesteps = torch.as_tensor(scheduler.timesteps).double().cpu()
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None:  # sigma-indexed: the sigma at the call's index is what the scheduler scales by
        if getattr(scheduler, "num_inference_steps", None) is None:  # before it, sigmas and timesteps misalign
            raise ValueError(f"scheduler {name} has no schedule yet; call set_timesteps(steps) first")
        sig = torch.as_tensor(sigmas).double().cpu()[:len(timesteps)]
        return PredictionSpace(ptype, timesteps, 1 / (1 + sig ** 2))
    return PredictionSpace(ptype, timesteps, ac[timesteps.long()], alphas_cumprod=ac)


def to_eps(output: torch.Tensor, x_t: torch.Tensor, t, scheduler) -> torch.Tensor:
    """`output` of a UNet driven by `scheduler` (input x_t, timestep t) as a noise prediction."""
    return prediction_space(scheduler).to_eps(output, x_t, t)


def from_eps(eps: torch.Tensor, x_t: torch.Tensor, t, scheduler) -> torch.Tensor:
    return prediction_space(scheduler).from_eps(eps, x_t, t)
