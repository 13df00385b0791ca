"""Folders of real images: listed recursively in sorted order, centre-cropped
to a square and resized (bicubic), so real and generated images reach a
feature extractor the same way."""
from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"real-image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return files


def load_square(path: Path, side: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        return np.asarray(im.resize((side, side), Image.BICUBIC), dtype=np.uint8)


def image_complexity(images: np.ndarray):
    """Mean gradient magnitude of grey-level uint8 images [N, H, W, 3], in [0, 1] units: QLIP's Table S3 image
    complexity (the Q2B criterion `complexity`, and the target of a T2C: `t2q --target complexity`)."""
    import torch

    g = torch.from_numpy(np.ascontiguousarray(images)).float().mean(-1) / 255
    dx, dy = g[:, :, 1:] - g[:, :, :-1], g[:, 1:, :] - g[:, :-1, :]
    return torch.sqrt(dx[:, :-1] ** 2 + dy[:, :, :-1] ** 2).flatten(1).mean(1)
