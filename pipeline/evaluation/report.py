"""results.json, results.md (the paper's table layout plus a table of the extra
metrics, per split, and the paired tests against the baseline method) and one
PNG grid per method (FP row above the method's row, per split, same prompts and
seeds). Every table says how many images and prompts stand behind its numbers."""
from __future__ import annotations

import re
from pathlib import Path

from pipeline.artifacts import write_json_atomic, write_text_atomic
from pipeline.evaluation.statistics import DESCRIPTION, paired_difference
from pipeline.metrics.fidelity import SCORES
from pipeline.plots import save_grid

MAIN_COLUMNS = [("Method", "method"), ("Bit options", "bit_options"), ("FAB", "fab"), ("BitOPs (T)", "bitops_T"),
                ("FID", "fid_to_fp"), ("sFID", "sfid_to_fp"), ("CLIP score", "clip_score"),
                ("Images (prompts)", "images_prompts")]
EXTRA_COLUMNS = [("Method", "method"), ("FAB (unweighted)", "fab_unweighted"), ("FID to real", "fid_to_real"),
                 ("PSNR to FP (dB)", "psnr"), ("SSIM to FP", "ssim"), ("LPIPS to FP", "lpips"),
                 ("Size, artifact (bytes)", "size_bytes"), ("Size, artifact (MiB)", "size_mib"),
                 ("Size, arithmetic estimate (MiB)", "size_estimate_mib"),
                 ("s / image (generate)", "seconds_per_image"), ("s / image (metrics)", "metric_seconds_per_image"),
                 ("Images (prompts)", "images_prompts")]
PAIRED_COLUMNS = [("Method", "method"), ("Metric", "metric"), ("Mean difference", "mean_diff"),
                  ("95% CI", "ci"), ("Wilcoxon p", "p_wilcoxon"), ("Images (prompts)", "images_prompts")]
BETTER = {"psnr": "higher", "ssim": "higher", "lpips": "lower"}
METRIC_NAMES = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS"}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "method"


def _fmt(key: str, v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool) or isinstance(v, str):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if key == "bitops_T":
        return f"{v:.4g}"
    if key in ("seconds_per_image", "metric_seconds_per_image"):
        return f"{v:.3g}"
    if key in ("fid_to_fp", "sfid_to_fp", "fid_to_real") and abs(v) < 1:
        return f"{v:.3g}"  # near-identical sets: keep the digits that differ
    if key in ("ssim", "mean_diff"):
        return f"{v:.4f}"
    if key == "p_wilcoxon":
        return f"{v:.3g}"
    return f"{v:.2f}"


def _cell(key: str, r: dict) -> str:
    """A row's value, with its interval in brackets where the row has one (`<key>_ci_low/high`)."""
    if key == "images_prompts":
        return f"{r['n_images']} ({r['n_prompts']})" if r.get("n_prompts") is not None else _fmt(key, r.get("n_images"))
    if key == "metric":
        return METRIC_NAMES.get(r[key], r[key])
    if key == "ci":
        return f"[{_fmt('mean_diff', r['ci_low'])}, {_fmt('mean_diff', r['ci_high'])}]"
    text = _fmt(key, r.get(key))
    if r.get(f"{key}_ci_low") is not None:
        text += f" [{_fmt(key, r[f'{key}_ci_low'])}, {_fmt(key, r[f'{key}_ci_high'])}]"
    return text


