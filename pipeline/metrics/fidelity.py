"""Per-image fidelity of a quantized model's image to the FP image of the same
prompt and seed: PSNR and SSIM (piq), and LPIPS (piq) only where its weights
are already on disk (they are downloaded from the internet on first use:
torchvision's ImageNet VGG16 and piq's LPIPS linear layers).

One Metric holds the sums of every per-image score (dist_reduce_fx="sum");
`compute()` returns the means over images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchmetrics import Metric

LPIPS_FILES = ("vgg16-397923af.pth", "lpips_weights.pt")  # torch hub cache names used by piq.LPIPS


def lpips_weights_missing() -> list[Path]:
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return [hub / f for f in LPIPS_FILES if not (hub / f).is_file()]


def lpips_unavailable_reason() -> str | None:
    missing = lpips_weights_missing()
    if not missing:
        return None
    return ("LPIPS skipped: its weights are not on this machine and this run is offline (piq.LPIPS downloads "
            "torchvision's ImageNet VGG16 and its linear layers); missing " + ", ".join(str(m) for m in missing))


def ssim_kernel(h: int, w: int) -> int:
    """piq's default 11x11 Gaussian window, shrunk (odd) for images smaller than it."""
    k = min(11, h, w)
    return k if k % 2 else k - 1


def to_unit(images: torch.Tensor) -> torch.Tensor:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    return images.float() / 255.0


class FidelityToFP(Metric):
    """Mean PSNR (dB), SSIM and optionally LPIPS of images to their FP twins."""

    full_state_update = False

    def __init__(self, lpips: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.lpips = None
        if lpips:
            reason = lpips_unavailable_reason()
            if reason:
                raise FileNotFoundError(reason)
            import piq

            self.lpips = piq.LPIPS(reduction="none")
        for name in ("psnr_sum", "ssim_sum", "lpips_sum"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_images", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, fp: torch.Tensor, quant: torch.Tensor) -> None:
        import piq

        if fp.shape != quant.shape:
            raise ValueError(f"FP images {tuple(fp.shape)} and evaluated images {tuple(quant.shape)} differ in shape")
        x, y = to_unit(quant), to_unit(fp)
        self.psnr_sum += piq.psnr(x, y, data_range=1.0, reduction="none").double().sum()
        k = ssim_kernel(*x.shape[-2:])
        self.ssim_sum += piq.ssim(x, y, data_range=1.0, kernel_size=k, reduction="none").double().sum()
        if self.lpips is not None:
            self.lpips_sum += self.lpips(x, y).double().sum()
        self.n_images += x.shape[0]

    def compute(self) -> dict:
        n = self.n_images.clamp(min=1)
        out = {"psnr": self.psnr_sum / n, "ssim": self.ssim_sum / n}
        if self.lpips is not None:
            out["lpips"] = self.lpips_sum / n
        return out


def as_nchw(images) -> torch.Tensor:
    """uint8 images as a [N, 3, H, W] tensor; numpy [N, H, W, 3] (what `pipeline.sampling.generate`
    returns) is transposed, tensors are passed through."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return images


def fidelity_to_fp(fp, images, lpips: bool = False) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM (and LPIPS) of `images` to their FP twins `fp`, both uint8
    [N, H, W, 3] arrays or [N, 3, H, W] tensors: the evaluation's FidelityToFP in one call."""
    metric = FidelityToFP(lpips=lpips)
    metric.update(as_nchw(fp), as_nchw(images))
    return {k: float(v) for k, v in metric.compute().items()}
