"""The q2b stage's recipe: from a calibrated state and a quality source to a
trained, measured Q2B.

1. quality of the training and validation prompts, and the FP targets
   (calibration data at every step of the training prompts' trajectories);
2. the calibrated state loaded into the UNet, then Q2B trained against it;
3. what was learned, measured on the stored (fp16) module: FAB and
   Spearman(q, FAB) on train and val, and the bit-allocation pictures."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.calibration.data import CalibrationData, collect
from pipeline.engine import fp_autocast, stage_device
from pipeline.metrics.cost import fab_weights, layer_stats, weighted_fab
from pipeline.models import quantize_pipeline
from pipeline.plots import plot_bit_heatmaps, plot_bit_shares
from pipeline.qlip.q2b import Q2BModule, check_target_fab
from pipeline.qlip.sources import CRITERIA
from pipeline.qlip.train import fit_q2b, item_bytes, spearman, training_items
from pipeline.quant import quant_layers
from pipeline.quant.config import parse_bits
from pipeline.sampling import check_own_sampler
from pipeline.shards import DEFAULT_RAM_CAP_GIB, ItemStore, estimate_line, process_share, ram_cap_bytes, rank_share

RELAXATIONS = ("gumbel", "ste")


def q2b_options(meta: dict, state_path: str, bit_options: str | None, criterion: str, t2q: str | None, relax: str,
                target_fab: float) -> list[int]:
    """Everything cheap, before anything is loaded: the bit options Q2B chooses from."""
    if criterion not in CRITERIA:
        raise ValueError(f"--criterion {criterion!r} is not available; choose one of {CRITERIA}")
    if relax not in RELAXATIONS:
        raise ValueError(f"--relax {relax!r}: use one of {RELAXATIONS}")
    if criterion == "t2q" and not t2q:
        raise ValueError("--criterion t2q needs --t2q (a T2Q folder written by `python -m pipeline.fit t2q`)")
    qcfg = meta["quant_config"]
    options = sorted(parse_bits(bit_options, "--bit-options") or qcfg["a_bit_options"])
    lacking = [b for b in options if b not in qcfg["a_bit_options"]]
    if lacking:
        raise ValueError(f"--quant-state {state_path} lacks the {lacking}-bit activation quantizers that Q2B "
                         f"may choose (it has {qcfg['a_bit_options']}); calibrate with --a-bit-options "
                         f"{','.join(map(str, sorted(set(options) | set(qcfg['a_bit_options']))))}")
    if len(options) < 2:
        given = f"--bit-options {bit_options}" if bit_options else f"--quant-state {state_path} (its a_bit_options)"
        raise ValueError(f"{given}: Q2B needs at least two bit options to choose from, got {options}; pass e.g. "
                         f"--bit-options 8,16,32 (calibrated with --a-bit-options 8,16,32)")
    check_target_fab(target_fab, options)
    if qcfg["n_steps"] < 2:
        raise ValueError(f"--quant-state {state_path} addresses a single step; calibrate with --steps > 1")
    return options


def train_q2b_on_state(pipe, quant_state: str, options: list[int], source, prompts: list[str], val: list[str], *,
                       steps: int, guidance: float, batch_size: int, resolution: int | None, cali_dir: str | Path,
                       target_fab: float, epochs: int, seed: int, trainer: dict | None,
                       callbacks: Callable[[torch.Tensor], list] | None = None,
                       ram_cap_gib: float | None = DEFAULT_RAM_CAP_GIB, spill_dir: str | Path | None = None,
                       before_quantize: Callable[[object], None] | None = None, **hparams):
    """Steps 1 and 2 on the FP `pipe` (quantized in place). Returns (q2b, training module, q_train, q_val, fab_w).

    `callbacks(q_train)` makes the Lightning callbacks of the Q2B Trainer (the stage attaches them).
    The training items stay in RAM up to `ram_cap_gib` (None: no cap); the rest go to disk shards in
    `spill_dir`/rank<r> (default: next to `cali_dir`), deleted after training. Under DDP each process
    builds and holds only its own share of them. The cap does not change the result.
    `before_quantize(pipe)` runs on the FP pipeline just before the state is loaded (e.g. the paired
    evaluation's FP images, pipeline/qlip/monitor.py)."""
    cap = ram_cap_bytes(ram_cap_gib)
    check_own_sampler(pipe, "q2b")
    q_train = source.predict(prompts).float().cpu()
    q_val = source.predict(val).float().cpu() if val else torch.zeros(0)
    device = stage_device(trainer)
    pipe.to(device)
    with fp_autocast(trainer, device):  # FP passes: --trainer.precision applies
        collect(pipe, prompts, cali_dir, steps=steps, cali_st=steps, guidance=guidance, batch_size=batch_size,
                seed=seed, resolution=resolution)
        data = CalibrationData(cali_dir, pipe, steps=steps, guidance=guidance, resolution=resolution)
        rank, world = share = process_share(trainer)
        total = data.meta["n_shards"] * len(data.steps)
        per_item = item_bytes(data)
        print(estimate_line("Q2B's training items" + (f" (rank {rank} of {world})" if world > 1 else ""),
                            per_item * len(rank_share(total, rank, world)), cap, per_item))
        spill = Path(spill_dir or Path(cali_dir).with_name(Path(cali_dir).name + "_items")) / f"rank{rank}"
        store = ItemStore(spill, cap, name="q2b")
        # FP targets: before the state is loaded
        items = training_items(pipe.unet, data, q_train, device, store=store, share=share)

    if before_quantize is not None:
        before_quantize(pipe)
    quantize_pipeline(pipe, quant_state)
    layers = list(quant_layers(pipe.unet))
    # a constant quality (text-blind) has no spread to standardize by: z is 0 for every prompt either way
    q_std = float(q_train.std()) if len(q_train) > 1 and float(q_train.std()) > 0 else 1.0
    q2b = Q2BModule(layers, steps, options, float(q_train.mean()), q_std)
    fab_w = fab_weights(layer_stats(pipe.unet), layers)
    with store:
        module = fit_q2b(pipe.unet, q2b, items, fab_w, target_fab, guidance, epochs=epochs, seed=seed,
                         trainer_kwargs=trainer, callbacks=callbacks(q_train) if callbacks else [],
                         total_items=total if world > 1 else None, **hparams)
    return q2b, module, q_train, q_val, fab_w


@torch.no_grad()
def measure_q2b(q2b: Q2BModule, q_train: torch.Tensor, q_val: torch.Tensor, fab_w: torch.Tensor, out: Path) -> dict:
    """Step 3: FAB and Spearman(q, FAB) of the stored module, bit_shares.png and bits_heatmap.png in `out`."""
    layers, options = q2b.layers, q2b.bit_options
    fab_train = weighted_fab(q2b(q_train).double(), fab_w)
    metrics = {"fab_train": float(fab_train.mean()), "spearman_q_fab_train": spearman(q_train, fab_train)}
    shown = q_train
    if len(q_val):
        val_tables = q2b(q_val)
        fab_val = weighted_fab(val_tables.double(), fab_w)
        metrics.update({"fab_val": float(fab_val.mean()), "spearman_q_fab_val": spearman(q_val, fab_val)})
        plot_bit_shares(val_tables, layers, options, out / "bit_shares.png",
                        title=f"bit proportion per layer over {len(q_val)} validation prompts")
        shown = q_val
    panels = {}
    for name, v in zip(("low", "median", "high"), torch.quantile(shown, torch.tensor([0.1, 0.5, 0.9]))):
        table = q2b(v.reshape(1))[0]
        panels[f"{name} q={float(v):.3g}, FAB {float(weighted_fab(table.double(), fab_w)):.2f}"] = table
    plot_bit_heatmaps(panels, layers, options, out / "bits_heatmap.png", title="Q2B bit allocation")
    return metrics
