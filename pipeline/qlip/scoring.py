"""FP images and their Inception features, shard by shard, as a Lightning
predict loop; then GIQA scores.

A batch is one shard: prompts to generate (data/prompts.py
`generation_shards`) or reference images (data/reference.py). Each shard
writes its PNGs and then `shards/<name>.safetensors` (features [n, 2048]),
renamed into place only when complete, so a shard file means a finished
shard: an interrupted run resumes at the first missing one, and under DDP
processes share the shards without ever writing the same file."""
from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch

from pipeline.metrics.inception import inception_features

SHARDS = "shards"


def shard_name(batch: dict) -> str:
    return f"{batch['split'] if batch['kind'] == 'generate' else 'reference'}_{batch['shard']:05d}"


def image_name(split: str, i: int) -> str:
    return f"images/{split}_{i:06d}.png"


class FPFeatures(L.LightningModule):
    def __init__(self, pipe, out_dir: str | Path, steps: int, guidance: float, inception_batch: int = 32):
        super().__init__()
        self.pipe, self.out = pipe, Path(out_dir)
        self.steps, self.guidance, self.inception_batch = steps, guidance, inception_batch
        self.written = 0

    def on_predict_start(self) -> None:
        from pipeline.metrics.inception import shared_backbone

        if self.pipe is not None:
            self.pipe.to(self.device)
            self.pipe.set_progress_bar_config(disable=True)
        self.inception = shared_backbone().to(self.device)
        (self.out / SHARDS).mkdir(parents=True, exist_ok=True)
        (self.out / "images").mkdir(parents=True, exist_ok=True)

    def predict_step(self, batch, batch_idx):
        from PIL import Image
        from safetensors.torch import save_file

        from pipeline.sampling import generate

        path = self.out / SHARDS / f"{shard_name(batch)}.safetensors"
        if path.is_file():
            return None  # finished by an earlier run
        if batch["kind"] == "generate":
            images = generate(self.pipe, batch["prompts"], batch["seeds"], steps=self.steps, guidance=self.guidance,
                              batch_size=len(batch["prompts"]), progress=False)
            for i, img in zip(batch["indices"], images):
                Image.fromarray(img).save(self.out / image_name(batch["split"], i))
        else:
            images = batch["images"]
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        feats = inception_features(images, self.inception, self.inception_batch)
        save_file({"features": feats.contiguous()}, str(tmp),
                  metadata={"indices": json.dumps(batch["indices"])})
        os.replace(tmp, path)
        self.written += 1
        return None


def read_shards(out_dir: str | Path, names: list[str]) -> torch.Tensor:
    """Concatenated features of the named shards, refusing a missing one."""
    from safetensors.torch import load_file

    d = Path(out_dir) / SHARDS
    missing = [n for n in names if not (d / f"{n}.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} feature shards are missing in {d} ({', '.join(missing[:5])}); "
                                f"run the same command again to finish them")
    return torch.cat([load_file(str(d / f"{n}.safetensors"))["features"] for n in names])


def scored_set_giqa(scored_dir: str | Path):
    """(GIQA refitted on the set's stored reference features, its Normalizer):
    scores new images on the same scale as the scored set."""
    from safetensors.torch import load_file

    from data.scored import Normalizer
    from pipeline.metrics.giqa import from_description

    d = Path(scored_dir)
    metrics = json.loads((d / "manifest.json").read_text())["metrics"]
    giqa = from_description(metrics["giqa"]).fit(load_file(str(d / "features.safetensors"))["reference"])
    norm = metrics["normalization"]
    return giqa, Normalizer(norm["lo"], norm["hi"], norm["quantile"])
