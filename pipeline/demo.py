"""`python -m pipeline.fit demo`: the README's main job, the whole QLIP chain on one model.

A workflow over the stage functions, each run into its own folder of --run-dir:

  naive_w8a8/, naive_w4a8/,  calibrate --method naive (the PTQ floor;
  naive_w4a16/               W4A16 is Q-Diffusion's direct baseline)
  qdiff/                     calibrate --method qdiff at W4A16 with activation banks {8,16,32}
  scored/                    score: FP images of world prompts, GIQA against the world's renders
  t2q/                       t2q: text -> predicted quality
  qlip/                      q2b: predicted quality -> layer- and step-wise activation bits
  naive_w8a8/deploy/,        export: naive W8A8 and Q-Diffusion+QLIP (with its Q2B tables and T2Q head)
  qlip/deploy/               as integer artifacts for the oneDNN int8 kernels
  evaluate/                  evaluate: FP, naive, Q-Diffusion and Q-Diffusion+QLIP on held-out prompts
  demo/                      report.md: the evaluation table, real-kernel s/image beside fake-quant, the bits
                             QLIP chose, grids

Sizes are small so that the chain runs in minutes on a laptop CPU; every size
is a flag. Without --overwrite, a rerun resumes: finished steps are kept, and
an interrupted step continues from its own progress (calibrate's units, score's
shards, Q2B's last epoch, evaluate's finished passes; docs/reliability.md).
With --overwrite true every step is recomputed, reusing the progress each stage
keeps under the same settings; --fresh true discards that too."""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from data.prompts import draw_prompts
from pipeline.artifacts import (
    ARTIFACTS,
    lock_run_dir,
    prepare_artifact,
    write_json_atomic,
    write_manifest,
    write_text_atomic,
)
from pipeline.deploy import DEPLOY, attach
from pipeline.deploy.backends import onednn_missing
from pipeline.deploy.qlip import load_qlip
from pipeline.deploy.timing import compare_generation
from pipeline.engine import StageConfig, check_flags
from pipeline.errors import RunDirError
from pipeline.metrics.frechet import min_images
from pipeline.metrics.inception import POOL_DIMS
from pipeline.models import EMBEDDED, TINY_RANDOM, load_pipeline, load_quantized_pipeline, sampling_defaults
from pipeline.qlip.pipeline import QLIPPipeline
from pipeline.sampling import generate
from pipeline.stages.calibrate import CalibrateConfig, calibrate
from pipeline.stages.evaluate import EvaluateConfig, evaluate
from pipeline.stages.export import ExportConfig, export
from pipeline.stages.q2b import Q2BConfig, q2b
from pipeline.stages.score import ScoreConfig, score
from pipeline.stages.t2q import T2QConfig, t2q

STEPS = ("naive_w8a8", "naive_w4a8", "naive_w4a16", "qdiff", "scored", "t2q", "qlip", "export", "evaluate", "demo")
# the methods the demo deploys on the int8 kernels: the static W8A8 floor and QLIP's text-aware table (its
# artifact holds the Q2B tables and T2Q head); folder -> the run dir its artifact goes to
DEPLOYED = {"naive-W8A8": "naive_w8a8", "Q-Diffusion+QLIP": "qlip"}
PASSED_ON = ("accelerator", "devices", "strategy", "num_nodes", "precision")  # trainer flags every step gets


@dataclass
class DemoConfig(StageConfig):
    """Settings of the demo."""

    n: int = 80
    """evaluation prompts (world val split); FID to FP needs at least 65"""
    cali_n: int = 16
    """calibration prompts"""
    score_n: int = 240
    """prompts scored for T2Q (train + val)"""
    q2b_n: int = 16
    """Q2B training prompts"""
    q2b_epochs: int = 8
    """Q2B training epochs"""
    target_fab: float = 12.0
    """Q2B's target FAB (W4A16 base: 16)"""
    iters_w: int = 300
    """AdaRound iterations per block (paper: 20000)"""
    iters_a: int = 20
    """activation step-size iterations per block"""
    steps: int = 20
    """sampling steps"""
    eval_batch: int = 4
    """evaluation batch (a batch runs its max bits)"""
    deploy_n: int = 4
    """images per deployed method (naive W8A8, Q-Diffusion+QLIP) timed on the oneDNN int8 kernels beside
    fake-quant (0: no export, no timing)"""


