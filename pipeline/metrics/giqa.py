"""GIQA (Gu et al., ECCV 2020): the quality of one generated image, measured
as how typical its Inception features are of a reference set of real images.

- GMM-GIQA: log-likelihood under a Gaussian mixture with full covariances,
  fitted to the reference features after an optional PCA. Scoring in the PCA
  subspace alone ignores everything a degradation does off that subspace, and
  on real photos blur and noise mostly move features *towards* the mean inside
  it (they erase what is distinctive), so the subspace likelihood even rises
  with blur. The PCA model therefore keeps the discarded dimensions as an
  isotropic Gaussian with the reference's mean residual variance (the
  probabilistic-PCA noise term, Tipping & Bishop 1999): the score is the
  likelihood of the whole feature vector, not of its projection.
- KNN-GIQA: 1 / (mean Euclidean distance to the K nearest reference features).

Both take numpy or torch features [N, D] and return numpy float64 scores [N]
(higher = better). This is the project's one GIQA implementation.
"""
from __future__ import annotations

import numpy as np

METHODS = ("gmm", "knn")


class GIQAReferenceError(ValueError):
    """A reference set too small for the requested model."""


def _array(features) -> np.ndarray:
    x = features.detach().cpu().numpy() if hasattr(features, "detach") else np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"GIQA expects features [N, D], got shape {x.shape}")
    return x.astype(np.float64)


class GMMGIQA:
    def __init__(self, n_components: int = 4, pca_dim: int | None = 64, reg_covar: float = 1e-4,
                 residual: bool = True, seed: int = 0):
        if n_components < 1:
            raise ValueError(f"n_components={n_components} must be >= 1")
        self.n_components, self.pca_dim, self.reg_covar = n_components, pca_dim, reg_covar
        self.residual, self.seed = residual, seed

    def describe(self) -> dict:
        return {"method": "gmm", "n_components": self.n_components, "pca_dim": self.pca_dim,
                "reg_covar": self.reg_covar, "residual": self.residual, "seed": self.seed}

    def check_reference(self, n: int, where: str = "the GIQA reference") -> None:
        if n < max(2, self.n_components):
            raise GIQAReferenceError(
                f"{where} has {n} images, fewer than the {self.n_components} GMM components (and at least 2 "
                f"are needed); add reference images or lower --gmm-components")

    def fit(self, reference) -> "GMMGIQA":
        from sklearn.mixture import GaussianMixture

        ref = _array(reference)
        n, d = ref.shape
        self.check_reference(n)
        self.mean = ref.mean(0)
        centred = ref - self.mean
        if self.pca_dim:  # principal axes by SVD: exact and fast when n << D
            # at most n - 2 axes: at least one discarded direction of non-zero variance, so the
            # residual variance is estimated from the reference rather than set by a floor
            k = max(1, min(self.pca_dim, n - 2, d))
            _, s, vt = np.linalg.svd(centred, full_matrices=False)
            self.components = vt[:k]
            rest = (s[k:] ** 2).sum() / (n - 1)
            self.residual_var = max(rest / max(d - k, 1), self.reg_covar)
        else:
            self.components = None
        self.gmm = GaussianMixture(self.n_components, covariance_type="full", reg_covar=self.reg_covar,
                                   random_state=self.seed).fit(self._project(centred))
        self.pca_dim_used = None if self.components is None else len(self.components)
        return self

    def _project(self, centred: np.ndarray) -> np.ndarray:
        return centred if self.components is None else centred @ self.components.T

    def score(self, features) -> np.ndarray:
        centred = _array(features) - self.mean
        z = self._project(centred)
        s = self.gmm.score_samples(z)
        if self.components is not None and self.residual:
            d_rest = centred.shape[1] - len(self.components)
            r2 = ((centred - z @ self.components) ** 2).sum(1)
            s = s - 0.5 * (r2 / self.residual_var + d_rest * np.log(2 * np.pi * self.residual_var))
        return s


class KNNGIQA:
    def __init__(self, k: int = 5):
        if k < 1:
            raise ValueError(f"KNN-GIQA k={k} must be >= 1")
        self.k = k

    def describe(self) -> dict:
        return {"method": "knn", "k": self.k}

    def check_reference(self, n: int, where: str = "the GIQA reference") -> None:
        if n < self.k:
            raise GIQAReferenceError(f"{where} has {n} images, fewer than k={self.k} neighbours; add "
                                     f"reference images or lower --knn-k")

    def fit(self, reference) -> "KNNGIQA":
        self.reference = _array(reference)
        self.check_reference(len(self.reference))
        return self

    def score(self, features, batch: int = 1024) -> np.ndarray:
        x = _array(features)
        ref_sq = (self.reference ** 2).sum(1)
        out = []
        for i in range(0, len(x), batch):
            q = x[i:i + batch]
            d2 = (q ** 2).sum(1)[:, None] + ref_sq[None] - 2 * q @ self.reference.T
            near = np.sqrt(np.sort(np.maximum(d2, 0), axis=1)[:, :self.k])
            out.append(1.0 / (near.mean(1) + 1e-12))
        return np.concatenate(out) if out else np.zeros(0)


def make_giqa(method: str = "gmm", n_components: int = 4, pca_dim: int | None = 64, k: int = 5,
              seed: int = 0, residual: bool = True):
    if method == "gmm":
        return GMMGIQA(n_components, pca_dim, residual=residual, seed=seed)
    if method == "knn":
        return KNNGIQA(k)
    raise ValueError(f"--giqa {method!r} is not available; choose one of {METHODS}")


def from_description(d: dict):
    """The (unfitted) GIQA a `describe()` dict stands for: refit it on stored reference features."""
    if d.get("method") == "knn":
        return KNNGIQA(d["k"])
    return GMMGIQA(d["n_components"], d["pca_dim"], d.get("reg_covar", 1e-4), d.get("residual", True), d.get("seed", 0))
