"""From the evaluate stage's settings to what runs: the prompt splits, the
methods, the metric settings (with FID/sFID feature sizes the image count
supports) and, for every metric left out, the reason. Cheap: nothing is
generated here."""
from __future__ import annotations

from dataclasses import dataclass, field

from data.prompts import DEFAULT_FRACTIONS
from pipeline.evaluation.methods import EvalMethod, method_from_state, unique_labels
from pipeline.evaluation.settings import EvalSettings
from pipeline.evaluation.splits import PROMPT_SEED, Split, load_split
from pipeline.metrics.clip import ClipUnavailable, resolve_clip
from pipeline.metrics.fidelity import lpips_unavailable_reason
from pipeline.metrics.frechet import check_enough_images, min_images
from pipeline.metrics.inception import POOL_DIMS, SPATIAL_SIDE, describe, feature_dims
from pipeline.models import EMBEDDED

AUTO = "auto"


@dataclass
class EvaluationPlan:
    splits: list[Split]
    methods: list[EvalMethod]
    settings: EvalSettings
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> why it is not computed
    features: dict[str, str] = field(default_factory=dict)  # metric -> Inception features used
    baseline: str | None = None  # the method every other is paired with (None: fewer than two quantized methods)


def pick_fid_dims(option: str, n_min: int) -> int:
    """--fid-dims: a pool tap, or the largest the smallest split supports (auto)."""
    if option != AUTO:
        try:
            return int(option)
        except ValueError:
            raise ValueError(f"--fid-dims {option!r} must be one of {POOL_DIMS} or 'auto'") from None
    fitting = [d for d in POOL_DIMS if n_min >= min_images(d)]
    if not fitting:
        check_enough_images(n_min, POOL_DIMS[0], "FID", "the smallest split")  # raises, naming the minimum
    return fitting[-1]


def pick_sfid_grid(option: str, n_min: int) -> int | None:
    """The sFID grid, or None when even a 2x2 grid needs more images."""
    if option != AUTO:
        try:
            return int(option)
        except ValueError:
            raise ValueError(f"--sfid-grid {option!r} must be an integer in 1..17 or 'auto'") from None
    return next((g for g in range(SPATIAL_SIDE, 1, -1) if n_min >= min_images(feature_dims("spatial", g))), None)


def pick_baseline(option: str | None, labels: list[str]) -> str | None:
    """--baseline: a method label (default the first); None when there is nothing to pair it with."""
    if option is not None and option not in labels:
        raise ValueError(f"--baseline {option!r} is none of the evaluated methods {labels}; pass one of their "
                         f"labels (--labels) or leave it out for the first")
    if len(labels) < 2:
        return None
    return option or labels[0]


def plan_evaluation(model: str, quant_states: list[str], labels: list[str] | None, in_domain: str,
                    generalization: str | None, n: int, images_per_prompt: int, seed: int, settings: EvalSettings,
                    fid_dims: str = AUTO, sfid_grid: str = AUTO, clip: str = AUTO,
                    fractions=DEFAULT_FRACTIONS, prompt_seed: int = PROMPT_SEED,
                    baseline: str | None = None) -> EvaluationPlan:
    """`settings` holds the flags' metric switches; the plan fills in the feature sizes and drops what cannot run.
    Both splits draw the test split of their source (`fractions`: the run's hashed split) with `prompt_seed`;
    `seed` offsets the noise seeds only. `baseline`: the label every other method is paired with (default:
    the first quantized method)."""
    skipped = {}
    if in_domain == AUTO:
        in_domain = "world:test" if model == EMBEDDED else "builtin"
    splits = [load_split("in_domain", in_domain, n, images_per_prompt, seed, fractions, prompt_seed)]
    if generalization:
        splits.append(load_split("generalization", generalization, n, images_per_prompt, seed, fractions,
                                 prompt_seed))
    else:
        skipped["generalization"] = "prompt generalization: no --generalization split given"

    labels = list(labels or [])
    if labels and len(labels) != len(quant_states):
        raise ValueError(f"--labels has {len(labels)} names for {len(quant_states)} --quant-states")
    methods = [method_from_state(p, labels[i] if labels else None, "--quant-states")
               for i, p in enumerate(quant_states)]
    unique_labels(methods)
    baseline = pick_baseline(baseline, [m.label for m in methods])
    if baseline is None:
        skipped["paired"] = "paired tests: fewer than two quantized methods to pair"

    n_min = min(s.n_images for s in splits)
    if settings.fid:
        settings.fid_dims = pick_fid_dims(fid_dims, n_min)
    if settings.sfid:
        grid = pick_sfid_grid(sfid_grid, n_min)
        if grid is None:
            settings.sfid = False
            skipped["sfid"] = f"sFID skipped: {n_min} images per split are too few even for a 2x2 grid (29 needed)"
        else:
            settings.sfid_grid = grid
    try:
        settings.clip_path = str(resolve_clip(clip))
    except ClipUnavailable as e:
        settings.clip_path = None
        skipped["clip_score"] = str(e)
    if settings.lpips and lpips_unavailable_reason() is not None:
        settings.lpips = False
        skipped["lpips"] = lpips_unavailable_reason()
    if not settings.real_images:
        skipped["fid_to_real"] = "FID to real: no --real-images folder given"
    features = {}
    if settings.fid:
        features["fid"] = describe(settings.fid_dims)
    if settings.sfid:
        features["sfid"] = describe("spatial", settings.sfid_grid)
    return EvaluationPlan(splits, methods, settings, skipped, features, baseline)