def demo(cfg: DemoConfig, trainer: dict | None = None) -> Path:
    check_flags(cfg)  # before anything loads or is written
    root = Path(cfg.run_dir)
    lock_run_dir(root, "demo")  # before any step folder is reused or deleted
    if (root / "demo" / "manifest.json").is_file() and not (cfg.overwrite or cfg.fresh):
        raise RunDirError(f"{root / 'demo'} already holds a report; pass --overwrite true to recompute every step, "
                          f"or choose another --run-dir")
    world = cfg.model == EMBEDDED
    passed = {k: v for k, v in (trainer or {}).items() if k in PASSED_ON}
    common = {"model": cfg.model, "seed": cfg.seed, "allow_download": cfg.allow_download, "scheduler": cfg.scheduler,
              "allow_pickle": cfg.allow_pickle, "overwrite": cfg.overwrite, "fresh": cfg.fresh}
    prompts = "world" if world else "builtin"
    timings = {}

    def step(folder: str, label: str, stage: str, fn, config, uses_trainer: bool = True) -> Path:
        """Run one stage into root/folder unless its artifact is there (then reuse it: resume; with
        --overwrite the stage replaces it, keeping its progress)."""
        artifact = root / folder / ARTIFACTS[stage]
        if (artifact / "manifest.json").is_file() and not (cfg.overwrite or cfg.fresh):
            print(f"[demo] {label}: reusing {root / folder}", flush=True)
            return artifact
        print(f"[demo] {label} ...", flush=True)
        t0 = time.time()
        config.run_dir = str(root / folder)
        fn(config, trainer={**passed, "enable_progress_bar": False}) if uses_trainer else fn(config)
        timings[folder] = time.time() - t0
        return artifact

    cali = {"prompts": prompts, "cali_n": cfg.cali_n, "steps": cfg.steps, "cali_st": min(5, cfg.steps)}
    states = {}
    for w, a in ((8, 8), (4, 8), (4, 16)):  # W4A16: Q-Diffusion's own baseline
        states[f"naive-W{w}A{a}"] = step(f"naive_w{w}a{a}", f"naive W{w}A{a}", "calibrate", calibrate,
                                         CalibrateConfig(**common, **cali, method="naive", w_bits=w, a_bits=a))
    states["Q-Diffusion-W4A16"] = step("qdiff", "Q-Diffusion W4A16 {8,16,32}", "calibrate", calibrate,
                                       CalibrateConfig(**common, **cali, method="qdiff", w_bits=4, a_bits=16,
                                                       a_bit_options="8,16,32", iters_w=cfg.iters_w,
                                                       iters_a=cfg.iters_a))
    if world:
        scored = step("scored", "score (FP images + GIQA)", "score", score,
                      ScoreConfig(**common, prompts="world", limit=cfg.score_n, split_fractions="0.8,0.2,0",
                                  n_reference=300, steps=cfg.steps))  # T2Q's targets at the deployed steps
        t2q_dir = step("t2q", "T2Q", "t2q", t2q, T2QConfig(**common, scored=str(scored), richness=False))
        quality = {"criterion": "t2q", "t2q": str(t2q_dir)}
    else:  # T2Q learns from the world's GIQA scores; elsewhere prompt length stands in (Table S3)
        quality = {"criterion": "length"}
    states["Q-Diffusion+QLIP"] = step(  # steps: the state's schedule
        "qlip", "Q2B", "q2b", q2b,
        Q2BConfig(**common, quant_state=str(states["Q-Diffusion-W4A16"]), **quality, bit_options="8,16,32",
                  target_fab=cfg.target_fab, prompts=prompts, n=cfg.q2b_n, val_n=cfg.n, epochs=cfg.q2b_epochs))
    exported = {}
    why_not = onednn_missing() if cfg.deploy_n else "--deploy-n 0"
    if why_not is None:  # before evaluate, whose size column reads these artifacts
        for label, folder in DEPLOYED.items():
            source = {"q2b": str(states[label])} if label == "Q-Diffusion+QLIP" else {"quant_state": str(states[label])}
            exported[label] = step(folder, f"export {label}", "export", export, ExportConfig(**common, **source),
                                   uses_trainer=False)
    step("evaluate", "evaluate", "evaluate", evaluate,
         EvaluateConfig(**common, quant_states=[str(p) for p in states.values()], labels=list(states),
                        in_domain="world:val" if world else "builtin", n=cfg.n, steps=cfg.steps,
                        batch_size=cfg.eval_batch, fid=cfg.n >= min_images(POOL_DIMS[0])))

    out = prepare_artifact(root, ARTIFACTS["demo"], overwrite=True)  # the report is always rewritten from the steps
    deploy = {"skipped": why_not}
    if exported:  # a finished timing is reused on resume, like every step (its own folder and manifest)
        timed = root / "deploy_timing"
        if (timed / "manifest.json").is_file() and not (cfg.overwrite or cfg.fresh):
            print(f"[demo] real-kernel timing: reusing {timed}", flush=True)
            deploy = json.loads((timed / "timing.json").read_text())
        else:
            t0 = time.time()
            timed = prepare_artifact(root, "deploy_timing", overwrite=True)
            deploy = time_deployed(cfg, states, exported, prompts)
            write_json_atomic(timed / "timing.json", deploy)
            write_manifest(timed, "demo", cfg, {"seconds": time.time() - t0})
            timings["deploy_timing"] = time.time() - t0
    report = write_report(root, out, cfg, states, deploy)
    write_manifest(out, "demo", cfg, {"timings_s": timings, "deploy": deploy}, steps=list(STEPS))
    print(report)
    print(f"report -> {out / 'report.md'}")
    if cfg.model == TINY_RANDOM:
        print("note: tiny-random has random weights; its images are noise (the embedded world is the default)")
    return out


