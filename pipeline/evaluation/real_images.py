"""A folder of real images for "FID to real": listed recursively in sorted
order, centre-cropped to a square and resized (bicubic) to the generated
images' size, so real and generated images reach the Inception the same way."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from data.images import load_square


def real_features(files: list[Path], side: int, backbone, tap, batch: int = 16, device="cpu",
                  progress: bool = True) -> torch.Tensor:
    """Inception features [len(files), D] of the given real images."""
    out = []
    for i in tqdm(range(0, len(files), batch), desc="real images", disable=not progress, leave=False):
        imgs = np.stack([load_square(f, side) for f in files[i:i + batch]])
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous().to(device)
        out.append(backbone.taps(x, [tap])[tap].cpu())
    return torch.cat(out)
