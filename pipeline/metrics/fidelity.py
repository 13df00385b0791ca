"""Per-image fidelity of a quantized model's image to the FP image of the same
prompt and seed: PSNR and SSIM (piq), and LPIPS (piq) only where its weights
are already on disk (they are downloaded from the internet on first use:
torchvision's ImageNet VGG16 and piq's LPIPS linear layers).

One Metric holds the sums of every per-image score (dist_reduce_fx="sum"), from which `compute()` returns the
means over images, and the per-image scores themselves with each image's index (dist_reduce_fx="cat"), which
`per_image()` returns in index order: the evaluation's confidence intervals and paired tests need them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

SCORES = ("psnr", "ssim", "lpips")
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
        for name in SCORES:
            self.add_state(f"{name}_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{name}_values", [], dist_reduce_fx="cat")
        self.add_state("index", [], dist_reduce_fx="cat")
        self.add_state("n_images", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, fp: torch.Tensor, quant: torch.Tensor, indices=None) -> None:
        """`indices`: each image's index in its split (kept with its scores); default: the order of the updates."""
        import piq

        if fp.shape != quant.shape:
            raise ValueError(f"FP images {tuple(fp.shape)} and evaluated images {tuple(quant.shape)} differ in shape")
        x, y = to_unit(quant), to_unit(fp)
        n = x.shape[0]
        if indices is None:
            indices = range(int(self.n_images), int(self.n_images) + n)
        indices = torch.as_tensor(list(indices), dtype=torch.long, device=self.n_images.device)
        if indices.shape != (n,):
            raise ValueError(f"{indices.numel()} indices for {n} images")
        scores = {"psnr": piq.psnr(x, y, data_range=1.0, reduction="none"),
                  "ssim": piq.ssim(x, y, data_range=1.0, kernel_size=ssim_kernel(*x.shape[-2:]), reduction="none")}
        if self.lpips is not None:
            scores["lpips"] = self.lpips(x, y).reshape(n)
        for name, v in scores.items():
            v = v.double()
            setattr(self, f"{name}_sum", getattr(self, f"{name}_sum") + v.sum())
            getattr(self, f"{name}_values").append(v)
        self.index.append(indices)
        self.n_images += n

    def per_image(self) -> dict[str, list]:
        """{"index": [...], "psnr": [...], "ssim": [...](, "lpips": [...])} over every process's images, in index
        order (a collective call under DDP: every process must make it)."""
        with self.sync_context(should_sync=True, should_unsync=True):
            index = dim_zero_cat(self.index) if len(self.index) else torch.zeros(0, dtype=torch.long)
            order = torch.argsort(index.cpu())
            out = {"index": index.cpu()[order].tolist()}
            for name in SCORES if self.lpips is not None else SCORES[:2]:
                values = getattr(self, f"{name}_values")
                values = dim_zero_cat(values) if len(values) else torch.zeros(0, dtype=torch.float64)
                out[name] = values.cpu()[order].tolist()
        return out

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
