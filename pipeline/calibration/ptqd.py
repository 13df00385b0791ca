"""PTQD (He et al., 2023): split the quantization noise of the noise
prediction into a part correlated with it and a residual.

Per calibrated step: eps_q - eps_fp = k_t * eps_fp + r, k_t >= 0 by least
squares on the *guided* noise prediction (eps_u + w (eps_c - eps_u), the one
the sampler uses, as PTQD fits it); the residual's per-channel mean is a bias,
its std the uncorrelated noise. At sampling: eps <- (eps - bias_t) / (1 + k_t),
applied to both CFG branches: the correction is affine with slope 1/(1 + k_t),
so it commutes with the guidance and corrects the guided eps exactly. For stochastic
samplers PTQD also lowers the injected noise variance by the residual
variance; the project's default sampler (DDIM, eta = 0) injects none, so
only the correction above applies (the std is stored for such samplers).

All of it lives in eps space, where PTQD derives it: a v- or x0-predicting
UNet's outputs are converted to eps before the regression, and the hook
converts its output to eps, corrects it and converts it back
(pipeline/prediction.py; docs/calibration.md#prediction-types)."""
from __future__ import annotations

import torch

from pipeline.prediction import PREDICTION_TYPES, check_prediction_type, prediction_space
from pipeline.quant import set_quant_state


def ptqd_statistics(unet, data, device="cpu") -> dict[str, torch.Tensor]:
    """PTQD's per-step statistics on `data` (a CalibrationData), in eps space.

    `ptqd_space` records the model's prediction type (an index into PREDICTION_TYPES), so the correction
    refuses a sampler of another type."""
    space = data.space
    steps = list(data.steps)
    w = float(data.meta["signature"]["guidance"])

    def guided(eps):  # the calls hold [uncond; cond]
        u, c = eps.chunk(2)
        return u + w * (c - u)

    acc = {s: {"xy": 0.0, "xx": 0.0, "d": [], "e": []} for s in steps}
    with torch.no_grad():
        for step, call in data.unet_calls(device=device):
            unet.quant_context.timesteps = []
            unet.quant_context.step = step
            set_quant_state(unet, False, False)
            eps_fp = space.to_eps(unet(**call).sample, call["sample"], call["timestep"])
            set_quant_state(unet, True, True)
            eps_q = space.to_eps(unet(**call).sample, call["sample"], call["timestep"])
            a = acc[step]
            a["d"].append((guided(eps_q) - guided(eps_fp)).cpu())
            a["e"].append(guided(eps_fp).cpu())
    ks, raw, biases, stds = [], [], [], []
    for s in steps:
        d, e = torch.cat(acc[s]["d"]).double(), torch.cat(acc[s]["e"]).double()
        raw.append(float((d * e).sum() / (e * e).sum()))
        k = max(0.0, raw[-1])  # clipped at 0 (docs/calibration.md#ptqd) (the raw slope is kept for reports)
        r = d - k * e
        bias = r.mean(dim=(0, 2, 3))
        ks.append(k)
        biases.append(bias.float())
        stds.append(float((r - bias.reshape(1, -1, 1, 1)).std()))
    return {"ptqd_steps": torch.tensor(steps, dtype=torch.long), "ptqd_k": torch.tensor(ks),
            "ptqd_k_raw": torch.tensor(raw),
            "ptqd_bias": torch.stack(biases), "ptqd_std": torch.tensor(stds),
            "ptqd_space": torch.tensor(PREDICTION_TYPES.index(space.prediction_type))}


def apply_ptqd(unet, stats: dict[str, torch.Tensor], pipe=None):
    """Correct the quantized UNet's output at every call; returns the hook handle.

    A v- or x0-predicting model needs `pipe`: its current scheduler (read at every call, so a swapped
    scheduler is followed) converts each output to eps and back. States from before `ptqd_space` existed
    hold raw-output statistics and are applied to the raw output, as they were computed."""
    steps = stats["ptqd_steps"].tolist()
    recorded = PREDICTION_TYPES[int(stats["ptqd_space"])] if "ptqd_space" in stats else None
    if recorded not in (None, "epsilon") and pipe is None:
        raise ValueError(f"this PTQD state was calibrated on a {recorded!r} model: pass the pipeline "
                         f"(apply_ptqd(unet, stats, pipe)) so its outputs are corrected in eps space")
    if recorded is not None and pipe is not None:
        # the type alone: a freshly loaded scheduler has no schedule (set_timesteps) yet
        now = check_prediction_type(getattr(pipe.scheduler.config, "prediction_type", None))
        if now != recorded:
            raise ValueError(f"this PTQD state was calibrated on a {recorded!r} model but the pipeline's "
                             f"scheduler predicts {now!r}; use the model's own prediction type")

    def nearest(step: int) -> int:
        return min(range(len(steps)), key=lambda j: abs(steps[j] - step))

    def hook(module, args, kwargs, output):
        j = nearest(module.quant_context.step)
        k = float(stats["ptqd_k"][j])
        out = output[0] if isinstance(output, tuple) else output.sample
        space = prediction_space(pipe.scheduler) if recorded not in (None, "epsilon") else None
        if space is not None:
            x_t = args[0] if args else kwargs["sample"]
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            out = space.to_eps(out, x_t, t)
        out = (out - stats["ptqd_bias"][j].to(out.device, out.dtype).reshape(1, -1, 1, 1)) / (1 + k)
        if space is not None:
            out = space.from_eps(out, x_t, t)
        if isinstance(output, tuple):  # pipelines call the UNet with return_dict=False
            return (out,) + tuple(output[1:])
        output.sample = out
        return output

    return unet.register_forward_hook(hook, with_kwargs=True)