def table(rows: list[dict], columns: list[tuple[str, str]], headers: dict | None = None) -> list[str]:
    headers = headers or {}
    lines = ["| " + " | ".join(headers.get(k, h) for h, k in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        r = {**r, **{f"{k}_mib": r[f"{k}_bytes"] / 2**20 if r.get(f"{k}_bytes") is not None else None
                     for k in ("size", "size_estimate")}}
        lines.append("| " + " | ".join(_cell(k, r) for _, k in columns) + " |")
    return lines


def write_markdown(path: Path, results: dict) -> Path:
    s, st = results["settings"], results["statistics"]
    fid_h = "FID" if s["fid_dims"] == 2048 else f"FID ({s['fid_dims']}-d)"
    sfid_h = "sFID" if s["sfid_grid"] == 17 else f"sFID ({s['sfid_grid']}x{s['sfid_grid']})"
    lines = [f"# QDiffBench: `{results['model']}`", "",
             f"{s['steps']} sampling steps, guidance {s['guidance']}, {results['world_size']} process(es). "
             f"FID and sFID are to the FP model's images for the same prompts and seeds (0 for FP by definition). "
             f"Image i of a split is prompt i // k with noise seed {results['seed']} + i; the prompts are drawn "
             f"with prompt seed {results['splits'][0]['prompt_seed']} whatever the noise seed.",
             "", f"- FID features: {results['feature_sets'].get('fid', 'off')}",
             f"- sFID features: {results['feature_sets'].get('sfid', 'off')}",
             f"- CLIP: {results['clip'] or 'n/a'}"]
    lines += [f"- skipped: {reason}" for reason in results["skipped"].values()]
    for split in results["splits"]:
        rows = [r for r in results["rows"] if r["split"] == split["name"]]
        lines += ["", f"## {split['name']}: {split['source']} ({split['n_prompts']} prompts x "
                      f"{split['images_per_prompt']} = {split['n_images']} images)", ""]
        lines += table(rows, MAIN_COLUMNS, {"fid_to_fp": fid_h, "sfid_to_fp": sfid_h})
        lines += [""]
        lines += table(rows, EXTRA_COLUMNS, {"fid_to_real": "FID to real" if s["fid_dims"] == 2048 else
                                             f"FID to real ({s['fid_dims']}-d)"})
        lines += ["", "PSNR / SSIM / LPIPS: mean over images [95% bootstrap interval]."]
        paired = [p for p in results["paired"] if p["split"] == split["name"]]
        if paired:
            lines += ["", f"### Paired differences to {results['baseline']} (method - baseline, same images)", "",
                      f"Mean per-image difference, its 95% paired-bootstrap interval and the two-sided Wilcoxon "
                      f"signed-rank p-value ({st['n_resamples']} resamples of prompts, seed {st['seed']}; "
                      f"the test pairs per-prompt means). PSNR and SSIM: higher is better; LPIPS: lower.", ""]
            lines += table(paired, PAIRED_COLUMNS)
    lines += ["", "## Grids (top: FP32, below: the method; per split)", ""]
    lines += [f"- {label}: ![{label}]({name})" for label, name in results["grid_files"].items()]
    return write_text_atomic(path, "\n".join(lines) + "\n")


def write_grids(out: Path, grids: dict, splits: list[str], reference: str) -> dict[str, str]:
    """One PNG per non-reference method: for each split, the FP row then its row."""

    files = {}
    fp = grids.get(reference, {})
    for label, per_split in grids.items():
        if label == reference:
            continue
        rows, labels = [], []
        for split in splits:
            if split in per_split and split in fp:
                n = min(len(per_split[split]), len(fp[split]))
                rows += [fp[split][:n], per_split[split][:n]]
                labels += [f"{split[:6]} FP32", f"{split[:6]} quant"]
        if not rows:
            continue
        n = min(len(r) for r in rows)
        rows = [r[:n] for r in rows]
        name = f"grid_{slug(label)}.png"
        scale = 4 if rows[0].shape[1] <= 64 else (2 if rows[0].shape[1] <= 128 else 1)
        save_grid(rows, out / name, labels=labels, scale=scale)
        files[label] = name
    return files


def paired_tests(per_image: dict, splits, baseline: str | None) -> list[dict]:
    """Every method against `baseline` on every split and per-image score: the mean paired difference
    (method - baseline), its paired-bootstrap interval and the Wilcoxon p-value (pipeline.evaluation.statistics)."""
    out = []
    if baseline is None:
        return out
    for split in splits:
        base = per_image.get(baseline, {}).get(split.name)
        if base is None:
            continue
        prompts = [i // split.images_per_prompt for i in base["index"]]
        for label, per_split in per_image.items():
            mine = per_split.get(split.name)
            if label == baseline or mine is None:
                continue
            if mine["index"] != base["index"]:
                raise ValueError(f"{label} and {baseline} scored different images of split {split.name!r}: "
                                 f"paired tests need the same images")
            for metric in SCORES:
                if metric in mine and metric in base:
                    out.append({"split": split.name, "method": label, "baseline": baseline, "metric": metric,
                                "better": BETTER[metric],
                                **paired_difference(mine[metric], base[metric], prompts)})
    return out


def write_json(path: Path, results: dict) -> Path:
    return write_json_atomic(path, results, allow_nan=False)


def write_results(out: Path, model: str, plan, res: dict) -> str:
    """results.json, results.md and the grids of one evaluation (`res`: run_evaluation's
    return value); returns the markdown."""
    settings, splits = plan.settings, plan.splits
    results = {
        "model": model, "seed": splits[0].seed, "world_size": res["world_size"], "settings": vars(settings),
        "feature_sets": plan.features,
        "clip": settings.clip_path, "skipped": plan.skipped, "n_real_images": res["n_real_images"],
        "splits": [{"name": s.name, "source": s.source, "n_prompts": len(s.prompts),
                    "images_per_prompt": s.images_per_prompt, "n_images": s.n_images, "seed": s.seed,
                    "prompt_seed": s.prompt_seed, "prompts": s.prompts} for s in splits],
        "methods": res["methods"], "rows": res["rows"], "wall_seconds": res["wall_seconds"],
        "statistics": DESCRIPTION, "baseline": plan.baseline,
        "paired": paired_tests(res["per_image"], splits, plan.baseline),
        # split -> method -> {"index": image indices, "psnr": [...], ...}: what the intervals and tests resample
        "per_image": {s.name: {label: v[s.name] for label, v in res["per_image"].items() if v.get(s.name)}
                      for s in splits},
    }
    results["grid_files"] = write_grids(out, res["grids"], [s.name for s in splits], reference="FP32")
    write_json(out / "results.json", results)
    return write_markdown(out / "results.md", results).read_text()
