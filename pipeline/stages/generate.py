"""`python -m pipeline.fit generate`: images from the FP, a quantized, or a
text-aware (QLIP: `--q2b runs/x/q2b`) UNet, or from a deployable integer
artifact on the real kernels (`--deployed runs/x/deploy`, the export stage's
output; text-aware where it was exported with --q2b).

Writes <run-dir>/<name>/{images/*.png, grid.png, manifest.json}; with --q2b
also bits.json (per batch: prompts, q, per-prompt and batch FAB, option
shares), bits.safetensors (each batch's [layers, steps] bit table),
bits_heatmap.png and bit_shares.png."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from data.prompts import draw_prompts
from pipeline.artifacts import ARTIFACTS, prepare_artifact, read_artifact_meta, write_manifest
from pipeline.deploy import attach, check_backend, load_qlip, read_deploy_meta
from pipeline.deploy.artifact import check_runtime
from pipeline.engine import StageConfig, check_flags, fp_autocast, fp_pass_dtype, stage_device
from pipeline.errors import UserError
from pipeline.models import load_pipeline, load_quantized_pipeline, sampling_defaults
from pipeline.plots import save_grid, save_images
from pipeline.qlip.pipeline import QLIPPipeline, check_deployed_sampler, log_batch, write_bits
from pipeline.qlip.q2b import read_q2b_meta
from pipeline.qlip.t2q import T2Q_FORMAT
from pipeline.quant.state import read_meta
from pipeline.sampling import generate as sample


@dataclass
class GenerateConfig(StageConfig):
    """Settings of the generate stage."""

    prompts: str = "world"
    """prompt source: world[:train|val|test|unseen] | builtin | coco:FILE.json|NAME | cc:FILE.tsv |
    parti:FILE.tsv | sd-prompts[:FILE] | FILE.txt|.jsonl|.json|.tsv|.csv|.parquet, split by the SHA-1 of each
    prompt into train/val/test (docs/prompts.md); this stage takes the first --n prompts of the whole source,
    unsplit (bare 'world': its val scenes)"""
    n: int = 8
    """number of prompts"""
    quant_state: str | None = None
    """a calibrate output folder (with --q2b: overrides the state it was trained on)"""
    q2b: str | None = None
    """a q2b output folder: text-aware bits (QLIP)"""
    t2q: str | None = None
    """with --q2b: a T2Q folder other than its own"""
    deployed: str | None = None
    """an export output folder (e.g. runs/x/deploy): generate on its integer weights and int8 kernels, without
    the FP UNet's weights; text-aware bits where it was exported with --q2b (docs/deploy.md)"""
    backend: str = "onednn"
    """with --deployed: onednn (CPU int8 kernels) | reference (pure PyTorch integer emulation) | gpu (torchao)"""
    runtime: str = "fp32"
    """with --deployed: fp32 (the fake-quant model's arithmetic) | bf16 (everything but the int8 calls in bf16;
    faster on CPUs with bf16 units)"""
    steps: int | None = None
    """sampling steps (default: the model's, pipeline.models.sampling_defaults)"""
    guidance: float | None = None
    """classifier-free guidance scale (default: the model's)"""
    resolution: int | None = None
    """pixels (default: the model's)"""
    batch_size: int = 8
    """prompts per batch (with --q2b a batch runs the max bits of its prompts)"""
    name: str = ARTIFACTS["generate"]
    """output folder inside --run-dir"""


def check_deployed(cfg: GenerateConfig, trainer: dict | None, device) -> dict | None:
    """The --deployed flags against each other and this machine, before anything loads; its deploy.json."""
    if not cfg.deployed:
        return None
    if cfg.quant_state or cfg.q2b or cfg.t2q:
        raise UserError(f"--deployed {cfg.deployed} holds its own quantized UNet (and Q2B tables, where exported with "
                        f"--q2b): leave out --quant-state, --q2b and --t2q")
    check_backend(cfg.backend)
    check_runtime(cfg.backend, cfg.runtime, flag="--runtime ")
    if fp_pass_dtype(trainer) is not None:
        raise UserError(f"--trainer.precision {trainer['precision']!r} with --deployed: the deployed runtime sets its "
                        f"own precision; use --runtime bf16")
    if cfg.backend == "onednn" and device.type != "cpu":
        raise UserError(f"--backend onednn runs on the CPU, not {device.type}: pass --trainer.accelerator cpu, "
                        f"or --backend gpu")
    if cfg.backend == "gpu" and device.type != "cuda":
        raise UserError(f"--backend gpu runs on CUDA, not {device.type}: pass --trainer.accelerator gpu")
    return read_deploy_meta(cfg.deployed, "--deployed")


