"""`python -m pipeline.fit q2b`: train Q2B on a calibrated quantized state.

Reads a calibrate output (`--quant-state`, whose a_bit_options hold every
option Q2B may choose) and a quality source (`--criterion t2q --t2q runs/x/t2q`,
or `length` / `complexity` for the Table S3 ablation). Writes
<run-dir>/q2b/{q2b.safetensors, q2b.json, manifest.json, bits_heatmap.png,
bit_shares.png, training/bits_epoch*.png}; the calibration data (every step of
the training prompts' FP trajectories) goes to <run-dir>/q2b_data, and a checkpoint after every
epoch to <run-dir>/q2b_progress: a rerun after a kill resumes from it (docs/reliability.md).
See docs/q2b.md."""
from __future__ import annotations

import copy
import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L

from callbacks.bit_allocation import BitAllocationCallback
from callbacks.evaluation import PairedEvaluationCallback
from data.prompts import draw_prompts, parse_fractions
from pipeline.artifacts import ARTIFACTS, prepare_artifact, read_artifact_meta, refuse_existing_results, write_manifest
from pipeline.engine import StageConfig, check_flags, stage_device
from pipeline.errors import UserError
from pipeline.models import load_pipeline, sampling_defaults
from pipeline.qlip.monitor import EVAL_MONITORS, PairedValidation
from pipeline.qlip.q2b import relative_link, save_q2b
from pipeline.qlip.recipe import measure_q2b, q2b_options, train_q2b_on_state
from pipeline.qlip.scoring import check_same_sampler, t2q_sampler
from pipeline.qlip.sources import quality_source
from pipeline.qlip.t2q import T2Q_FORMAT
from pipeline.quant.state import check_same_model, read_meta
from pipeline.shards import DEFAULT_RAM_CAP_GIB, process_share


@dataclass
class Q2BConfig(StageConfig):
    """Settings of the q2b stage."""

    quant_state: str | None = None
    """a calibrate output folder (e.g. runs/x/quant)"""
    criterion: str = "t2q"
    """quality source: t2q | length | complexity | text-blind (q constant: a static table, the control of
    text-awareness)"""
    t2q: str | None = None
    """T2Q folder (criterion t2q), e.g. runs/x/t2q"""
    bit_options: str | None = None
    """activation bits Q2B chooses from, e.g. 8,16,32 (default: the state's options)"""
    target_fab: float = 12.0
    """FAB the bit cost is steered to"""
    prompts: str = "world"
    """prompt source: world[:train|val|test|unseen] | builtin | coco:FILE.json|NAME | cc:FILE.tsv |
    parti:FILE.tsv | sd-prompts[:FILE] | FILE.txt|.jsonl|.json|.tsv|.csv|.parquet, split by the SHA-1 of each
    prompt into train/val/test (--split-fractions; docs/prompts.md); this stage trains on train and validates on
    val"""
    split_fractions: str = "0.8,0.1,0.1"
    """train,val,test fractions of the hashed prompt split (use the same in every stage of a run)"""
    n: int = 64
    """training prompts (train split)"""
    val_n: int = 64
    """validation prompts (val split) for Spearman(q, FAB)"""
    guidance: float | None = None
    """classifier-free guidance scale (default: the model's, pipeline.models.sampling_defaults); the steps are
    the quantized state's"""
    batch_size: int = 8
    """prompts per training item"""
    resolution: int | None = None
    """pixels (default: the model's)"""
    epochs: int = 20
    """training epochs"""
    lr: float = 0.05
    """Adam learning rate of the Q2B tables"""
    dual_lr: float = 0.3
    """step of the FAB dual variable (integral term)"""
    rho: float = 10.0
    """quadratic penalty of the FAB gap (proportional term)"""
    kappa: float = 1.0
    """w(q) = exp(kappa * standardized q)"""
    relax: str = "gumbel"
    """gumbel (sampled) | ste (deterministic)"""
    tau_start: float = 1.0
    """Gumbel temperature at the start"""
    tau_end: float = 0.2
    """Gumbel temperature at the end"""
    cali_data: str | None = None
    """calibration-data folder (default <run-dir>/q2b_data)"""
    plot_every: int = 5
    """epochs between training heatmaps"""
    ram_cap_gib: float = DEFAULT_RAM_CAP_GIB
    """GiB of training items (prompt batches with FP targets) kept in RAM; the rest go to disk shards in
    <run-dir>/q2b_items (same result, slower)"""
    eval_every: int = 0
    """epochs between paired evaluations while training (0: off): the first --eval-n val prompts generated with
    the current Q2B, PSNR/SSIM to their FP images with 95% intervals and FAB, logged and written to
    <run-dir>/q2b/evaluation/evaluation.json; the best checkpoint by --eval-monitor goes to evaluation/best"""
    eval_n: int = 8
    """val prompts of the paired evaluation (--eval-every)"""
    eval_monitor: str = "psnr"
    """what the evaluation's best checkpoint is chosen by: psnr | ssim (higher is better)"""


