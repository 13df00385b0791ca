"""`python -m pipeline.fit sensitivity --quant-state runs/x/quant`: MixDQ's metric-decoupled layer sensitivity.

Per quantized layer and candidate bit-width, only that layer is quantized (weights or input activations) and
the rest runs in full precision; SSIM of the final image to the FP image and SQNR of the UNet output are both
stored for every layer (pipeline/mixdq/sensitivity.py). Writes <run-dir>/sensitivity/{sensitivity.json,
table.md, heatmap.png, manifest.json}.

Under `--trainer.strategy ddp --trainer.devices N` the layers are dealt to the N processes (layer i to process
i mod N, one predict batch each); each process keeps its own progress file, <run-dir>/sensitivity_progress/
progress_rank<r>.json, and skips a layer any process's progress already holds, so a rerun resumes under any
number of processes. After a barrier, rank 0 merges the files and writes the artifact: the same file as one
process writes (every process builds the same FP reference; a layer's scores depend on nothing else)."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from data.prompts import dealt_loader, draw_prompts, parse_fractions
from pipeline.artifacts import (
    ARTIFACTS,
    PROGRESS,
    prepare_artifact,
    write_json_atomic,
    write_manifest,
    write_text_atomic,
)
from pipeline.engine import NON_NEGATIVE, StageConfig, check_flags, is_global_zero, make_trainer, stage_device
from pipeline.mixdq.groups import layer_groups
from pipeline.mixdq.sensitivity import (
    SENSITIVITY_FILE,
    SENSITIVITY_FORMAT,
    LayerShard,
    Probe,
    candidates,
    check_candidates,
    check_progress_folder,
    layer_sizes,
    measured_so_far,
    sensitivity_table,
)
from pipeline.models import load_quantized_pipeline, sampling_defaults
from pipeline.plots import plot_sensitivity
from pipeline.quant.config import parse_bits
from pipeline.quant.state import read_meta
from pipeline.sampling import prompt_seeds


@dataclass
class SensitivityConfig(StageConfig):
    """Settings of the sensitivity stage."""

    quant_state: str | None = None
    """a calibrate output folder whose layers carry every candidate (calibrate --w-bit-options 2,4,8
    --a-bit-options 4,8,16)"""
    prompts: str = "world"
    """prompt source (as calibrate's); the probe prompts are drawn from its train split"""
    split_fractions: str = "0.8,0.1,0.1"
    """train,val,test fractions of the hashed prompt split (use the same in every stage of a run)"""
    n: int = 4
    """probe prompts (each with a seed fixed by --seed); MixDQ averages over 32"""
    probe_set: int = 0
    """which block of --n train prompts and noise seeds probes: block k is prompts k*n..(k+1)*n-1 of the draw,
    disjoint from every other block (two blocks measure how well the ranking carries over to other prompts:
    pipeline.mixdq.sensitivity.probe_agreement)"""
    w_bit_options: str | None = None
    """weight bits to measure, e.g. 2,4,8 (default: the state's weight options below 32)"""
    a_bit_options: str | None = None
    """activation bits to measure, e.g. 4,8 (default: the state's activation options below 32)"""
    layers: str | None = None
    """regex: measure only the layers it matches (default: every quantized layer); mixdq keeps the others at
    the state's bits"""
    content_regex: str | None = None
    """regex naming the content layers (default: cross-attention attn2 and feed-forward ff; the rest are quality
    layers)"""
    steps: int | None = None
    """sampling steps (default: the state's)"""
    guidance: float | None = None
    """classifier-free guidance scale (default: the state's)"""
    batch_size: int = 8
    """probe prompts per generation batch"""
    flag_ranges: ClassVar = {"probe_set": NON_NEGATIVE}


def sensitivity(cfg: SensitivityConfig, trainer: dict | None = None) -> Path:
    check_flags(cfg)
    if not cfg.quant_state:
        raise ValueError("--quant-state is required: a calibrate output folder such as runs/x/quant")
    meta = read_meta(cfg.quant_state, "--quant-state")
    qc = meta["quant_config"]
    w_opts = parse_bits(cfg.w_bit_options, "--w-bit-options") or [b for b in qc.get("w_bit_options",
                                                                                   [qc["w_bits"]]) if b < 32]
    a_opts = parse_bits(cfg.a_bit_options, "--a-bit-options") or [b for b in qc["a_bit_options"] if b < 32]
    if cfg.layers:
        try:
            rule = re.compile(cfg.layers)
        except re.error as e:
            raise ValueError(f"--layers {cfg.layers!r} is not a valid regular expression ({e})") from None
        names = [n for n in meta["layers"] if rule.search(n)]
        if not names:
            raise ValueError(f"--layers {cfg.layers!r} matches none of the state's {len(meta['layers'])} layers")
    else:
        names = list(meta["layers"])
    groups = layer_groups(names, cfg.content_regex)  # a rule leaving a group empty fails before anything loads
    fitter = make_trainer(trainer, progress=True, forced={"use_distributed_sampler": False, "inference_mode": False})
    if fitter.world_size > len(names):  # a process without a layer would never reach the loop's barrier
        raise ValueError(f"{len(names)} layers for {fitter.world_size} processes: every process needs at least one; "
                         f"measure more layers (--layers) or use fewer --trainer.devices")
    first = cfg.probe_set * cfg.n
    draw = draw_prompts(cfg.prompts, "train", first + cfg.n, parse_fractions(cfg.split_fractions), seed=cfg.seed)
    if len(draw.prompts) < first + cfg.n:  # a short block would overlap no other, but would not have --n prompts
        raise ValueError(f"--probe-set {cfg.probe_set} needs train prompts {first}..{first + cfg.n - 1} of "
                         f"--prompts {cfg.prompts}, which has {len(draw.prompts)}; use a lower --probe-set or --n")
    prompts = draw.prompts[first:]
    device = stage_device(trainer)
    pipe = load_quantized_pipeline(cfg.model, cfg.quant_state, **cfg.load_options()).to(device)
    check_candidates(pipe.unet, w_opts, a_opts)
    extra = meta.get("extra", {})
    sampling = sampling_defaults(pipe, cfg.steps or extra.get("steps"), cfg.guidance if cfg.guidance is not None
                                 else extra.get("guidance"))
    if qc["n_steps"] > 1 and qc["n_steps"] != sampling.steps:
        raise ValueError(f"--steps {sampling.steps} differs from the {qc['n_steps']} steps the state was calibrated "
                         f"for; pass --steps {qc['n_steps']}")
    probe = Probe(prompts, prompt_seeds(cfg.seed, first, cfg.n), sampling.steps, sampling.guidance)
    signature = {"format": SENSITIVITY_FORMAT, "model": meta["model"]["weights_sha256"],
                 "quant_state": meta["sha256"], "quant_config": qc, "prompts": probe.prompts, "seeds": probe.seeds,
                 "steps": probe.steps, "guidance": probe.guidance, "w_bits": w_opts, "a_bits": a_opts,
                 "layers": names, "scheduler": sampling.scheduler}
    out = prepare_artifact(cfg.run_dir, ARTIFACTS["sensitivity"], cfg.overwrite, cfg.fresh)
    progress = Path(cfg.run_dir) / PROGRESS["sensitivity"][0]
    if is_global_zero():  # the one process that refuses (or, under --overwrite, discards) other settings' progress
        check_progress_folder(progress, signature, discard_stale=cfg.overwrite)
    progress.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    shard = LayerShard(pipe, probe, w_opts, a_opts, progress, signature, cfg.batch_size)
    fitter.predict(shard, dataloaders=dealt_loader(names, fitter), return_predictions=False)
    fitter.strategy.barrier()  # every process's last layer is on disk before rank 0 merges
    if not fitter.is_global_zero:
        return out
    done = measured_so_far(progress, signature)
    missing = [n for n in names if n not in done["ssim"]]
    if missing:
        raise RuntimeError(f"{len(missing)} layers have no measurement in {progress} after every process finished "
                           f"({', '.join(missing[:3])}); run the same command again to measure them")
    rec = {"layers": names, "candidates": [f"{k}{b}" for k, b in candidates(w_opts, a_opts)],
           "ssim": {n: done["ssim"][n] for n in names}, "sqnr": {n: done["sqnr"][n] for n in names}}
    seconds = time.time() - t0
    stats = layer_sizes(pipe.unet)
    record = {"format": SENSITIVITY_FORMAT, "signature": signature, **rec, "groups": groups, **stats,
              "quant_state_path": str(cfg.quant_state), "seconds": seconds}
    write_json_atomic(out / SENSITIVITY_FILE, record)
    write_text_atomic(out / "table.md", sensitivity_table(record))
    plot_sensitivity(record, out / "heatmap.png", title=f"MixDQ sensitivity, {len(names)} layers")
    write_manifest(out, "sensitivity", cfg, {"seconds": seconds, "layers": len(names),
                                             "measurements": len(names) * len(rec["candidates"])},
                   sampling=sampling.as_dict(), prompt_split=draw.describe())
    print(f"sensitivity of {len(names)} layers x {len(rec['candidates'])} candidates in {seconds:.1f} s -> {out}")
    return out

