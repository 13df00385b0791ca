"""PTQD (He et al., 2023): split the quantization noise of the noise
prediction into a part correlated with it and a residual.

Per calibrated step: eps_q - eps_fp = k_t * eps_fp + r, k_t >= 0 by least
squares; the residual's per-channel mean is a bias, its std the uncorrelated
noise. At sampling: eps <- (eps - bias_t) / (1 + k_t). For stochastic
samplers PTQD also lowers the injected noise variance by the residual
variance; the project's default sampler (DDIM, eta = 0) injects none, so
only the correction above applies (the std is stored for such samplers)."""
from __future__ import annotations

import torch

from pipeline.quant import set_quant_state


def ptqd_statistics(unet, data, device="cpu") -> dict[str, torch.Tensor]:
    steps = list(data.steps)
    acc = {s: {"xy": 0.0, "xx": 0.0, "d": [], "e": []} for s in steps}
    with torch.no_grad():
        for step, call in data.unet_calls(device=device):
            unet.quant_context.timesteps = []
            unet.quant_context.step = step
            set_quant_state(unet, False, False)
            eps_fp = unet(**call).sample
            set_quant_state(unet, True, True)
            eps_q = unet(**call).sample
            a = acc[step]
            a["d"].append((eps_q - eps_fp).cpu())
            a["e"].append(eps_fp.cpu())
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
            "ptqd_bias": torch.stack(biases), "ptqd_std": torch.tensor(stds)}


def apply_ptqd(unet, stats: dict[str, torch.Tensor]):
    """Correct the quantized UNet's output at every call; returns the hook handle."""
    steps = stats["ptqd_steps"].tolist()

    def nearest(step: int) -> int:
        return min(range(len(steps)), key=lambda j: abs(steps[j] - step))

    def hook(module, args, output):
        j = nearest(module.quant_context.step)
        k = float(stats["ptqd_k"][j])
        eps = output[0] if isinstance(output, tuple) else output.sample
        eps = (eps - stats["ptqd_bias"][j].to(eps.device, eps.dtype).reshape(1, -1, 1, 1)) / (1 + k)
        if isinstance(output, tuple):  # pipelines call the UNet with return_dict=False
            return (eps,) + tuple(output[1:])
        output.sample = eps
        return output

    return unet.register_forward_hook(hook)
