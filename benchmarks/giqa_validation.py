"""GIQA on held-out real photos (issue 18): fit the reference on one set of real
photos, blur and noise *other* photos, and report for how many of them each GIQA
falls strictly with every step of the degradation (the monotone fraction; chance
1/24 with 4 levels) and how many level pairs it orders correctly (chance 1/2).

    python benchmarks/giqa_validation.py          # ../shared/data/coco-mini (32 COCO photos), ~3 min on 2 cores

Rows: GMM-GIQA as published (the default), KNN-GIQA, the residual variant with
the published PCA and mixture, and the residual variant as the project's default
was before issue 18 (64 PCA dims, 4 components). Splits: `halves` (fit on 16,
score the other 16, both ways), `leave_one_out` (fit on 31) and `in_sample` (fit
on all 32 and score them: the optimistic check, for contrast). Writes
benchmarks/results/giqa_validation.json. The photos are not part of the project:
without ../shared the script says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.images import list_images  # noqa: E402
from pipeline.metrics.giqa import GMMGIQA, make_giqa  # noqa: E402
from pipeline.metrics.giqa_validation import BLUR_SIGMAS, NOISE_STDS, distortion_features, validate  # noqa: E402

VARIANTS = {
    "gmm (published: PCA 95%, 5 components)": lambda: make_giqa("gmm"),
    "knn (k=5)": lambda: make_giqa("knn"),
    "gmm-residual (PCA 95%, 5 components)": lambda: make_giqa("gmm-residual"),
    "gmm-residual, before issue 18 (PCA 64, 4 components)": lambda: GMMGIQA(4, 64, residual=True, pca_variance=None),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", default=str(ROOT.parent / "shared" / "data" / "coco-mini" / "images"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "giqa_validation.json"))
    return p.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if not Path(args.photos).is_dir():
        print(f"{args.photos} is absent (../shared is not part of the project): nothing to validate")
        return None
    torch.set_num_threads(args.threads)
    t0 = time.time()
    files = list_images(args.photos)
    feats = distortion_features(files)
    rows = {name: validate(make, feats) for name, make in VARIANTS.items()}
    print(f"\nGIQA on {len(files)} photos: monotone fraction / pairwise fraction (chance 0.04 / 0.50)")
    print(f"{'GIQA':<54} {'split':<14} {'blur':>11} {'noise':>11}")
    for name, r in rows.items():
        for split in ("halves", "leave_one_out", "in_sample"):
            cells = [f"{r[split][k]['monotone_fraction']:.2f} / {r[split][k]['pairwise_fraction']:.2f}"
                     for k in ("blur", "noise")]
            print(f"{name:<54} {split:<14} {cells[0]:>11} {cells[1]:>11}")
    results = {"photos": str(Path(args.photos).relative_to(ROOT.parent)) if Path(args.photos).is_relative_to(
        ROOT.parent) else args.photos, "n_photos": len(files), "blur_sigmas": BLUR_SIGMAS, "noise_stds": NOISE_STDS,
        "chance": {"monotone_fraction": 1 / 24, "pairwise_fraction": 0.5}, "variants": rows,
        "seconds": time.time() - t0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
