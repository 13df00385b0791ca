"""`python -m pipeline.fit sensitivity --quant-state runs/x/quant`: MixDQ's metric-decoupled layer sensitivity.

Per quantized layer and candidate bit-width, only that layer is quantized (weights or input activations) and
the rest runs in full precision; SSIM of the final image to the FP image and SQNR of the UNet output are both
stored for every layer (pipeline/mixdq/sensitivity.py). Writes <run-dir>/sensitivity/{sensitivity.json,
table.md, heatmap.png, manifest.json}; progress in <run-dir>/sensitivity_progress (rerun to resume).
One process measures every layer (sharding across processes is not built yet)."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data.prompts import draw_prompts, parse_fractions
from pipeline.artifacts import (
    ARTIFACTS,
    PROGRESS,
    prepare_artifact,
    write_json_atomic,
    write_manifest,
    write_text_atomic,
)
from pipeline.engine import StageConfig, check_flags, stage_device
from pipeline.mixdq.groups import layer_groups
from pipeline.mixdq.sensitivity import (
    SENSITIVITY_FILE,
    SENSITIVITY_FORMAT,
    Probe,
    check_candidates,
    layer_sizes,
    measure_sensitivity,
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
    draw = draw_prompts(cfg.prompts, "train", cfg.n, parse_fractions(cfg.split_fractions), seed=cfg.seed)
    device = stage_device(trainer)
    pipe = load_quantized_pipeline(cfg.model, cfg.quant_state, **cfg.load_options()).to(device)
    check_candidates(pipe.unet, w_opts, a_opts)
    extra = meta.get("extra", {})
    sampling = sampling_defaults(pipe, cfg.steps or extra.get("steps"), cfg.guidance if cfg.guidance is not None
                                 else extra.get("guidance"))
    if qc["n_steps"] > 1 and qc["n_steps"] != sampling.steps:
        raise ValueError(f"--steps {sampling.steps} differs from the {qc['n_steps']} steps the state was calibrated "
                         f"for; pass --steps {qc['n_steps']}")
    probe = Probe(draw.prompts, prompt_seeds(cfg.seed, 0, len(draw.prompts)), sampling.steps, sampling.guidance)
    signature = {"format": SENSITIVITY_FORMAT, "model": meta["model"]["weights_sha256"],
                 "quant_state": meta["sha256"], "quant_config": qc, "prompts": probe.prompts, "seeds": probe.seeds,
                 "steps": probe.steps, "guidance": probe.guidance, "w_bits": w_opts, "a_bits": a_opts,
                 "layers": names, "scheduler": sampling.scheduler}
    out = prepare_artifact(cfg.run_dir, ARTIFACTS["sensitivity"], cfg.overwrite, cfg.fresh)
    progress = Path(cfg.run_dir) / PROGRESS["sensitivity"][0] / "progress.json"
    progress.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with torch.no_grad():
        rec = measure_sensitivity(pipe, probe, w_opts, a_opts, progress, signature, discard_stale=cfg.overwrite,
                                  layers=names, batch_size=cfg.batch_size)
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

