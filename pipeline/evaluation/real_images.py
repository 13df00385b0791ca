"""A folder of real images for "FID to real": listed recursively in sorted
order, centre-cropped to a square and resized (bicubic) to the generated
images' size, so real and generated images reach the Inception the same way."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from data.images import list_images, load_square
from data.world import render_split
from pipeline.plots import save_images


def real_features(files: list[Path], side: int, backbone, tap, batch: int = 16, device="cpu",
                  progress: bool = True) -> torch.Tensor:
    """Inception features [len(files), D] of the given real images."""
    out = []
    for i in tqdm(range(0, len(files), batch), desc="real images", disable=not progress, leave=False):
        imgs = np.stack([load_square(f, side) for f in files[i:i + batch]])
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous().to(device)
        out.append(backbone.taps(x, [tap])[tap].cpu())
    return torch.cat(out)


def world_real_images(spec: str, folder: str | Path, resolution: int = 32) -> Path:
    """`--real-images world[:N]`: N renders (default 1000) of the embedded world's test split, the world's real
    images, written once as PNGs under `folder` (a rerun with the same N and resolution reuses them)."""
    _, _, count = spec.partition(":")
    try:
        n = int(count) if count else 1000
    except ValueError:
        raise ValueError(f"--real-images {spec!r}: use world or world:N with N a number of renders") from None
    if n < 2:
        raise ValueError(f"--real-images {spec!r}: FID to real needs at least 2 renders")
    out = Path(folder) / f"world_test_{n}_{resolution}px"
    if out.is_dir() and len(list_images(out)) == n:
        return out
    images, _ = render_split("test", n, resolution=resolution)
    return save_images(images, out)