def generate(cfg: GenerateConfig, trainer: dict | None = None) -> Path:
    check_flags(cfg)  # before anything loads or is written
    device = stage_device(trainer)  # only --trainer.accelerator / devices / precision matter here
    deployed = check_deployed(cfg, trainer, device)
    # a bad folder fails now, before the model loads, naming its flag (each is read again as it loads)
    if cfg.quant_state:
        read_meta(cfg.quant_state, "--quant-state")
    if cfg.q2b:
        read_q2b_meta(cfg.q2b, "--q2b", deployed=True)
    if cfg.t2q:
        read_artifact_meta(cfg.t2q, T2Q_FORMAT, "--t2q")
    draw = draw_prompts(cfg.prompts, None, cfg.n, seed=cfg.seed, world_split="val")
    prompts = draw.prompts
    qlip = None
    if deployed and deployed.get("qlip"):  # the artifact's own Q2B tables and T2Q head
        qlip = load_qlip(cfg.deployed, load_pipeline(cfg.model, **cfg.load_options(), unet_weights=False), cfg.backend,
                         model=cfg.model, dtype=cfg.runtime)
        pipe = qlip.to(device).pipe
    elif deployed:
        pipe = attach(load_pipeline(cfg.model, **cfg.load_options(), unet_weights=False), cfg.deployed, cfg.backend,
                      dtype=cfg.runtime).to(device)
    elif cfg.q2b:
        qlip = QLIPPipeline.from_pretrained(cfg.q2b, model=cfg.model, quant_state=cfg.quant_state, t2q=cfg.t2q,
                                            load=cfg.load_options())
        pipe = qlip.to(device).pipe
    else:
        pipe = load_quantized_pipeline(cfg.model, cfg.quant_state, **cfg.load_options()).to(device)
    sampling = sampling_defaults(pipe, cfg.steps, cfg.guidance, cfg.resolution)
    n_steps = pipe.unet.quant_config.n_steps if getattr(pipe.unet, "quant_config", None) is not None else 1
    if n_steps > 1 and n_steps != sampling.steps:
        raise ValueError(f"--steps {sampling.steps} ({sampling.origin['steps']}) differs from the {n_steps} steps "
                         f"the quantized state was calibrated for; pass --steps {n_steps}")
    if qlip is not None:
        check_deployed_sampler(qlip.q2b.meta, cfg.q2b or cfg.deployed, sampling.sampler(),
                               "generate (--guidance, --scheduler)")
    out = prepare_artifact(cfg.run_dir, cfg.name, cfg.overwrite, cfg.fresh)
    seeds = [cfg.seed + i for i in range(len(prompts))]
    summary = None
    t0 = time.perf_counter()
    with fp_autocast(trainer, device):  # the quantized layers compute in fp32 inside it
        if qlip is None:
            images = sample(pipe, prompts, seeds, steps=sampling.steps, guidance=sampling.guidance,
                            batch_size=cfg.batch_size, resolution=sampling.resolution)
        else:
            result = qlip(prompts, seeds, batch_size=cfg.batch_size, guidance=sampling.guidance, on_batch=log_batch)
            images = result.images
    seconds = time.perf_counter() - t0
    if qlip is not None:
        summary = write_bits(out, result, qlip)
    runtime = {"seconds_per_image": seconds / len(prompts)}
    if deployed:
        runtime.update(deployed=str(Path(cfg.deployed).resolve()), backend=cfg.backend, runtime=cfg.runtime)
    save_images(images, out / "images")
    save_grid([images], out / "grid.png", scale=4 if images.shape[1] <= 64 else 1)
    write_manifest(out, "generate", cfg, summary, prompts=prompts, seeds=seeds, sampling=sampling.as_dict(),
                   prompt_split=draw.describe(), runtime=runtime)
    print(f"{len(images)} images -> {out}")
    return out