def time_deployed(cfg: DemoConfig, states: dict, exported: dict, prompts: str) -> dict:
    """s / image of each deployed method, fake-quant against its artifact on the oneDNN int8 kernels, on the
    first --deploy-n val prompts (same seeds), with the real images' PSNR to the fake ones."""
    load = cfg.load_options()
    draw = draw_prompts(prompts, "val", cfg.deploy_n, seed=cfg.seed).prompts
    rows = {}
    for label, folder in exported.items():
        print(f"[demo] timing {label}: fake-quant vs oneDNN int8 ({len(draw)} images) ...", flush=True)
        if label == "Q-Diffusion+QLIP":  # text-aware: per batch T2Q -> Q2B -> bits, on both sides
            fake_q = QLIPPipeline.from_pretrained(states[label], load=load)
            real_q = load_qlip(folder, load_pipeline(cfg.model, **load), backend="onednn")
            fake = lambda p, q=fake_q: q(p, batch_size=cfg.eval_batch, progress=False).images  # noqa: E731
            real = lambda p, q=real_q: q(p, batch_size=cfg.eval_batch, progress=False).images  # noqa: E731
        else:
            fake_pipe = load_quantized_pipeline(cfg.model, str(states[label]), **load)
            real_pipe = attach(load_pipeline(cfg.model, **load), folder, backend="onednn")
            guidance = sampling_defaults(fake_pipe, cfg.steps).guidance
            run = lambda pipe: lambda p: generate(pipe, p, steps=cfg.steps, guidance=guidance,  # noqa: E731
                                                  batch_size=cfg.eval_batch, progress=False)
            fake, real = run(fake_pipe), run(real_pipe)
        rows[label] = {**compare_generation(fake, real, draw, rounds=1), "artifact": str(folder),
                       "artifact_bytes": (Path(folder) / DEPLOY.tensors).stat().st_size}
    return {"backend": "onednn", "rows": rows}


