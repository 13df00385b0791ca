"""Rehearsal at real model size (issue 15, item 10): the stages on the full-size SD v1.4 architecture with
random seeded weights, at a reduced resolution, with wall time, peak RSS and disk use per stage and a
projection to the paper's sizes.

    python benchmarks/scale.py                        # SD v1.4 architecture, 64x64 px (latents 8x8), 2 steps
    python benchmarks/scale.py --entry tiny           # the same code path on the seeded tiny pipeline (seconds)

The model is built from the published configs written in code (pipeline.models.reference_pipeline),
seeded, saved once as a diffusers folder under --work: no hub. Each stage runs through `pipeline.api` in a
fresh Python process, so the peak RSS it reports (ru_maxrss) is that stage's alone. Disk use is the size of the
stage's folders afterwards.

Stages: calibrate naive (W8A8), calibrate qdiff (W4A8, --iters 1-2), q2b (--criterion length: score and t2q
need the embedded world's GIQA reference and CLIP, so they are reported as not applicable to a random model),
generate. evaluate also needs the world's CLIP judge; not run here.

Projection (labelled as such in the JSON): every stage's work is a number of UNet calls, each linear in the
latent pixels, so time and the per-item data scale linearly in pixels * steps * prompts from this run to the
paper's setting (512x512 px, 20 steps for the calibration/Q2B trajectories, the prompt counts below). The
model's own memory does not scale (it is already full size); the items' share does. It ignores the GPU's
speed-up and attention's quadratic cost in tokens (1024 latent tokens at 512 px vs 64 here), so read it as a
CPU-time order of magnitude, not a forecast. It overstates calibrate-qdiff: at this size its time is mostly
per-unit fixed cost (the L_p range search over every weight, AdaRound's per-weight state, one Lightning fit per
unit), which does not grow with pixels, steps or prompts.

`--entry sdxl-base`: the SDXL-base architecture (both text towers, 2.6 B-parameter UNet; about 14 GB of
fp32 weights in RAM and on disk)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline.models import reference_pipeline, tiny_pipeline  # noqa: E402

# the paper's sizes the projection targets: pixels, trajectory steps, prompts per stage
PAPER = {"resolution": 512, "steps": 20, "prompts": {"calibrate-naive": 256, "calibrate-qdiff": 256, "q2b": 1024,
                                                       "generate": 5000}}


def build_reference(name: str):
    """A builder of the published architecture `name` with seeded random weights (pipeline.models.reference_pipeline),
    default resolution `resolution`, saved once under `out`."""
    def build(out: Path, resolution: int, seed: int = 0) -> Path:
        if not (out / "model_index.json").is_file():
            pipe = reference_pipeline(name, seed, sample_size=resolution // 8)
            pipe.save_pretrained(str(out), safe_serialization=True)
        return out
    return build


def build_tiny(out: Path, resolution: int, seed: int = 0) -> Path:
    if not (out / "model_index.json").is_file():
        tiny_pipeline(seed).save_pretrained(str(out), safe_serialization=True)
    return out


ENTRIES = {"sd-v1-4": build_reference("sd-v1-4"), "sdxl-base": build_reference("sdxl-base"), "tiny": build_tiny}

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from pipeline import api
t = time.time()
getattr(api, {fn!r})(getattr(api, {cls!r})(**{cfg!r}){trainer})
print("SCALE_RESULT " + json.dumps({{"wall_s": time.time() - t,
                                     "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
"""


def run_stage(fn: str, cls: str, cfg: dict, trainer: bool) -> dict:
    code = CHILD.format(root=str(ROOT), fn=fn, cls=cls, cfg=cfg,
                        trainer=", trainer={'enable_progress_bar': False}" if trainer else "")
    t = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SCALE_RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"stage {fn} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    estimates = [ln for ln in proc.stdout.splitlines() if "will hold about" in ln]
    return {**json.loads(lines[-1][len("SCALE_RESULT "):]), "process_s": time.time() - t, "estimates": estimates}


def du(*paths: Path) -> float:
    return sum(f.stat().st_size for p in paths if p.exists() for f in p.rglob("*") if f.is_file()) / 2 ** 30


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entry", default="sd-v1-4", choices=sorted(ENTRIES))
    p.add_argument("--work", default=str(ROOT / "runs" / "bench" / "scale"))
    p.add_argument("--resolution", type=int, default=64, help="pixels (latents are 1/8)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--iters", type=int, default=1, help="AdaRound and LSQ iterations per unit (qdiff)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    args = p.parse_args(argv)
    work = Path(args.work) / args.entry
    t = time.time()
    model = ENTRIES[args.entry](work / "model", args.resolution)
    build_s = time.time() - t
    common = {"model": str(model), "overwrite": True, "prompts": "builtin", "steps": args.steps, "guidance": 5.0,
              "batch_size": args.prompts}
    runs = {
        "calibrate-naive": ("calibrate", "CalibrateConfig", {**common, "run_dir": str(work / "naive"),
                                                             "method": "naive", "a_bit_options": "8,16,32",
                                                             "cali_n": args.prompts}, True),
        "calibrate-qdiff": ("calibrate", "CalibrateConfig", {**common, "run_dir": str(work / "qdiff"),
                                                             "method": "qdiff", "w_bits": 4, "cali_n": args.prompts,
                                                             "cali_st": args.steps, "iters_w": args.iters,
                                                             "iters_a": args.iters}, True),
        "q2b": ("q2b", "Q2BConfig", {**{k: v for k, v in common.items() if k != "steps"},
                                     "run_dir": str(work / "q2b"), "quant_state": str(work / "naive" / "quant"),
                                     "criterion": "length", "n": args.prompts, "val_n": 0, "epochs": 1,
                                     "target_fab": 12.0, "plot_every": 100}, True),
        "generate": ("generate", "GenerateConfig", {**common, "run_dir": str(work / "gen"), "n": args.prompts,
                                                    "quant_state": str(work / "naive" / "quant")}, False),
    }
    folders = {"calibrate-naive": [work / "naive"], "calibrate-qdiff": [work / "qdiff"], "q2b": [work / "q2b"],
               "generate": [work / "gen"]}
    stages = {}
    for name, (fn, cls, cfg, trainer) in runs.items():
        print(f"[scale] {name} ...", flush=True)
        r = run_stage(fn, cls, cfg, trainer)
        r["disk_gib"] = du(*folders[name])
        factor = (PAPER["resolution"] / args.resolution) ** 2 * (PAPER["steps"] / args.steps) * \
            (PAPER["prompts"][name] / args.prompts)
        r["projection"] = {"rule": "linear in pixels * steps * prompts (a projection, not a measurement)",
                           "factor": factor, "wall_h_at_paper_size_cpu": r["wall_s"] * factor / 3600}
        stages[name] = r
        print(f"[scale] {name}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB, "
              f"disk {r['disk_gib']:.3f} GiB; projected x{factor:.3g}", flush=True)
    not_run = {"score": "needs the GIQA reference images of the embedded world", "t2q": "needs score's output",
               "evaluate": "needs the embedded world's CLIP judge"}
    result = {"entry": args.entry, "resolution": args.resolution, "steps": args.steps, "prompts": args.prompts,
              "iters": args.iters, "model_build_s": build_s, "model_disk_gib": du(model), "paper": PAPER,
              "stages": stages, "not_run": not_run, "torch_threads": torch.get_num_threads()}
    if args.entry == "tiny":
        result["note"] = "smoke run of the code path"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
