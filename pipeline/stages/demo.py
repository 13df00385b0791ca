"""`python -m pipeline.fit demo`: the README's main job, the whole QLIP chain on one model.

Every step is the real stage, run into its own folder of --run-dir:

  naive_w8a8/, naive_w4a8/,  calibrate --method naive (the PTQ floor;
  naive_w4a16/               W4A16 is Q-Diffusion's direct baseline)
  qdiff/                     calibrate --method qdiff at W4A16 with activation banks {8,16,32}
  scored/                    score: FP images of world prompts, GIQA against the world's renders
  t2q/                       t2q: text -> predicted quality
  qlip/                      q2b: predicted quality -> layer- and step-wise activation bits
  evaluate/                  evaluate: FP, naive, Q-Diffusion and Q-Diffusion+QLIP on held-out prompts
  demo/                      report.md: the evaluation table, the bits QLIP chose, grids

Sizes are small so that the chain runs in minutes on a laptop CPU; every size
is a flag. Without --overwrite, a rerun resumes: finished steps are kept and
an interrupted stage continues from its own partial results. With --overwrite
true every step is recomputed."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

USES_TRAINER = True

STEPS = ("naive_w8a8", "naive_w4a8", "naive_w4a16", "qdiff", "scored", "t2q", "qlip", "evaluate", "demo")


def add_arguments(parser) -> None:
    parser.add_argument("--n", type=int, default=80,
                        help="evaluation prompts (world val split); FID to FP needs at least 65")
    parser.add_argument("--cali-n", type=int, default=16, help="calibration prompts")
    parser.add_argument("--score-n", type=int, default=240, help="prompts scored for T2Q (train + val)")
    parser.add_argument("--q2b-n", type=int, default=16, help="Q2B training prompts")
    parser.add_argument("--q2b-epochs", type=int, default=8)
    parser.add_argument("--target-fab", type=float, default=12.0, help="Q2B's target FAB (W4A16 base: 16)")
    parser.add_argument("--iters-w", type=int, default=300, help="AdaRound iterations per block (paper: 20000)")
    parser.add_argument("--iters-a", type=int, default=20, help="activation step-size iterations per block")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--eval-batch", type=int, default=4, help="evaluation batch (a batch runs its max bits)")


def run(cfg):
    from pipeline.fit import main as stage
    from pipeline.metrics.frechet import min_images
    from pipeline.metrics.inception import POOL_DIMS
    from pipeline.models import EMBEDDED, TINY_RANDOM
    from pipeline.runs import RunDirError, prepare_artifact, write_manifest

    root = Path(cfg.run_dir)
    if (root / "demo" / "report.md").is_file() and not cfg.overwrite:
        raise RunDirError(f"{root / 'demo'} already holds a report; pass --overwrite true to recompute every step, "
                          f"or choose another --run-dir")
    if cfg.overwrite:
        for name in STEPS:
            shutil.rmtree(root / name, ignore_errors=True)
    world = cfg.model == EMBEDDED
    common = ["--model", cfg.model, "--seed", str(cfg.seed), "--trainer.enable_progress_bar", "false"]
    trainer = [f"--trainer.{k}={v}" for k, v in vars(cfg.trainer).items()
               if k in ("accelerator", "devices", "strategy", "num_nodes", "precision") and v is not None]
    prompts = "world" if world else "builtin"
    timings = {}

    def step(folder: str, label: str, done: str, argv: list[str]) -> None:
        """Run one stage into root/folder unless its artifact `done` is there (then reuse it: resume)."""
        if (root / folder / done).is_file():
            print(f"[demo] {label}: reusing {root / folder}", flush=True)
            return
        print(f"[demo] {label} ...", flush=True)
        t0 = time.time()
        stage([*argv, *common, "--run-dir", str(root / folder)])
        timings[folder] = time.time() - t0

    cali = ["--prompts", prompts, "--cali-n", str(cfg.cali_n), "--steps", str(cfg.steps),
            "--cali-st", str(min(5, cfg.steps))]
    for w, a in ((8, 8), (4, 8), (4, 16)):  # W4A16: Q-Diffusion's own baseline
        step(f"naive_w{w}a{a}", f"naive W{w}A{a}", "quant/quant_config.json",
             ["calibrate", "--method", "naive", "--w-bits", str(w), "--a-bits", str(a), *cali, *trainer])
    step("qdiff", "Q-Diffusion W4A16 {8,16,32}", "quant/quant_config.json",
         ["calibrate", "--method", "qdiff", "--w-bits", "4", "--a-bits", "16", "--a-bit-options", "8,16,32",
          "--iters-w", str(cfg.iters_w), "--iters-a", str(cfg.iters_a), *cali])
    if world:
        step("scored", "score (FP images + GIQA)", "scored/manifest.json",
             ["score", "--prompts", "world", "--limit", str(cfg.score_n), "--split-fractions", "0.8,0.2,0",
              "--n-reference", "300", *trainer])
        step("t2q", "T2Q", "t2q/manifest.json",
             ["t2q", "--scored", str(root / "scored" / "scored"), "--richness", "false", *trainer])
        quality = ["--criterion", "t2q", "--t2q", str(root / "t2q" / "t2q")]
    else:  # T2Q learns from the world's GIQA scores; elsewhere prompt length stands in (Table S3)
        quality = ["--criterion", "length"]
    step("qlip", "Q2B", "q2b/manifest.json",
         ["q2b", "--quant-state", str(root / "qdiff" / "quant"), *quality, "--bit-options", "8,16,32",
          "--target-fab", str(cfg.target_fab), "--prompts", prompts, "--n", str(cfg.q2b_n),
          "--val-n", str(cfg.n), "--epochs", str(cfg.q2b_epochs)])  # steps: the state's schedule
    methods = {"naive-W8A8": root / "naive_w8a8" / "quant", "naive-W4A8": root / "naive_w4a8" / "quant",
               "naive-W4A16": root / "naive_w4a16" / "quant", "Q-Diffusion-W4A16": root / "qdiff" / "quant",
               "Q-Diffusion+QLIP": root / "qlip" / "q2b"}
    step("evaluate", "evaluate", "evaluate/manifest.json",
         ["evaluate", "--quant-states", f"[{','.join(map(str, methods.values()))}]",
          "--labels", f"[{','.join(methods)}]", "--in-domain", "world:val" if world else "builtin",
          "--n", str(cfg.n), "--steps", str(cfg.steps), "--batch-size", str(cfg.eval_batch),
          "--fid", str(cfg.n >= min_images(POOL_DIMS[0])).lower(), *trainer])

    out = prepare_artifact(root, "demo", overwrite=True)  # the report is always rewritten from the steps
    report = write_report(root, out, cfg, methods)
    write_manifest(out, "demo", cfg, {"timings_s": timings}, steps=list(STEPS))
    print(report)
    print(f"report -> {out / 'report.md'}")
    if cfg.model == TINY_RANDOM:
        print("note: tiny-random has random weights; its images are noise (the embedded world is the default)")
    return out


def write_report(root: Path, out: Path, cfg, methods: dict) -> str:
    """report.md: the evaluation table, the bits QLIP chose, links to the grids and figures."""
    ev = json.loads((root / "evaluate" / "evaluate" / "results.json").read_text())
    q2b = json.loads((root / "qlip" / "q2b" / "manifest.json").read_text())["metrics"]
    for name in ("bits_heatmap.png", "bit_shares.png"):
        if (root / "qlip" / "q2b" / name).is_file():
            shutil.copy(root / "qlip" / "q2b" / name, out / name)
    grids = sorted((root / "evaluate" / "evaluate").glob("grid_*.png"))
    for g in grids:
        shutil.copy(g, out / g.name)
    # the evaluate report nests under this one's headings
    table = "\n".join("##" + line if line.startswith("#") else line
                      for line in (root / "evaluate" / "evaluate" / "results.md").read_text().splitlines())
    lines = [f"# Demo: the QLIP chain on `{cfg.model}`", "",
             f"Calibrated on {cfg.cali_n} prompts ({cfg.iters_w} AdaRound iterations per block, the paper uses "
             f"20k); Q2B trained on {cfg.q2b_n} prompts to a target FAB of {cfg.target_fab}; evaluated on "
             f"{cfg.n} held-out prompts, {cfg.steps} steps, batch {cfg.eval_batch} (a batch runs the maximum bits "
             f"of its prompts).", "",
             f"QLIP on the validation prompts, one prompt at a time: mean FAB {q2b.get('fab_val', float('nan')):.2f}, "
             f"Spearman(predicted quality, FAB) {q2b.get('spearman_q_fab_val', float('nan')):.3f}.", "",
             "## Evaluation (the evaluate stage's table)", "", table.strip(), "",
             "## Bits QLIP chose", "", "![bits](bits_heatmap.png)", "", "![shares](bit_shares.png)"]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"evaluate": ev["rows"],
                                                  "qlip": q2b, "methods": {k: str(v) for k, v in methods.items()}},
                                                 indent=1, default=str))
    return text
