"""Reference ("real") images for GIQA, in shards for a distributed predict loop.

`world` = renders of the embedded world (its real images: a split and seed
apart from the scenes whose captions are scored); a folder = real photos
such as COCO, centre-cropped and resized to the generated images' side so
both reach the Inception the same way (pipeline/evaluation/real_images.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from data.images import list_images, load_square
from data.world import check_resolution, render_split

WORLD = "world"
WORLD_SPLIT = "test"  # the scored prompts come from world train scenes


class ReferenceImages(Dataset):
    """Item k = {"kind": "reference", "shard": k, "indices": [...], "images": uint8 [n, H, W, 3]}."""

    def __init__(self, spec: str, n: int | None, side: int, shard_size: int = 32, seed: int = 0):
        if shard_size < 1:
            raise ValueError(f"shard size {shard_size} must be >= 1")
        self.spec, self.side, self.shard_size, self.seed = spec, side, shard_size, seed
        if spec == WORLD:
            if not n or n < 1:
                raise ValueError(f"--n-reference {n} must be >= 1 for world renders")
            self.files, self.n = None, n
        else:
            if not Path(spec).is_dir():
                raise FileNotFoundError(f"reference image folder {spec} does not exist; pass a folder of real "
                                        f"images (e.g. COCO photos) or 'world' for the embedded world's renders")
            self.files = list_images(spec)[:n] if n else list_images(spec)
            self.n = len(self.files)

    def describe(self) -> dict:
        return {"reference": self.spec, "n_reference": self.n, "side": self.side, "seed": self.seed}

    def __len__(self) -> int:
        return (self.n + self.shard_size - 1) // self.shard_size

    def __getitem__(self, k: int) -> dict:
        idx = list(range(k * self.shard_size, min((k + 1) * self.shard_size, self.n)))
        if self.files is None:
            images, _ = render_split(WORLD_SPLIT, len(idx), self.seed + 1, check_resolution(self.side), start=idx[0])
        else:
            images = np.stack([load_square(self.files[i], self.side) for i in idx])
        return {"kind": "reference", "shard": k, "indices": idx, "images": images}
