"""`python -m pipeline.fit evaluate`: QDiffBench for the FP model and quantized
states: FID / sFID to the FP images (same prompts and seeds), CLIP score,
PSNR / SSIM (/ LPIPS) to FP, FID to real images, FAB, BitOPs, size, time.

Writes <run-dir>/evaluate/{results.json, results.md, grid_<method>.png,
manifest.json}. See docs/evaluation.md."""
from __future__ import annotations

AUTO = "auto"
USES_TRAINER = True


def add_arguments(parser) -> None:
    parser.add_argument("--quant-states", type=list[str], default=[],
                        help="calibrate output folders (quant_state.safetensors + quant_config.json) to evaluate")
    parser.add_argument("--labels", type=list[str] | None, default=None, help="table names of --quant-states")
    parser.add_argument("--in-domain", type=str, default=AUTO,
                        help="in-domain prompts: 'world[:split]', 'builtin', a .txt/.jsonl file; "
                             "auto = world:val on the embedded model, else builtin")
    parser.add_argument("--generalization", type=str | None, default=None,
                        help="prompt-generalization prompts (another style than calibration), same syntax")
    parser.add_argument("--n", type=int, default=128, help="prompts per split")
    parser.add_argument("--images-per-prompt", type=int, default=1, help="seeds per prompt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--resolution", type=int | None, default=None, help="pixels; default: the model's own")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")
    parser.add_argument("--fid", type=bool, default=True, help="FID to FP (and to --real-images)")
    parser.add_argument("--fid-dims", type=str, default=AUTO,
                        help="Inception features: 2048 (standard) | 768 | 192 | 64 (low-rank) | auto = the "
                             "largest the image count supports (n > dims)")
    parser.add_argument("--sfid", type=bool, default=True, help="sFID to FP")
    parser.add_argument("--sfid-grid", type=str, default=AUTO,
                        help="17 (standard, 2023 dims) | 2..16 (mixed_6/conv[:7] pooled to GxG, low-rank) | auto")
    parser.add_argument("--clip", type=str, default=AUTO,
                        help="CLIPModel folder for the CLIP score; auto = checkpoints/tiny-world/clip; none")
    parser.add_argument("--lpips", type=bool, default=True, help="LPIPS to FP where its weights are on disk")
    parser.add_argument("--real-images", type=str | None, default=None, help="folder of real images (FID to real)")
    parser.add_argument("--grid-n", type=int, default=8, help="images per split in each method's grid")


def pick_fid_dims(option: str, n_min: int) -> int:
    from pipeline.metrics.frechet import check_enough_images, min_images
    from pipeline.metrics.inception import POOL_DIMS

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
    from pipeline.metrics.frechet import min_images
    from pipeline.metrics.inception import SPATIAL_SIDE, feature_dims

    if option != AUTO:
        try:
            return int(option)
        except ValueError:
            raise ValueError(f"--sfid-grid {option!r} must be an integer in 1..17 or 'auto'") from None
    return next((g for g in range(SPATIAL_SIDE, 1, -1) if n_min >= min_images(feature_dims("spatial", g))), None)


