"""The scored set: FP images of prompts with their GIQA quality, and the
T2Q DataModule over it.

`<dir>/scored.jsonl`, one row per image:
    {"index", "split", "prompt", "seed", "image" (path relative to <dir>), "score_raw", "score"}
`score_raw` is the GIQA score; `score` is it normalized to [0, 1] over the
train split (`Normalizer`). Targets are re-normalized here from the raw
scores with the same rule, so a T2Q target never depends on which splits a
score run happened to include beyond train. With target "complexity" the raw target is the FP image's
complexity instead (a T2C, the text-predicted complexity of QLIP's Table S3), normalized the same way."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.images import image_complexity
from data.prompts import write_atomic

SCORED_FILE = "scored.jsonl"
COLUMNS = ("index", "split", "prompt", "seed", "image", "score_raw", "score")


class MissingImagesError(FileNotFoundError):
    pass


@dataclass
class Normalizer:
    """Min-max to [0, 1] between the `quantile` and 1 - `quantile` points of
    the training scores, clipped. GIQA log-likelihoods have a long lower tail:
    with plain min-max (quantile 0) one outlier would squash every other target
    into a sliver near 1, so the default trims 1% at each end."""

    lo: float = 0.0
    hi: float = 1.0
    quantile: float = 0.01

    @classmethod
    def fit(cls, raw: Sequence[float], quantile: float = 0.01) -> "Normalizer":
        raw = np.asarray(raw, dtype=np.float64)
        if raw.size == 0:
            raise ValueError("cannot normalize scores: the train split has no scored images")
        if not 0 <= quantile < 0.5:
            raise ValueError(f"normalization quantile {quantile} must be in [0, 0.5)")
        lo, hi = np.quantile(raw, [quantile, 1 - quantile])
        if hi <= lo:  # every training score equal: map them to 0.5
            lo, hi = lo - 0.5, lo + 0.5
        return cls(float(lo), float(hi), quantile)

    def __call__(self, raw) -> np.ndarray:
        return np.clip((np.asarray(raw, dtype=np.float64) - self.lo) / (self.hi - self.lo), 0.0, 1.0)


def write_scored(out_dir: str | Path, rows: list[dict]) -> Path:
    path = Path(out_dir) / SCORED_FILE
    write_atomic(path, "".join(json.dumps({k: r[k] for k in COLUMNS}) + "\n" for r in rows))
    return path


def read_scored(scored_dir: str | Path, check_images: bool = True) -> list[dict]:
    """The rows of a scored set; refuses one whose images are missing, listing them."""
    d = Path(scored_dir)
    path = d / SCORED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no scored set at {d} ({SCORED_FILE} is missing); run "
                                f"`python -m pipeline.fit score --run-dir ...` first")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if rows and (missing_cols := [c for c in COLUMNS if c not in rows[0]]):
        raise ValueError(f"{path} lacks the columns {missing_cols}; re-run the score stage to rewrite it")
    if check_images:
        missing = [r["image"] for r in rows if not (d / r["image"]).is_file()]
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise MissingImagesError(f"{len(missing)} images of the scored set {d} are missing: {shown}; "
                                     f"re-run the score stage with --overwrite true to regenerate them")
    return rows


TARGETS = ("giqa", "complexity")  # what T2Q learns to predict from the text: GIQA (QLIP's T2Q) or T2C


def complexity_of(scored_dir: str | Path, rows: list[dict]) -> list[float]:
    """Image complexity (mean gradient magnitude, data.images.image_complexity) of each row's FP image."""
    from PIL import Image

    out = []
    for r in rows:
        with Image.open(Path(scored_dir) / r["image"]) as im:
            out.append(float(image_complexity(np.asarray(im.convert("RGB"))[None])[0]))
    return out


class ScoredPrompts(Dataset):
    """Items {"prompt": str, "target": float32 tensor}."""

    def __init__(self, prompts: Sequence[str], targets: Sequence[float]):
        self.prompts, self.targets = list(prompts), torch.as_tensor(np.asarray(targets), dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"prompt": self.prompts[i], "target": self.targets[i]}


def _collate(items: list[dict]) -> dict:
    return {"prompt": [it["prompt"] for it in items], "target": torch.stack([it["target"] for it in items])}


class ScoredDataModule(L.LightningDataModule):
    """Train / val splits of a scored set for T2Q.

    `batch_size` is the global batch: under DDP each of the N processes loads
    batch_size / N, so one optimizer step sees the same number of prompts on
    one process or many. Validation is dealt without padding (no prompt
    counted twice), so the synced metrics equal the single-process ones."""

    def __init__(self, scored_dir: str | Path, batch_size: int = 64, train_split: str = "train",
                 val_split: str = "val", quantile: float = 0.01, seed: int = 0, test_split: str = "test",
                 target: str = "giqa"):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"--target {target!r}: choose one of {', '.join(TARGETS)}")
        self.scored_dir, self.batch_size, self.seed, self.target = Path(scored_dir), batch_size, seed, target
        self.train_split, self.val_split, self.quantile = train_split, val_split, quantile
        self.test_split = test_split
        self.train_set = self.val_set = self.test_set = self.normalizer = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        rows = read_scored(self.scored_dir)
        if self.target == "complexity":  # T2C: the FP image's own complexity, not its GIQA score
            rows = [{**r, "score_raw": raw} for r, raw in zip(rows, complexity_of(self.scored_dir, rows))]
        by_split = {s: [r for r in rows if r["split"] == s] for s in (self.train_split, self.val_split)}
        for name, part in by_split.items():
            if not part:
                have = sorted({r["split"] for r in rows})
                raise ValueError(f"the scored set {self.scored_dir} has no {name!r} images (it holds {have}); "
                                 f"score that split (--splits train,val) or pick another split")
        train = by_split[self.train_split]
        self.normalizer = Normalizer.fit([r["score_raw"] for r in train], self.quantile)
        # the test split is optional (score it with --splits train,val,test): never trained or selected on
        test = [r for r in rows if r["split"] == self.test_split]
        self.train_set, self.val_set, self.test_set = (
            ScoredPrompts([r["prompt"] for r in part], self.normalizer([r["score_raw"] for r in part]))
            for part in (train, by_split[self.val_split], test))

    def describe(self) -> dict:
        return {"scored": str(self.scored_dir), "target": self.target, "n_train": len(self.train_set),
                "n_val": len(self.val_set),
                "n_test": len(self.test_set), "normalization": asdict(self.normalizer)}

    def _world(self) -> tuple[int, int]:
        t = getattr(self, "trainer", None)
        return (t.world_size, t.global_rank) if t is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        world, _ = self._world()
        if self.batch_size % world:
            raise ValueError(f"--batch-size {self.batch_size} is not divisible by the {world} processes")
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size // world, shuffle=True, generator=g,
                          collate_fn=_collate)

    def val_dataloader(self) -> DataLoader:
        from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

        world, rank = self._world()
        sampler = UnrepeatedDistributedSampler(self.val_set, num_replicas=world, rank=rank, shuffle=False) \
            if world > 1 else None
        return DataLoader(self.val_set, batch_size=self.batch_size, sampler=sampler, collate_fn=_collate)
