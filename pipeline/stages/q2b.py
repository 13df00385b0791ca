"""`python -m pipeline.fit q2b`: train Q2B on a calibrated quantized state.

Reads a calibrate output (`--quant-state`, whose a_bit_options hold every
option Q2B may choose) and a quality source (`--criterion t2q --t2q runs/x/t2q`,
or `length` / `complexity` for the Table S3 ablation). Writes
<run-dir>/q2b/{q2b.safetensors, q2b.json, manifest.json, bits_heatmap.png,
bit_shares.png, training/bits_epoch*.png}; the calibration data (every step of
the training prompts' FP trajectories) goes to <run-dir>/q2b_data. See docs/q2b.md."""
from __future__ import annotations

import time
from pathlib import Path

USES_TRAINER = True


def add_arguments(parser) -> None:
    parser.add_argument("--quant-state", type=str, help="a calibrate output folder (e.g. runs/x/quant)")
    parser.add_argument("--criterion", type=str, default="t2q", help="quality source: t2q | length | complexity")
    parser.add_argument("--t2q", type=str | None, default=None, help="T2Q folder (criterion t2q), e.g. runs/x/t2q")
    parser.add_argument("--bit-options", type=str | None, default=None,
                        help="activation bits Q2B chooses from, e.g. 8,16,32 (default: the state's options)")
    parser.add_argument("--target-fab", type=float, default=12.0, help="FAB the bit cost is steered to")
    parser.add_argument("--prompts", type=str, default="world", help="'world', 'builtin' or a .txt/.jsonl file")
    parser.add_argument("--n", type=int, default=64, help="training prompts (train split)")
    parser.add_argument("--val-n", type=int, default=64, help="validation prompts (val split) for Spearman(q, FAB)")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per training item")
    parser.add_argument("--resolution", type=int | None, default=None, help="pixels; default: the model's own")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--dual-lr", type=float, default=0.3, help="step of the FAB dual variable (integral term)")
    parser.add_argument("--rho", type=float, default=10.0, help="quadratic penalty of the FAB gap (proportional term)")
    parser.add_argument("--kappa", type=float, default=1.0, help="w(q) = exp(kappa * standardized q)")
    parser.add_argument("--relax", type=str, default="gumbel", help="gumbel (sampled) | ste (deterministic)")
    parser.add_argument("--tau-start", type=float, default=1.0)
    parser.add_argument("--tau-end", type=float, default=0.2)
    parser.add_argument("--cali-data", type=str | None, default=None, help="default <run-dir>/q2b_data")
    parser.add_argument("--plot-every", type=int, default=5, help="epochs between training heatmaps")


def parse_options(text: str | None, state_options: list[int]) -> list[int]:
    from pipeline.stages.calibrate import parse_bits_list

    return sorted(parse_bits_list(text) or state_options)


def check(cfg, meta: dict) -> list[int]:
    """Everything cheap, before anything is loaded: returns Q2B's bit options."""
    from pipeline.qlip.q2b import check_target_fab
    from pipeline.qlip.sources import CRITERIA

    if cfg.criterion not in CRITERIA:
        raise ValueError(f"--criterion {cfg.criterion!r} is not available; choose one of {CRITERIA}")
    if cfg.relax not in ("gumbel", "ste"):
        raise ValueError(f"--relax {cfg.relax!r}: use 'gumbel' or 'ste'")
    if cfg.criterion == "t2q" and not cfg.t2q:
        raise ValueError("--criterion t2q needs --t2q (a T2Q folder written by `python -m pipeline.fit t2q`)")
    qcfg = meta["quant_config"]
    options = parse_options(cfg.bit_options, qcfg["a_bit_options"])
    lacking = [b for b in options if b not in qcfg["a_bit_options"]]
    if lacking:
        raise ValueError(f"--quant-state {cfg.quant_state} lacks the {lacking}-bit activation quantizers that Q2B "
                         f"may choose (it has {qcfg['a_bit_options']}); calibrate with --a-bit-options "
                         f"{','.join(map(str, sorted(set(options) | set(qcfg['a_bit_options']))))}")
    if len(options) < 2:
        raise ValueError(f"Q2B needs at least two bit options, got {options}")
    check_target_fab(cfg.target_fab, options)
    if qcfg["n_steps"] < 2:
        raise ValueError(f"--quant-state {cfg.quant_state} addresses a single step; calibrate with --steps > 1")
    return options