def q2b(cfg: Q2BConfig, trainer: dict | None = None) -> Path:
    check_flags(cfg)  # before anything loads or is written
    if not cfg.quant_state:
        raise UserError("--quant-state is required: a calibrate output folder such as runs/x/quant")
    if cfg.eval_every and not cfg.val_n:
        raise UserError(f"--eval-every {cfg.eval_every} evaluates on val prompts, but --val-n is 0; pass --val-n "
                        f"(e.g. 64) or --eval-every 0")
    if cfg.eval_monitor not in EVAL_MONITORS:
        raise ValueError(f"--eval-monitor {cfg.eval_monitor!r}: choose one of {EVAL_MONITORS}")
    refuse_existing_results(Path(cfg.run_dir) / ARTIFACTS["q2b"], cfg.overwrite or cfg.fresh)  # before the model loads
    meta = read_meta(cfg.quant_state, "--quant-state")
    options = q2b_options(meta, cfg.quant_state, cfg.bit_options, cfg.criterion, cfg.t2q, cfg.relax, cfg.target_fab)
    t2q_meta = read_artifact_meta(cfg.t2q, T2Q_FORMAT, "--t2q") if cfg.criterion == "t2q" else None
    fractions = parse_fractions(cfg.split_fractions)
    train_draw = draw_prompts(cfg.prompts, "train", cfg.n, fractions, seed=cfg.seed)
    val_draw = draw_prompts(cfg.prompts, "val", cfg.val_n, fractions, seed=cfg.seed) if cfg.val_n else None
    prompts, val = train_draw.prompts, (val_draw.prompts if val_draw else [])
    L.seed_everything(cfg.seed, verbose=False)
    t0 = time.time()
    device = stage_device(trainer)
    pipe = load_pipeline(cfg.model, **cfg.load_options()).to(device)
    check_same_model(meta, pipe.unet, cfg.quant_state)
    sampling = sampling_defaults(pipe, meta["quant_config"]["n_steps"], cfg.guidance, cfg.resolution)
    steps = sampling.steps
    # the T2Q predicts the quality of its scored set's sampler: it must be the one deployed
    scored = t2q_sampler(t2q_meta) if t2q_meta is not None else None
    if scored is not None:
        check_same_sampler(scored, sampling.sampler(), f"the scored set of --t2q {cfg.t2q}",
                           f"q2b (the state {cfg.quant_state}'s steps, --guidance, --scheduler)")
    out = prepare_artifact(cfg.run_dir, ARTIFACTS["q2b"], cfg.overwrite, cfg.fresh)  # after the model's checks
    progress_dir = Path(cfg.run_dir) / "q2b_progress"
    source = quality_source(cfg.criterion, cfg.model, pipe, cfg.t2q, steps, sampling.guidance, cfg.load_options())
    if hasattr(source, "to"):  # T2Q's text tower
        source.to(device)
    hparams = {"kappa": cfg.kappa, "lr": cfg.lr, "dual_lr": cfg.dual_lr, "rho": cfg.rho}
    # what a resumed training must share with the killed one (its epoch checkpoint is refused otherwise)
    signature = {"model": cfg.model, "unet_sha256": meta["model"]["weights_sha256"],
                 "quant_state_sha256": meta["sha256"], "criterion": cfg.criterion,
                 "t2q_sha256": t2q_meta["sha256"] if t2q_meta else None, "options": options,
                 "target_fab": cfg.target_fab, "prompts_sha1": hashlib.sha1("\n".join(prompts).encode()).hexdigest(),
                 "batch_size": cfg.batch_size, "sampler": sampling.sampler(), "resolution": sampling.resolution,
                 "seed": cfg.seed, "relax": cfg.relax, "tau": [cfg.tau_start, cfg.tau_end],
                 "world_size": process_share(trainer)[1], **hparams}
    def deployed(folder: Path) -> dict:  # what q2b.json records, so that a folder deploys on its own
        return {"model": cfg.model, "quant_state": relative_link(cfg.quant_state, folder), "criterion": cfg.criterion,
                "t2q": relative_link(cfg.t2q, folder), "steps": steps, "guidance": sampling.guidance,
                "sampler": sampling.sampler(), "target_fab": cfg.target_fab,
                "base_method": meta.get("extra", {}).get("method"), "w_bits": meta["quant_config"]["w_bits"],
                "hparams": {**hparams, "relax": cfg.relax, "tau": [cfg.tau_start, cfg.tau_end], "epochs": cfg.epochs}}

    evaluation, validation = None, None
    if cfg.eval_every:  # paired quality to FP on fixed val prompts while training (off by default)
        validation = PairedValidation(val[:cfg.eval_n], steps, sampling.guidance, cfg.seed)
        evaluation = PairedEvaluationCallback(
            lambda m: validation.measure_qlip(pipe, m.q2b, source), out / "evaluation", cfg.eval_every,
            cfg.eval_monitor, "max",
            save=lambda m, folder, record: save_q2b(copy.deepcopy(m.q2b).cpu(), folder,
                                                    {**deployed(folder), "evaluation": record}))
    module, training, q_train, q_val, fab_w = train_q2b_on_state(
        pipe, cfg.quant_state, options, source, prompts, val, steps=steps, guidance=sampling.guidance,
        batch_size=cfg.batch_size, resolution=sampling.resolution,
        cali_dir=cfg.cali_data or Path(cfg.run_dir) / "q2b_data",
        target_fab=cfg.target_fab, epochs=cfg.epochs, seed=cfg.seed, trainer=trainer,
        callbacks=lambda q: [BitAllocationCallback(q, progress_dir / "training", cfg.plot_every)]
        + ([evaluation] if evaluation else []),
        tau=(cfg.tau_start, cfg.tau_end), noise=cfg.relax == "gumbel", ram_cap_gib=cfg.ram_cap_gib,
        spill_dir=Path(cfg.run_dir) / "q2b_items", before_quantize=validation.record_fp if validation else None,
        progress={"folder": progress_dir, "signature": signature, "discard_stale": cfg.overwrite}, **hparams)
    if not training.trainer.is_global_zero:
        return out
    module = module.cpu()
    if (progress_dir / "training").is_dir():  # the heatmaps drawn while training, resumed or not
        shutil.copytree(progress_dir / "training", out / "training", dirs_exist_ok=True)
    save_q2b(module, out, deployed(out))
    metrics = {**measure_q2b(module, q_train, q_val, fab_w, out), "lambda": training.lam, "d_ref": training.d_ref,
               "memory_bytes": module.memory_bytes(), "q2b_seconds": time.time() - t0, "n_train": len(prompts),
               "n_val": len(val)}
    if evaluation is not None:
        metrics["evaluation"] = {**evaluation.summary(), "split": validation.describe()}
    write_manifest(out, "q2b", cfg, metrics, history=training.history, sampling=sampling.as_dict(),
                   prompt_split={"train": train_draw.describe(), "val": val_draw.describe() if val_draw else None})
    print(f"Q2B {options} -> {out}: FAB train {metrics['fab_train']:.2f} (target {cfg.target_fab}), "
          f"Spearman(q, FAB) train {metrics['spearman_q_fab_train']:.3f}"
          + (f", val FAB {metrics['fab_val']:.2f} Spearman {metrics['spearman_q_fab_val']:.3f}" if val else "")
          + f", {metrics['memory_bytes']} bytes, {metrics['q2b_seconds']:.0f} s")
    return out
