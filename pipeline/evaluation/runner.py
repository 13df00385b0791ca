"""QDiffBench: validate everything cheap first, then one Lightning predict pass
per method (FP first: it is the reference), on one process or many."""
from __future__ import annotations

import time
import warnings
from typing import Sequence

from data.images import list_images
from pipeline.engine import make_trainer
from pipeline.evaluation.methods import EvalMethod, FullPrecision, StaticQuantState
from pipeline.evaluation.module import MethodEvaluation, SharedState
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
                   batch_size: int = 8, trainer_kwargs: dict | None = None, load: dict | None = None) -> dict:
    """Evaluate FP and every method on every split. Returns
    {"rows": [...], "grids": {label: {split: uint8 [n, H, W, 3]}}, "is_global_zero": bool, ...}."""

    splits = list(splits)
    batches = global_batches(splits, batch_size)
    # our sampler deals whole batches; no_grad instead of inference_mode keeps the quantizer
    # state (loaded inside the loop) ordinary tensors
    trainer = make_trainer(trainer_kwargs, progress=True,
                           forced={"use_distributed_sampler": False, "inference_mode": False})
    if len(batches) < trainer.world_size:
        raise ValueError(f"{len(batches)} batches for {trainer.world_size} processes: every process needs at least "
                         f"one; lower --batch-size (now {batch_size}) or the number of devices")
    everything = [FullPrecision()] + [m for m in methods if not m.is_reference]
    shared = SharedState()
    rows, grids, walls = [], {}, {}
    for method in everything:
        module = MethodEvaluation(method, model, splits, batches, settings, shared, load)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*predict returned None.*")
            trainer.predict(module, return_predictions=False)
        walls[method.label] = time.perf_counter() - t0
        for split in splits:
            rows.append({"split": split.name, "method": method.label, "kind": method.kind,
                         "bit_options": method.bit_options(), **module.results[split.name]})
        grids[method.label] = module.grid_images
    return {"rows": rows, "grids": grids, "wall_seconds": walls, "world_size": trainer.world_size,
            "is_global_zero": trainer.is_global_zero, "n_real_images": shared.n_real,
            "methods": [m.describe() for m in everything]}
