"""evaluate's resumable progress: one entry per finished (method, split) pass.

`<run-dir>/evaluate_progress/progress.json` holds the run's signature (model, every
method with its checksums, the splits' prompts and seeds, the settings, the batch size
and the number of processes) and, per finished (method, split), its results row, its
per-image scores to FP (so that a resumed run's intervals and paired tests are those of
an uninterrupted one), its wall time and the files it left:
- `grid_<label>_<split>.safetensors`: the images of the method's grid (rank 0);
- `fp_<split>_rank<r>.safetensors`: the FP pass's reference images and features of
  process r, which every later method of the split is compared with.

A rerun under the same signature skips finished passes (their FP reference is loaded
back); a file that no longer matches its checksum drops its pass, which is redone
(seeded: the same images). Progress of other settings is refused, or discarded under
--overwrite (`pipeline.artifacts.check_progress`)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from pipeline.artifacts import (
    check_progress,
    jsonable,
    load_tensors,
    matches_checksum,
    save_tensors,
    sha256_file,
    write_json_atomic,
)
from pipeline.evaluation.reference import FPReference

RECORD = "progress.json"


def _safe(name: str) -> str:
    """A method label or split name as a file-name part (labels hold spaces, '+' and braces)."""
    return hashlib.sha1(name.encode()).hexdigest()[:12]


def splits_signature(splits) -> list[dict]:
    return [{"name": s.name, "prompts_sha1": hashlib.sha1("\n".join(s.prompts).encode()).hexdigest(),
             "images_per_prompt": s.images_per_prompt, "seed": s.seed} for s in splits]


class EvalProgress:
    def __init__(self, folder: str | Path | None, signature: dict, rank: int = 0, discard_stale: bool = False):
        self.folder, self.rank = (None if folder is None else Path(folder)), rank
        self.signature = jsonable(signature)
        self.record = {"signature": self.signature, "done": {}}
        if self.folder is None:
            return
        if rank == 0:  # the one process that refuses or discards another run's progress
            record = check_progress(self.folder / RECORD, self.signature, "evaluation progress", discard_stale)
        else:  # rank 0 decides; another run's progress is simply not used here
            path = self.folder / RECORD
            record = json.loads(path.read_text()) if path.is_file() else None
            record = record if record and record.get("signature") == self.signature else None
        if record is not None:
            self.record = record

    @staticmethod
    def key(label: str, split: str) -> str:
        return json.dumps([label, split])

    def finished(self, label: str, split: str) -> dict | None:
        """The finished pass's entry (row, wall_s, files), if its files are intact."""
        entry = self.record["done"].get(self.key(label, split))
        if entry is None or self.folder is None:
            return None
        if "per_image" not in entry:  # kept before per-image scores were: its paired tests would lack it
            print(f"note: the finished evaluation of {label} on split {split!r} in {self.folder} has no per-image "
                  f"scores; redoing that pass")
            return None
        mine = [f for f in entry["files"] if not f.startswith("fp_") or f.endswith(f"_rank{self.rank}.safetensors")]
        if all(matches_checksum(self.folder / f, entry["files"][f]) for f in mine):
            return entry
        print(f"note: a file of the finished evaluation of {label} on split {split!r} in {self.folder} is missing "
              f"or corrupted; redoing that pass")
        return None

    # -- what a pass leaves -------------------------------------------------
    def save_reference(self, reference: FPReference, split: str) -> None:
        """This process's FP reference of `split` (every process calls it)."""
        if self.folder is None:
            return
        items = reference.items_of(split)
        tensors = {"indices": torch.tensor([i for i, _ in items], dtype=torch.int64),
                   "seeds": torch.tensor([v[1] for _, v in items], dtype=torch.int64)}
        taps = list(items[0][1][3]) if items else []  # Inception taps: ints (pool dims) or names
        if items:
            tensors["images"] = torch.stack([v[2] for _, v in items])
            for j, tap in enumerate(taps):
                tensors[f"feat.{j}"] = torch.stack([v[3][tap] for _, v in items])
        self.folder.mkdir(parents=True, exist_ok=True)
        save_tensors(self.folder / f"fp_{_safe(split)}_rank{self.rank}.safetensors", tensors,
                     {"prompts": json.dumps([v[0] for _, v in items]), "taps": json.dumps(taps)})

    def load_reference(self, reference: FPReference, split: str) -> None:
        path = self.folder / f"fp_{_safe(split)}_rank{self.rank}.safetensors"
        t = load_tensors(path, f"delete {self.folder} (or pass --fresh true) to evaluate from the start")
        with safe_open(str(path), "pt") as f:
            prompts, taps = json.loads(f.metadata()["prompts"]), json.loads(f.metadata()["taps"])
        if prompts:
            feats = {tap: t[f"feat.{j}"] for j, tap in enumerate(taps)}
            reference.put(split, t["indices"].tolist(), prompts, t["seeds"].tolist(), t["images"], feats)

    def record_pass(self, label: str, split: str, row: dict, wall_s: float, grid: np.ndarray | None,
                    world: int, is_reference: bool, per_image: dict | None = None) -> None:
        """After a pass (and a barrier: every process's reference file is written): rank 0 records it."""
        if self.folder is None or self.rank:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        files = []
        if grid is not None:
            files.append(f"grid_{_safe(label)}_{_safe(split)}.safetensors")
            save_tensors(self.folder / files[-1], {"images": torch.from_numpy(np.ascontiguousarray(grid))})
        if is_reference:
            files += [f"fp_{_safe(split)}_rank{r}.safetensors" for r in range(world)]
        self.record["done"][self.key(label, split)] = {
            "row": row, "per_image": per_image, "wall_s": wall_s,
            "files": {f: sha256_file(self.folder / f) for f in files}}
        write_json_atomic(self.folder / RECORD, self.record)

    def grid(self, entry: dict, label: str, split: str) -> np.ndarray | None:
        name = f"grid_{_safe(label)}_{_safe(split)}.safetensors"
        if name not in entry["files"]:
            return None
        return load_tensors(self.folder / name, "pass --fresh true")["images"].numpy()
