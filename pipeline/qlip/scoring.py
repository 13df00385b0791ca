"""FP images and their Inception features, shard by shard, as a Lightning
predict loop; then GIQA scores.

A batch is one shard: prompts to generate (data/prompts.py
`generation_shards`) or reference images (data/reference.py). Each shard
writes its PNGs and then `shards/<name>.safetensors` (features [n, 2048]),
renamed into place only when complete and then recorded with its checksum in
`shards/index.json` (artifacts.ShardIndex): an interrupted run resumes at the
first unfinished shard (a truncated or changed one is redone), and under DDP
processes share the shards without ever writing the same file."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image

from data.reference import WORLD
from data.scored import Normalizer, write_scored
from pipeline.artifacts import (
    MANIFEST,
    ShardIndex,
    atomic_path,
    check_progress,
    discard_progress,
    is_finished,
    jsonable,
    load_tensors,
    lock_run_dir,
    refuse_existing_results,
    save_tensors,
    verify_manifest,
    write_json_atomic,
)
from pipeline.metrics.giqa import from_description
from pipeline.metrics.inception import inception_features, shared_backbone
from pipeline.models import EMBEDDED
from pipeline.plots import save_grid
from pipeline.sampling import generate

SHARDS = "shards"


def shard_name(batch: dict) -> str:
    return f"{batch['split'] if batch['kind'] == 'generate' else 'reference'}_{batch['shard']:05d}"


def image_name(split: str, i: int) -> str:
    return f"images/{split}_{i:06d}.png"


class FPFeatures(L.LightningModule):
    def __init__(self, pipe, out_dir: str | Path, steps: int, guidance: float, inception_batch: int = 32,
                 resolution: int | None = None):
        super().__init__()
        self.pipe, self.out = pipe, Path(out_dir)
        self.steps, self.guidance, self.inception_batch = steps, guidance, inception_batch
        self.resolution = resolution
        self.written = 0

    def on_predict_start(self) -> None:
        if self.pipe is not None:
            self.pipe.to(self.device)
            self.pipe.set_progress_bar_config(disable=True)
        self.inception = shared_backbone().to(self.device)
        (self.out / SHARDS).mkdir(parents=True, exist_ok=True)
        (self.out / "images").mkdir(parents=True, exist_ok=True)

    def predict_step(self, batch, batch_idx):
        from PIL import Image

        path = self.out / SHARDS / f"{shard_name(batch)}.safetensors"
        index = ShardIndex(self.out / SHARDS)
        if index.finished(path):
            return None  # finished by an earlier run
        if batch["kind"] == "generate":
            images = generate(self.pipe, batch["prompts"], batch["seeds"], steps=self.steps, guidance=self.guidance,
                              batch_size=len(batch["prompts"]), resolution=self.resolution, progress=False)
            for i, img in zip(batch["indices"], images):
                with atomic_path(self.out / image_name(batch["split"], i)) as tmp:
                    Image.fromarray(img).save(tmp, format="PNG")
        else:
            images = batch["images"]
        feats = inception_features(images, self.inception, self.inception_batch)
        save_tensors(path, {"features": feats}, metadata={"indices": json.dumps(batch["indices"])})
        index.record(path)
        self.written += 1
        return None


def read_shards(out_dir: str | Path, names: list[str]) -> torch.Tensor:
    """Concatenated features of the named shards, refusing a missing one."""
    d = Path(out_dir) / SHARDS
    missing = [n for n in names if not (d / f"{n}.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} feature shards are missing in {d} ({', '.join(missing[:5])}); "
                                f"run the same command again to finish them")
    fix = "run the same command again: it checks every shard and redoes a bad one"
    return torch.cat([load_tensors(d / f"{n}.safetensors", fix)["features"] for n in names])


def scored_set_giqa(scored_dir: str | Path):
    """(GIQA refitted on the set's stored reference features, its Normalizer):
    scores new images on the same scale as the scored set."""
    d = Path(scored_dir)
    fix = "re-run the score stage with --overwrite true"
    verify_manifest(d, ["features.safetensors"], fix)
    metrics = json.loads((d / "manifest.json").read_text())["metrics"]
    giqa = from_description(metrics["giqa"]).fit(load_tensors(d / "features.safetensors", fix)["reference"])
    norm = metrics["normalization"]
    return giqa, Normalizer(norm["lo"], norm["hi"], norm["quantile"])


SAMPLER_KEYS = ("steps", "guidance", "scheduler")  # what makes a scored set's images those of a sampler


def scored_sampler(scored: str | Path) -> dict | None:
    """The sampler a scored set's FP images were drawn with (its manifest's signature); None for a set
    the score stage did not write (no manifest: targets made elsewhere, of no known sampler)."""
    path = Path(scored) / "manifest.json"
    if not path.is_file():
        return None
    signature = json.loads(path.read_text())["signature"]
    return {k: signature.get(k) for k in SAMPLER_KEYS}


def t2q_sampler(t2q_meta: dict) -> dict | None:
    """The sampler of a T2Q's targets: recorded by the t2q stage, else read from its scored set; None
    for a T2Q that names no scored set (one saved by a library call, trained on other targets)."""
    if t2q_meta.get("sampler"):
        return t2q_meta["sampler"]
    return scored_sampler(t2q_meta["scored"]) if t2q_meta.get("scored") else None


def check_same_sampler(scored: dict, deployed: dict, scored_what: str, deployed_what: str) -> None:
    """T2Q's targets are the quality of images drawn by one sampler; refuse to deploy it under another.
    A key either side does not record (older scored sets had no scheduler) is not compared."""
    diff = [k for k in SAMPLER_KEYS if None not in (scored.get(k), deployed.get(k)) and scored[k] != deployed[k]]
    if diff:
        def fmt(d: dict) -> str:
            return ", ".join(f"{k} {d[k]}" for k in SAMPLER_KEYS if d.get(k) is not None)

        raise ValueError(f"{scored_what} was sampled with {fmt(scored)} but {deployed_what} samples with "
                         f"{fmt(deployed)} (differs in {', '.join(diff)}): T2Q's targets must come from the "
                         f"deployed sampler; re-run score with --steps {deployed['steps']} --guidance "
                         f"{deployed['guidance']} --scheduler {deployed['scheduler']}, or deploy with the scored "
                         f"set's settings")


def resolve_reference(reference: str, model: str) -> str:
    """--reference auto: the world's renders on the embedded model; elsewhere a folder must be given."""
    if reference != "auto":
        return reference
    if model == EMBEDDED:
        return WORLD
    raise ValueError(f"--reference auto means the world's renders, which only fit --model embedded; for "
                     f"{model!r} pass --reference PATH, a folder of real images (e.g. COCO val2017 photos)")