def deploy_section(deploy: dict) -> list[str]:
    """report.md's lines on the deployed methods."""
    if "skipped" in deploy:
        return ["## Real low-bit inference", "", f"Not run: {deploy['skipped']}.", ""]
    lines = ["## Real low-bit inference (oneDNN int8 kernels)", "",
             "Each method exported as integers (`python -m pipeline.fit export`) and generated on the real kernels "
             "beside its fake-quant twin, same prompts and seeds; s / image is one timed pass after a one-image "
             "warm-up, fake and real in turn (a few images on a shared machine: noisy).", "",
             "| method | fake-quant s/image | real int8 s/image | speedup | PSNR real vs fake (min / median, dB) "
             "| artifact (MiB) |", "|---|---|---|---|---|---|"]
    for label, r in deploy["rows"].items():
        lines.append(f"| {label} | {r['fake_s_per_image']:.3f} | {r['real_s_per_image']:.3f} | {r['speedup']:.2f}x "
                     f"| {r['psnr_min']:.1f} / {r['psnr_median']:.1f} | {r['artifact_bytes'] / 2**20:.2f} |")
    return lines + [""]


def write_report(root: Path, out: Path, cfg: DemoConfig, methods: dict, deploy: dict) -> str:
    """report.md: the evaluation table, the bits QLIP chose, links to the grids and figures."""
    evaluated = root / "evaluate" / ARTIFACTS["evaluate"]
    q2b_dir = root / "qlip" / ARTIFACTS["q2b"]
    ev = json.loads((evaluated / "results.json").read_text())
    q2b_metrics = json.loads((q2b_dir / "manifest.json").read_text())["metrics"]
    for name in ("bits_heatmap.png", "bit_shares.png"):
        if (q2b_dir / name).is_file():
            shutil.copy(q2b_dir / name, out / name)
    for g in sorted(evaluated.glob("grid_*.png")):
        shutil.copy(g, out / g.name)
    # the evaluate report nests under this one's headings
    table = "\n".join("##" + line if line.startswith("#") else line
                      for line in (evaluated / "results.md").read_text().splitlines())
    lines = [f"# Demo: the QLIP chain on `{cfg.model}`", "",
             f"Calibrated on {cfg.cali_n} prompts ({cfg.iters_w} AdaRound iterations per block, the paper uses "
             f"20k); Q2B trained on {cfg.q2b_n} prompts to a target FAB of {cfg.target_fab}; evaluated on "
             f"{cfg.n} held-out prompts, {cfg.steps} steps, batch {cfg.eval_batch} (a batch runs the maximum bits "
             f"of its prompts).", "",
             f"QLIP on the validation prompts, one prompt at a time: mean FAB "
             f"{q2b_metrics.get('fab_val', float('nan')):.2f}, Spearman(predicted quality, FAB) "
             f"{q2b_metrics.get('spearman_q_fab_val', float('nan')):.3f}.", "",
             "## Evaluation (the evaluate stage's table)", "", table.strip(), "", *deploy_section(deploy),
             "## Bits QLIP chose", "", "![bits](bits_heatmap.png)", "", "![shares](bit_shares.png)"]
    text = "\n".join(lines) + "\n"
    write_text_atomic(out / "report.md", text)
    write_json_atomic(out / "results.json", {"evaluate": ev["rows"], "qlip": q2b_metrics, "deploy": deploy,
                                             "methods": {k: str(v) for k, v in methods.items()}})
    return text
