"""QDiffBench: validate everything cheap first, then one Lightning predict pass
per method and split (FP first: it is the reference), on one process or many,
each finished pass kept in the progress folder so that a rerun resumes."""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Sequence

from data.images import list_images
from pipeline.engine import make_trainer
from pipeline.evaluation.methods import EvalMethod, FullPrecision, StaticQuantState
from pipeline.evaluation.module import MethodEvaluation, SharedState
from pipeline.evaluation.progress import EvalProgress, splits_signature
from pipeline.evaluation.settings import EvalSettings
from pipeline.evaluation.splits import Split, global_batches
from pipeline.metrics.frechet import check_enough_images
from pipeline.metrics.inception import feature_dims
from pipeline.models import load_pipeline


def validate(model: str, methods: Sequence[EvalMethod], splits: Sequence[Split], settings: EvalSettings,
             load: dict | None = None, fp_unet=None) -> None:
    """Fail before generating anything: bad settings, too few images for the
    Frechet metrics, a quantized state of another model or step count."""

    settings.check()
    if not splits:
        raise ValueError("no prompt split to evaluate")
    names = [s.name for s in splits]
    if len(set(names)) != len(names):
        raise ValueError(f"split names {names} are not unique")
    for s in splits:
        where = f"split {s.name!r} ({len(s.prompts)} prompts x {s.images_per_prompt} images)"
        if settings.fid:
            check_enough_images(s.n_images, settings.fid_dims, "FID", where)
        if settings.sfid:
            check_enough_images(s.n_images, feature_dims("spatial", settings.sfid_grid), "sFID", where)
    if settings.real_images:
        n_real = len(list_images(settings.real_images))
        check_enough_images(n_real, settings.fid_dims, "FID to real", f"--real-images {settings.real_images}")
    quantized = [m for m in methods if isinstance(m, StaticQuantState)]
    for m in quantized:
        m.check_sampler({"steps": settings.steps, "guidance": settings.guidance, "scheduler": settings.scheduler})
    if quantized:
        if fp_unet is None:
            fp_unet = load_pipeline(model, **(load or {})).unet
        for m in quantized:
            try:
                m.check_model(fp_unet)
            except ValueError as e:
                raise ValueError(f"--quant-states {m.path} cannot be evaluated on --model {model}: {e}") from e


def run_evaluation(model: str, methods: Sequence[EvalMethod], splits: Sequence[Split], settings: EvalSettings,
                   batch_size: int = 8, trainer_kwargs: dict | None = None, load: dict | None = None,
                   progress_dir: str | Path | None = None, discard_stale: bool = False) -> dict:
    """Evaluate FP and every method on every split. Returns
    {"rows": [...], "grids": {label: {split: uint8 [n, H, W, 3]}}, "per_image": {label: {split: {"index": [...],
    "psnr": [...], ...}, None for FP}}, "is_global_zero": bool, ...}.

    With `progress_dir`, each finished (method, split) is kept there and a rerun under the same
    settings skips it (`discard_stale`: progress of other settings is discarded, not refused)."""

    splits = list(splits)
    batches = global_batches(splits, batch_size)
    # our sampler deals whole batches; no_grad instead of inference_mode keeps the quantizer
    # state (loaded inside the loop) ordinary tensors
    trainer = make_trainer(trainer_kwargs, progress=True,
                           forced={"use_distributed_sampler": False, "inference_mode": False})
    for split in splits:
        n = sum(b["split"] == split.name for b in batches)
        if n < trainer.world_size:
            raise ValueError(f"split {split.name!r} has {n} batches for {trainer.world_size} processes: every "
                             f"process needs at least one; lower --batch-size (now {batch_size}) or the number "
                             f"of devices")
    everything = [FullPrecision()] + [m for m in methods if not m.is_reference]
    signature = {"model": model, "methods": [m.describe() for m in everything], "splits": splits_signature(splits),
                 "settings": settings, "batch_size": batch_size, "world_size": trainer.world_size, "load": load}
    progress = EvalProgress(progress_dir, signature, trainer.global_rank, discard_stale)
    shared = SharedState()
    rows, grids, walls, per_image = [], {}, {}, {}
    for method in everything:
        module = MethodEvaluation(method, model, splits, batches, settings, shared, load)
        grids[method.label], walls[method.label], per_image[method.label] = {}, 0.0, {}
        for split in splits:
            entry = progress.finished(method.label, split.name)
            if entry is None:
                module.active = [split]
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
                    warnings.filterwarnings("ignore", message=".*predict returned None.*")
                    trainer.predict(module, return_predictions=False)
                row, wall = module.results[split.name], time.perf_counter() - t0
                scores = module.per_image.get(split.name)
                grid = module.grid_images.get(split.name)
                if method.is_reference:
                    progress.save_reference(shared.reference, split.name)
                trainer.strategy.barrier()  # every process's reference file is on disk before it is recorded
                progress.record_pass(method.label, split.name, row, wall, grid, trainer.world_size,
                                     method.is_reference, scores)
            else:
                row, wall, grid = entry["row"], entry["wall_s"], progress.grid(entry, method.label, split.name)
                scores = entry["per_image"]
                if method.is_reference:
                    progress.load_reference(shared.reference, split.name)
                print(f"[evaluate] {method.label} on {split.name}: reusing the finished pass in {progress_dir}")
            rows.append({"split": split.name, "method": method.label, "kind": method.kind,
                         "bit_options": method.bit_options(), **row})
            walls[method.label] += wall
            per_image[method.label][split.name] = scores
            if grid is not None:
                grids[method.label][split.name] = grid
        module.release()
    return {"rows": rows, "grids": grids, "per_image": per_image, "wall_seconds": walls,
            "world_size": trainer.world_size, "is_global_zero": trainer.is_global_zero, "n_real_images": shared.n_real,
            "methods": [m.describe() for m in everything]}