def refuse_finished(out: Path, overwrite: bool, fresh: bool = False) -> None:
    """Take the run directory's lock, then refuse finished results (unless overwrite or fresh)."""
    lock_run_dir(out.parent, "score")
    if fresh:
        discard_progress(out.parent, "score")
    refuse_existing_results(out, overwrite or fresh)


def prepare_scored_dir(out: Path, signature: dict, overwrite: bool) -> None:
    """Refuse finished results (unless overwrite); resume unfinished ones only with the same settings.
    --overwrite keeps the shards of the same settings (only the finished set is redone) and discards others'."""
    refuse_finished(out, overwrite)
    if overwrite and is_finished(out):
        (out / MANIFEST).unlink()  # now unfinished: the shards below are reused if the signature matches
    if check_progress(out / "meta.json", signature, "an unfinished score run", discard_stale=overwrite) is not None:
        print(f"resuming the unfinished score run in {out}")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "meta.json", {"signature": jsonable(signature)})


def finish_scored_set(out: Path, shards: list[dict], n_reference: int, giqa, quantile: float) -> dict:
    """Fit GIQA on the reference features, score, normalize over train, write the
    scored set (scored.jsonl, features.safetensors, extremes.png); returns the metrics."""
    gen = read_shards(out, [shard_name(s) for s in shards])
    ref_feats = read_shards(out, [f"reference_{k:05d}" for k in range(n_reference)])
    raw = giqa.fit(ref_feats).score(gen)
    rows = []
    for s in shards:
        for i, p, seed in zip(s["indices"], s["prompts"], s["seeds"]):
            rows.append({"index": len(rows), "split": s["split"], "prompt": p, "seed": seed,
                         "image": image_name(s["split"], i)})
    train = [v for v, r in zip(raw, rows) if r["split"] == "train"]
    normalizer = Normalizer.fit(train if train else raw, quantile)
    for r, v, q in zip(rows, raw, normalizer(raw)):
        r["score_raw"], r["score"] = float(v), float(q)
    write_scored(out, rows)
    save_tensors(out / "features.safetensors", {"generated": gen, "reference": ref_feats},
                 metadata={"giqa": json.dumps(giqa.describe()), "rows": "scored.jsonl order"})
    shutil.rmtree(out / SHARDS, ignore_errors=True)  # merged into features.safetensors
    save_extremes(out, rows)
    per_split = {s: {"n": int(sum(r["split"] == s for r in rows)),
                     "raw_mean": float(np.mean([r["score_raw"] for r in rows if r["split"] == s])),
                     "score_mean": float(np.mean([r["score"] for r in rows if r["split"] == s]))}
                 for s in dict.fromkeys(r["split"] for r in rows)}
    return {"per_split": per_split, "normalization": vars(normalizer) | {"over": "train" if train else "all"},
            "giqa": giqa.describe(), "n_rows": len(rows)}


def save_extremes(out: Path, rows: list[dict], n: int = 8) -> None:
    """extremes.png: the n best-scored images (top row) and the n worst (bottom row)."""
    if len(rows) < 2:
        return
    order = sorted(rows, key=lambda r: r["score_raw"])
    k = min(n, len(rows) // 2)
    load = lambda rs: np.stack([np.asarray(Image.open(out / r["image"]).convert("RGB")) for r in rs])  # noqa: E731
    best, worst = load(order[::-1][:k]), load(order[:k])
    save_grid([best, worst], out / "extremes.png", labels=["best GIQA", "worst GIQA"],
              scale=max(1, 96 // best.shape[1]))