def run(cfg):
    import lightning as L
    import torch

    from callbacks.bit_allocation import BitAllocationCallback
    from pipeline.plots import plot_bit_heatmaps, plot_bit_shares
    from pipeline.calibration.data import CalibrationData, collect
    from data.prompts import load_prompts
    from pipeline.metrics.cost import fab_weights, layer_stats, weighted_fab
    from pipeline.models import load_pipeline
    from pipeline.qlip.q2b import Q2BModule, relative_link, save_q2b
    from pipeline.qlip.train import fit_q2b, spearman, training_items
    from pipeline.qlip.sources import quality_source
    from pipeline.models import quantize_pipeline
    from pipeline.quant import quant_layers
    from pipeline.quant.state import check_same_model, read_meta
    from pipeline.runs import prepare_artifact, write_manifest

    if not cfg.quant_state:
        raise ValueError("--quant-state is required: a calibrate output folder such as runs/x/quant")
    meta = read_meta(cfg.quant_state)
    options = check(cfg, meta)
    steps = meta["quant_config"]["n_steps"]
    out = prepare_artifact(cfg.run_dir, "q2b", cfg.overwrite)
    L.seed_everything(cfg.seed, verbose=False)
    t0 = time.time()
    pipe = load_pipeline(cfg.model, allow_download=cfg.allow_download)
    check_same_model(meta, pipe.unet, cfg.quant_state)

    # 1. quality of the training and validation prompts, and FP targets (FP UNet)
    prompts = load_prompts(cfg.prompts, limit=cfg.n, split="train", seed=cfg.seed)
    val = load_prompts(cfg.prompts, limit=cfg.val_n, split="val", seed=cfg.seed) if cfg.val_n else []
    source = quality_source(cfg.criterion, cfg.model, pipe, cfg.t2q, steps, cfg.guidance, cfg.allow_download)
    q_train = source.predict(prompts).float().cpu()
    q_val = source.predict(val).float().cpu() if val else torch.zeros(0)
    cali_dir = cfg.cali_data or str(Path(cfg.run_dir) / "q2b_data")
    collect(pipe, prompts, cali_dir, steps=steps, cali_st=steps, guidance=cfg.guidance, batch_size=cfg.batch_size,
            seed=cfg.seed, resolution=cfg.resolution)
    data = CalibrationData(cali_dir, pipe, steps=steps, guidance=cfg.guidance, resolution=cfg.resolution)
    items = training_items(pipe.unet, data, q_train)

    # 2. the quantized UNet, then Q2B
    quantize_pipeline(pipe, cfg.quant_state)
    layers = list(quant_layers(pipe.unet))
    q2b = Q2BModule(layers, steps, options, float(q_train.mean()), float(q_train.std()))
    fab_w = fab_weights(layer_stats(pipe.unet), layers)
    trainer_kwargs = {k: v for k, v in vars(cfg.trainer).items() if v is not None}
    module = fit_q2b(pipe.unet, q2b, items, fab_w, cfg.target_fab, cfg.guidance, epochs=cfg.epochs, seed=cfg.seed,
                     trainer_kwargs=trainer_kwargs,
                     callbacks=[BitAllocationCallback(q_train, out / "training", cfg.plot_every)],
                     kappa=cfg.kappa, lr=cfg.lr, dual_lr=cfg.dual_lr, rho=cfg.rho,
                     tau=(cfg.tau_start, cfg.tau_end), noise=cfg.relax == "gumbel")
    if not module.trainer.is_global_zero:
        return out

    # 3. what was learned, measured on the stored (fp16) module
    q2b = q2b.cpu()
    extra = {"model": cfg.model, "quant_state": relative_link(cfg.quant_state, out), "criterion": cfg.criterion,
             "t2q": relative_link(cfg.t2q, out), "steps": steps, "guidance": cfg.guidance, "target_fab": cfg.target_fab,
             "base_method": meta.get("extra", {}).get("method"), "w_bits": meta["quant_config"]["w_bits"],
             "hparams": {"kappa": cfg.kappa, "lr": cfg.lr, "dual_lr": cfg.dual_lr, "rho": cfg.rho,
                         "relax": cfg.relax, "tau": [cfg.tau_start, cfg.tau_end], "epochs": cfg.epochs}}
    save_q2b(q2b, out, extra)
    with torch.no_grad():
        train_tables = q2b(q_train)
        fab_train = weighted_fab(train_tables.double(), fab_w)
        metrics = {"fab_train": float(fab_train.mean()), "spearman_q_fab_train": spearman(q_train, fab_train),
                   "lambda": module.lam, "d_ref": module.d_ref, "memory_bytes": q2b.memory_bytes(),
                   "q2b_seconds": time.time() - t0, "n_train": len(prompts), "n_val": len(val)}
        shown = q_train
        if val:
            val_tables = q2b(q_val)
            fab_val = weighted_fab(val_tables.double(), fab_w)
            metrics.update({"fab_val": float(fab_val.mean()), "spearman_q_fab_val": spearman(q_val, fab_val)})
            plot_bit_shares(val_tables, layers, options, out / "bit_shares.png",
                            title=f"bit proportion per layer over {len(val)} validation prompts")
            shown = q_val
        qs = torch.quantile(shown, torch.tensor([0.1, 0.5, 0.9]))
        panels = {}
        for name, v in zip(("low", "median", "high"), qs):
            table = q2b(v.reshape(1))[0]
            panels[f"{name} q={float(v):.3g}, FAB {float(weighted_fab(table.double(), fab_w)):.2f}"] = table
        plot_bit_heatmaps(panels, layers, options, out / "bits_heatmap.png", title="Q2B bit allocation")
    write_manifest(out, "q2b", cfg, metrics, history=module.history)
    print(f"Q2B {options} -> {out}: FAB train {metrics['fab_train']:.2f} (target {cfg.target_fab}), "
          f"Spearman(q, FAB) train {metrics['spearman_q_fab_train']:.3f}"
          + (f", val FAB {metrics['fab_val']:.2f} Spearman {metrics['spearman_q_fab_val']:.3f}" if val else "")
          + f", {metrics['memory_bytes']} bytes, {metrics['q2b_seconds']:.0f} s")
    return out
