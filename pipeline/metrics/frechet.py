"""FID and sFID: torchmetrics' FrechetInceptionDistance with the standard FID
Inception (pipeline.metrics.inception) as its custom `feature` module.

Additions over torchmetrics:
  - `update(features=..., real=...)` takes features already extracted (one
    Inception pass serves FID and sFID, and the FP reference's features are
    computed once and reused for every quantized method);
  - a clear error when a set has too few images for a full-rank covariance
    (n <= feature dims), naming the minimum and the low-rank options;
  - the result stays float64.
States are sums (features, outer products, counts) with dist_reduce_fx="sum",
so processes merge exactly (up to float64 summation order)."""
from __future__ import annotations

import torch
from torchmetrics.image.fid import FrechetInceptionDistance, _compute_fid

from pipeline.metrics.inception import POOL_DIMS, SPATIAL_SIDE, InceptionFeatures, feature_dims


class TooFewImagesError(ValueError):
    pass


def min_images(dims: int) -> int:
    """A d-dimensional sample covariance has full rank only with n >= d + 1 samples."""
    return dims + 1


def low_rank_hint(n: int) -> str:
    fid = [d for d in POOL_DIMS if n >= min_images(d)]
    grids = [g for g in range(SPATIAL_SIDE, 1, -1) if n >= min_images(feature_dims("spatial", g))]
    parts = [f"FID: --fid-dims {fid[-1]}" if fid else "FID: no option, the smallest (64 dims) needs 65 images"]
    parts.append(f"sFID: --sfid-grid {grids[0]}" if grids else "sFID: none (the smallest grid 2x2 needs 29 images)")
    return "; ".join(parts)


def check_enough_images(n: int, dims: int, what: str, where: str = "") -> None:
    if n < min_images(dims):
        raise TooFewImagesError(
            f"{what} on {dims}-dim features needs at least {min_images(dims)} images per set (a full-rank "
            f"covariance needs n > dims) but {where or 'a set'} has {n}. Generate more images (--n, "
            f"--images-per-prompt) or use a low-rank variant that {n} images support: {low_rank_hint(n)}")


class PrecomputedFeatures(torch.nn.Module):
    """A `feature` stand-in for a FrechetDistance fed only with update(features=...)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, imgs):
        raise TypeError("this FrechetDistance has no image feature extractor: call update(features=..., real=...)")


class FrechetDistance(FrechetInceptionDistance):
    """FID between a "real" (reference) and a "fake" set of images.

    `tap` selects the Inception features: 2048 (standard FID), 768/192/64
    (pytorch-fid's low-rank dims) or "spatial" (sFID, `spatial_grid` 17 is
    the standard 2023-dim set)."""

    def __init__(self, tap: int | str = 2048, spatial_grid: int = SPATIAL_SIDE, name: str | None = None,
                 feature: torch.nn.Module | None = None, full_rank_only: bool = True, **kwargs):
        if feature is None:
            feature = InceptionFeatures(tap, spatial_grid)
        super().__init__(feature=feature, reset_real_features=True, normalize=False, **kwargs)
        self.num_features = int(feature.num_features)
        self.name = name or ("sFID" if tap == "spatial" else "FID")
        # False: allow n <= dims (rank-deficient covariances), as a benchmark that fixes the image count may ask
        self.full_rank_only = full_rank_only

    def update(self, imgs: torch.Tensor | None = None, real: bool = False, *,
               features: torch.Tensor | None = None) -> None:
        """Add images (uint8 [N, 3, H, W]) or their features ([N, num_features])."""
        if (imgs is None) == (features is None):
            raise ValueError("pass exactly one of imgs= or features=")
        if features is None:
            features = self.inception(imgs)
        features = torch.as_tensor(features)
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"{self.name} expects features [N, {self.num_features}], got {tuple(features.shape)}")
        self.orig_dtype = torch.float64
        f = features.to(self.real_features_sum.device, torch.float64)
        prefix = "real" if real else "fake"
        setattr(self, f"{prefix}_features_sum", getattr(self, f"{prefix}_features_sum") + f.sum(dim=0))
        setattr(self, f"{prefix}_features_cov_sum", getattr(self, f"{prefix}_features_cov_sum") + f.t().mm(f))
        setattr(self, f"{prefix}_features_num_samples", getattr(self, f"{prefix}_features_num_samples") + f.shape[0])

    def statistics(self, real: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased covariance of one set, from the (synced) sums."""
        prefix = "real" if real else "fake"
        n = getattr(self, f"{prefix}_features_num_samples")
        mean = getattr(self, f"{prefix}_features_sum") / n
        cov = (getattr(self, f"{prefix}_features_cov_sum") - n * torch.outer(mean, mean)) / (n - 1)
        return mean, cov

    def compute(self) -> torch.Tensor:
        n_real, n_fake = int(self.real_features_num_samples), int(self.fake_features_num_samples)
        for n, which in ((n_real, "the reference set"), (n_fake, "the evaluated set")):
            if self.full_rank_only or n < 2:
                check_enough_images(n, self.num_features, self.name, which)
        mu1, s1 = self.statistics(real=True)
        mu2, s2 = self.statistics(real=False)
        return _compute_fid(mu1, s1, mu2, s2)


def frechet_from_features(reference, evaluated, full_rank_only: bool = True) -> float:
    """Frechet distance between two feature sets [N, D] (arrays or tensors), through FrechetDistance."""
    reference, evaluated = torch.as_tensor(reference), torch.as_tensor(evaluated)
    metric = FrechetDistance(feature=PrecomputedFeatures(reference.shape[1]), full_rank_only=full_rank_only)
    metric.update(features=reference, real=True)
    metric.update(features=evaluated, real=False)
    return float(metric.compute())