def build(cfg):
    """Splits, methods and settings from the flags (cheap: nothing generated)."""
    from pipeline.evaluation.methods import method_from_state, unique_labels
    from pipeline.evaluation.settings import EvalSettings
    from pipeline.evaluation.splits import load_split
    from pipeline.metrics.clip import ClipUnavailable, resolve_clip
    from pipeline.metrics.fidelity import lpips_unavailable_reason
    from pipeline.metrics.inception import describe
    from pipeline.models import EMBEDDED, default_model

    skipped = {}
    model = cfg.model
    in_domain = cfg.in_domain
    if in_domain == AUTO:
        in_domain = "world:val" if (model or default_model()) == EMBEDDED else "builtin"
    splits = [load_split("in_domain", in_domain, cfg.n, cfg.images_per_prompt, cfg.seed)]
    if cfg.generalization:
        splits.append(load_split("generalization", cfg.generalization, cfg.n, cfg.images_per_prompt, cfg.seed))
    else:
        skipped["generalization"] = "prompt generalization: no --generalization split given"

    labels = list(cfg.labels or [])
    if labels and len(labels) != len(cfg.quant_states):
        raise ValueError(f"--labels has {len(labels)} names for {len(cfg.quant_states)} --quant-states")
    methods = [method_from_state(p, labels[i] if labels else None) for i, p in enumerate(cfg.quant_states)]
    unique_labels(methods)

    n_min = min(s.n_images for s in splits)
    fid, sfid = cfg.fid, cfg.sfid
    fid_dims = pick_fid_dims(cfg.fid_dims, n_min) if fid else 2048
    sfid_grid = pick_sfid_grid(cfg.sfid_grid, n_min) if sfid else 17
    if sfid and sfid_grid is None:
        sfid, sfid_grid = False, 17
        skipped["sfid"] = f"sFID skipped: {n_min} images per split are too few even for a 2x2 grid (29 needed)"
    try:
        clip_path = str(resolve_clip(cfg.clip))
    except ClipUnavailable as e:
        clip_path = None
        skipped["clip_score"] = str(e)
    lpips = bool(cfg.lpips) and lpips_unavailable_reason() is None
    if cfg.lpips and not lpips:
        skipped["lpips"] = lpips_unavailable_reason()
    if not cfg.real_images:
        skipped["fid_to_real"] = "FID to real: no --real-images folder given"
    settings = EvalSettings(steps=cfg.steps, guidance=cfg.guidance, resolution=cfg.resolution, fid=fid,
                            fid_dims=fid_dims, sfid=sfid, sfid_grid=sfid_grid, clip_path=clip_path, lpips=lpips,
                            real_images=cfg.real_images, grid_n=cfg.grid_n)
    features = {}
    if fid:
        features["fid"] = describe(fid_dims)
    if sfid:
        features["sfid"] = describe("spatial", sfid_grid)
    return splits, methods, settings, skipped, features


def run(cfg):
    from pipeline.evaluation.report import write_grids, write_json, write_markdown
    from pipeline.evaluation.runner import run_evaluation, validate
    from pipeline.models import default_model
    from pipeline.runs import prepare_artifact, write_manifest

    import lightning as L

    model = cfg.model or default_model()
    splits, methods, settings, skipped, features = build(cfg)
    validate(model, methods, splits, settings, cfg.allow_download)
    out = prepare_artifact(cfg.run_dir, "evaluate", cfg.overwrite)
    L.seed_everything(cfg.seed, verbose=False)
    trainer_kwargs = {k: v for k, v in vars(cfg.trainer).items() if v is not None}
    res = run_evaluation(model, methods, splits, settings, cfg.batch_size, trainer_kwargs, cfg.allow_download)
    if not res["is_global_zero"]:
        return out
    results = {
        "model": model, "world_size": res["world_size"], "settings": vars(settings), "feature_sets": features,
        "clip": settings.clip_path, "skipped": skipped, "n_real_images": res["n_real_images"],
        "splits": [{"name": s.name, "source": s.source, "n_prompts": len(s.prompts),
                    "images_per_prompt": s.images_per_prompt, "n_images": s.n_images, "seed": s.seed,
                    "prompts": s.prompts} for s in splits],
        "methods": res["methods"], "rows": res["rows"], "wall_seconds": res["wall_seconds"],
    }
    results["grid_files"] = write_grids(out, res["grids"], [s.name for s in splits], reference="FP32")
    write_json(out / "results.json", results)
    md = write_markdown(out / "results.md", results)
    write_manifest(out, "evaluate", cfg, {"rows": res["rows"]})
    print(md.read_text())
    print(f"results -> {out}")
    return out
