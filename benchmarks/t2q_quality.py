"""T2Q on the embedded world (the issue's acceptance figures, re-measurable on
any checkpoint): train / val / test MSE of T2Q (early stopping on val MSE, and
the same training without it) vs a constant predictor and a linear regression
on prompt length, Pearson and Spearman, and the richness table
with the *measured* quality (GIQA of FP images of the same caption series)
next to the predicted one.

    python benchmarks/t2q_quality.py                              # 2000 world scenes (~1700 prompts)
    python benchmarks/t2q_quality.py --limit 400 --n-reference 200 --measure-scenes 20   # a quick look

Runs the score stage (resumable: an interrupted run continues; a finished
scored set in --run-dir is reused unless --rescore) and the t2q stage in
--run-dir (default runs/bench/t2q_world), prints a table and writes
runs/bench/t2q_quality.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.prompts import prompt_seed  # noqa: E402
from pipeline.api import ScoreConfig, T2QConfig, score, t2q  # noqa: E402
from pipeline.metrics.inception import inception_features  # noqa: E402
from pipeline.models import load_pipeline, sampling_defaults  # noqa: E402
from pipeline.qlip.scoring import scored_set_giqa  # noqa: E402
from pipeline.sampling import generate  # noqa: E402
from pipeline.world.richness import richness_series  # noqa: E402

QUIET = {"enable_progress_bar": False}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--run-dir", default=str(ROOT / "runs" / "bench" / "t2q_world"))
    p.add_argument("--limit", type=int, default=2000, help="world scenes captioned (duplicates dropped)")
    p.add_argument("--split-fractions", default="0.6,0.2,0.2", help="train,val,test (test: never trained or "
                   "selected on)")
    p.add_argument("--n-reference", type=int, default=1000, help="world renders the GIQA GMM is fitted to")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--patience", type=int, default=T2QConfig.patience, help="early stopping (0: none)")
    p.add_argument("--measure-scenes", type=int, default=40,
                   help="scenes whose 5 richness captions are generated and GIQA-scored (0: skip)")
    p.add_argument("--rescore", action="store_true", help="regenerate the scored set even if it is finished")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "t2q_quality.json"))
    return p.parse_args(argv)


def measured_richness(run_dir: Path, model: str, n_scenes: int, seed: int = 0) -> list[float]:
    """Mean normalized GIQA of FP images per richness level (same scenes, seeds per caption)."""
    giqa, normalize = scored_set_giqa(run_dir / "scored")
    pipe = load_pipeline(model)
    sampling = sampling_defaults(pipe)  # the score stage's own
    series = richness_series(n_scenes, seed)
    flat = [c for s in series for c in s]
    images = generate(pipe, flat, [prompt_seed(c) for c in flat], steps=sampling.steps, guidance=sampling.guidance,
                      batch_size=50)
    q = normalize(giqa.score(inception_features(images))).reshape(n_scenes, -1)
    return [float(v) for v in np.mean(q, axis=0)]


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.run_dir)
    t0 = time.time()
    if args.rescore and run.exists():
        shutil.rmtree(run)
    finished = run / "scored" / "manifest.json"
    if finished.is_file():  # reuse a finished scored set only if it was made with these flags
        made = json.loads(finished.read_text())["config"]
        want = {"limit": args.limit, "n_reference": args.n_reference, "split_fractions": args.split_fractions}
        if any(made.get(k) != v for k, v in want.items()):
            raise SystemExit(f"{run / 'scored'} was scored with {({k: made.get(k) for k in want})}, not {want}: "
                             f"pass those flags, --rescore, or another --run-dir")
    else:
        score(ScoreConfig(model=args.model, limit=args.limit, split_fractions=args.split_fractions,
                          splits="train,val,test", n_reference=args.n_reference, run_dir=str(run)), trainer=QUIET)
    t_score = time.time() - t0
    # the same training without early stopping, beside it (its own run dir, the same scored set)
    plain = run / "no_early_stopping"
    t2q(T2QConfig(model=args.model, run_dir=str(plain), scored=str(run / "scored"), epochs=args.epochs, patience=0,
                  richness=False, overwrite=True), trainer=QUIET)
    t2q(T2QConfig(model=args.model, run_dir=str(run), epochs=args.epochs, patience=args.patience, overwrite=True),
        trainer=QUIET)
    manifest = json.loads((run / "t2q" / "manifest.json").read_text())
    m_plain = json.loads((plain / "t2q" / "manifest.json").read_text())["metrics"]
    m, scored = manifest["metrics"], json.loads((run / "scored" / "manifest.json").read_text())["metrics"]
    levels = manifest["richness"]["levels"] if manifest.get("richness") else []
    measured = measured_richness(run, args.model, args.measure_scenes) if args.measure_scenes and levels else None

    val, base = m["val"], m["baselines"]
    data = manifest["data"]
    es = m["early_stopping"]
    print(f"\nT2Q on the embedded world: {data['n_train']} train / {data['n_val']} val / {data.get('n_test', 0)} "
          f"test prompts, GIQA = {scored['giqa']['method'].upper()} on {scored['n_reference']} renders"
          + (f"; early stopping kept epoch {es['best_epoch']} of {es['epochs_run']}" if es else ""))
    splits = [s for s in ("train", "val", "test") if s in m]
    by_split = m["baselines_by_split"]
    print(f"{'predictor (MSE)':<34}" + "".join(f" {s:>8}" for s in splits) + f" {'val Spearman':>12}")
    rows = {"T2Q" + (f" (patience {args.patience})" if es else ""): ([m[s]["mse"] for s in splits], val["spearman"]),
            f"T2Q, all {args.epochs} epochs": ([m_plain[s]["mse"] for s in splits], m_plain["val"]["spearman"]),
            "constant (train mean)": ([by_split[s]["constant_mse"] for s in splits], float("nan")),
            "linear regression on token length": ([by_split[s]["length_mse"] for s in splits],
                                                  base["length_spearman"])}
    for name, (mses, rho) in rows.items():
        print(f"{name:<34}" + "".join(f" {v:>8.4f}" for v in mses) + f" {rho:>12.3f}")
    if levels:
        print(f"\n{'richness':>8} {'T2Q q':>7}" + (f" {'measured q':>10}" if measured else ""))
        for i, row in enumerate(levels):
            print(f"{row['richness']:>8} {row['q_mean']:>7.3f}" + (f" {measured[i]:>10.3f}" if measured else ""))
    results = {"val": val, "train": m["train"], "test": m.get("test"), "baselines": base,
               "baselines_by_split": by_split, "early_stopping": es, "history": m["history"],
               "without_early_stopping": {s: m_plain[s] for s in splits}, "data": manifest["data"],
               "giqa": scored["giqa"], "n_reference": scored["n_reference"], "richness_predicted": levels,
               "richness_measured": measured, "measure_scenes": args.measure_scenes,
               "memory_bytes": m["memory_bytes"], "seconds": {"score": t_score, "total": time.time() - t0},
               "config": vars(args)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
