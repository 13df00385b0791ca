"""Does a GIQA fall as real photos are degraded? Issue 18's validation of
pipeline/metrics/giqa.py: fit the reference on one set of real photos, blur
and add noise to *other* photos, and count for how many of those photos the
score falls strictly with every step of the degradation (the monotone
fraction; with 4 levels a random score is monotone for 1/24 of photos).

    feats = distortion_features(list_images("../shared/data/coco-mini/images"))
    report = validate(lambda: make_giqa("gmm"), feats)       # halves and leave-one-out

The reference must not hold the photos it scores: a density fitted on the
photos themselves ranks their degradations well for any model flexible enough
to memorize 32 points, which says nothing about an unseen image.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from pipeline.metrics.inception import INPUT_SIZE, inception_features

BLUR_SIGMAS = (0, 1, 2, 4)  # Gaussian blur radius, in the original photo's pixels
NOISE_STDS = (0, 8, 16, 32)  # additive Gaussian noise, on the 0..255 scale
LEVELS = {"blur": BLUR_SIGMAS, "noise": NOISE_STDS}


def _square(im, side: int) -> np.ndarray:
    from PIL import Image  # PIL is needed only where photos are read

    w, h = im.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return np.asarray(im.crop(box).resize((side, side), Image.BICUBIC))


def distorted_photos(files: Sequence[str | Path], side: int = INPUT_SIZE, seed: int = 0) -> dict:
    """{(kind, level): uint8 [N, side, side, 3]}: each photo blurred by every BLUR_SIGMAS and noised by every
    NOISE_STDS. The degradation is applied to the original photo, which then reaches the Inception like any
    real image (centre crop, resize); level 0 of both kinds is the clean photo."""
    from PIL import Image, ImageFilter  # as above

    photos = []
    for f in files:
        with Image.open(f) as im:
            photos.append(im.convert("RGB"))
    g = np.random.default_rng(seed)
    out = {("blur", s): np.stack([_square(p.filter(ImageFilter.GaussianBlur(s)) if s else p, side) for p in photos])
           for s in BLUR_SIGMAS}
    for std in NOISE_STDS:
        if not std:
            out[("noise", 0)] = out[("blur", 0)]
            continue
        noisy = [Image.fromarray(np.clip(np.asarray(p, dtype=np.float64) + g.normal(0, std, (p.height, p.width, 3)),
                                         0, 255).round().astype(np.uint8)) for p in photos]
        out[("noise", std)] = np.stack([_square(p, side) for p in noisy])
    return out


def distortion_features(files: Sequence[str | Path], seed: int = 0, batch: int = 16) -> dict:
    """{(kind, level): float64 Inception pool features [N, 2048]} of distorted_photos (clean ones computed once)."""
    images = distorted_photos(files, seed=seed)
    feats = {}
    for key, x in images.items():
        if key == ("noise", 0):
            continue
        feats[key] = inception_features(x, batch=batch).double().numpy()
    feats[("noise", 0)] = feats[("blur", 0)]
    return feats


def ordering(scores: np.ndarray) -> dict:
    """scores [levels, photos], levels in increasing degradation -> the monotone fraction (photos whose score
    falls strictly at every level) and the pairwise fraction (level pairs ordered correctly; chance 1/2)."""
    n_levels = scores.shape[0]
    monotone = np.all(np.diff(scores, axis=0) < 0, axis=0)
    pairs = [(i, j) for i in range(n_levels) for j in range(i + 1, n_levels)]
    pairwise = np.mean([scores[i] > scores[j] for i, j in pairs], axis=0)
    return {"monotone_fraction": float(monotone.mean()), "pairwise_fraction": float(pairwise.mean()),
            "n_photos": int(scores.shape[1])}


def held_out_scores(make: Callable, feats: dict, folds: Sequence[np.ndarray]) -> dict:
    """{kind: scores [levels, photos]}: for each fold (the indices it scores), a fresh `make()` GIQA is fitted
    on the clean features of every other photo and scores the fold's distorted ones."""
    n = len(feats[("blur", 0)])
    out = {kind: np.full((len(levels), n), np.nan) for kind, levels in LEVELS.items()}
    for fold in folds:
        rest = np.setdiff1d(np.arange(n), fold)
        giqa = make().fit(feats[("blur", 0)][rest])
        for kind, levels in LEVELS.items():
            for i, v in enumerate(levels):
                out[kind][i, fold] = giqa.score(feats[(kind, v)][fold])
    return out


def validate(make: Callable, feats: dict) -> dict:
    """The monotone and pairwise fractions of `make()` (an unfitted GIQA) per distortion kind, three ways:
    `halves` (fit on the first half of the photos, score the second, and the other way round), `leave_one_out`
    (fit on all photos but one, score that one) and `in_sample` (fit on all, score them: the optimistic check
    the project used to make, for contrast)."""
    n = len(feats[("blur", 0)])
    if n < 4:
        raise ValueError(f"GIQA validation needs at least 4 photos (two halves of 2), got {n}")
    half = n // 2
    schemes = {"halves": [np.arange(half), np.arange(half, n)], "leave_one_out": [np.array([i]) for i in range(n)]}
    report = {name: {k: ordering(s) for k, s in held_out_scores(make, feats, folds).items()}
              for name, folds in schemes.items()}
    giqa = make().fit(feats[("blur", 0)])
    report["in_sample"] = {kind: ordering(np.stack([giqa.score(feats[(kind, v)]) for v in levels]))
                           for kind, levels in LEVELS.items()}
    report["describe"] = giqa.describe()
    report["pca_dim_used"] = getattr(giqa, "pca_dim_used", None)
    return report

