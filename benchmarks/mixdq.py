"""MixDQ on the embedded world: allocators compared at equal average weight bits and equal FAB (issue 19).

    python benchmarks/mixdq.py                           # the issue's setting (slow: see --help)
    python benchmarks/mixdq.py --steps 4 --probe-n 1 --eval-n 80 --val-n 0 --random-seeds 2 --no-bos-variant  # small

One naive calibration with weight options 2,4,8 and activation options 4,8,16 (BOS-aware K/V, and optionally a
second one without), the sensitivity stage on every layer, then per point (W4.0 with A8.0, and with A6.0) the
mixdq stage per allocator: uniform, random (median over seeds), sorting, sqnr-only, MixDQ (ilp), MixDQ without
BOS-aware, and MixDQ with --sqnr-scale power ("mixdq-power"). One evaluate run per point scores them all:
paired SSIM/PSNR to FP against uniform (mean difference, 95% paired-bootstrap CI, Wilcoxon p), FID to FP,
BitOPs, size, s/image. Also: the per-layer-type group table, the text encoder's BOS outlier ratio, and the
sensitivity stage's time. Writes --out (JSON) as it goes; a rerun resumes its finished stages.

"reproducibility" (--repro-n > 0): the sensitivity measured again on two disjoint probe sets of --repro-n train
prompts each (sensitivity --probe-set 0 and 1, other noise seeds too), at --repro-w-bits / --repro-a-bits only,
and the Spearman correlation of the per-layer scores across the sets per metric (the issue's acceptance: >= 0.8
at the lowest candidate bit). --repro-only measures just that:

  python benchmarks/mixdq.py --steps 4 --cali-n 8 --repro-n 2 --repro-only --out benchmarks/results/mixdq_repro.json
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.prompts import draw_prompts  # noqa: E402
from pipeline.api import (  # noqa: E402
    CalibrateConfig,
    EvaluateConfig,
    MixDQConfig,
    SensitivityConfig,
    calibrate,
    evaluate,
    mixdq,
    sensitivity,
)
from pipeline.evaluation.statistics import paired_difference  # noqa: E402
from pipeline.mixdq.sensitivity import probe_agreement  # noqa: E402
from pipeline.models import load_pipeline  # noqa: E402

LAYER_TYPES = (("cross-attention", r"\.attn2\."), ("FFN", r"\.ff\."), ("self-attention", r"\.attn1\."),
               ("convolution", r"(conv|downsamplers|upsamplers)"), ("other", r"."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--work", default="runs/bench_mixdq")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mixdq.json"))
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--cali-n", type=int, default=16)
    p.add_argument("--probe-n", type=int, default=4, help="sensitivity probe prompts")
    p.add_argument("--a-candidates", default="4,8", help="activation bits the sensitivity measures")
    p.add_argument("--eval-n", type=int, default=128, help="test prompts per evaluation")
    p.add_argument("--val-n", type=int, default=4, help="val prompts that pick MixDQ's group split")
    p.add_argument("--random-seeds", type=int, default=8)
    p.add_argument("--w-budget", type=float, default=4.0)
    p.add_argument("--a-budgets", default="8,6")
    p.add_argument("--no-bos-variant", action="store_true", help="skip the calibration without BOS-aware K/V")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: no oversubscription on a busy CPU)")
    p.add_argument("--repro-n", type=int, default=4, help="prompts per disjoint probe set of the reproducibility "
                   "measurement (0: skip it)")
    p.add_argument("--repro-w-bits", default="2", help="weight candidates of the reproducibility measurement")
    p.add_argument("--repro-a-bits", default="4", help="activation candidates of the reproducibility measurement")
    p.add_argument("--repro-layers", default=None, help="regex: the layers of the reproducibility measurement "
                   "(default: all)")
    p.add_argument("--repro-only", action="store_true", help="measure only the reproducibility (one BOS-aware "
                   "calibration, two sensitivity runs), not the allocators")
    return p.parse_args(argv)


def bos_outlier_ratio(model: str, prompts: list[str]) -> dict:
    """Max |hidden| of the BOS token over the median, across the other (non-padding) tokens, of their max."""
    pipe = load_pipeline(model)
    tok = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = pipe.text_encoder(tok.input_ids).last_hidden_state.abs()
    bos = float(h[:, 0].amax())
    lengths = tok.attention_mask.sum(1)
    others = torch.cat([h[i, 1:int(n)].amax(dim=-1) for i, n in enumerate(lengths)])
    return {"bos_max": bos, "other_tokens_median_max": float(others.median()),
            "ratio": bos / float(others.median()), "prompts": len(prompts)}


def group_table(rec: dict) -> list[dict]:
    """Per layer type: count, group, mean SSIM and SQNR at the lowest weight and activation candidates."""
    cands = rec["candidates"]
    lows = [min((c for c in cands if c[0] == k), key=lambda c: int(c[1:]), default=None) for k in ("w", "a")]
    rows, left = [], list(rec["layers"])
    for name, pattern in LAYER_TYPES:
        mine = [n for n in left if re.search(pattern, n)]
        left = [n for n in left if n not in mine]
        if not mine:
            continue
        row = {"type": name, "layers": len(mine), "groups": sorted({rec["groups"][n] for n in mine})}
        for c in lows:
            if c:
                row[f"ssim_{c}"] = statistics.fmean(rec["ssim"][n][c] for n in mine)
                row[f"sqnr_{c}"] = statistics.fmean(rec["sqnr"][n][c] for n in mine)
        rows.append(row)
    return rows


def reproducibility(a, common: dict, state: Path, work: Path) -> dict:
    """The sensitivity on probe sets 0 and 1 (disjoint prompts and seeds) and their per-metric Spearman."""
    recs, seconds = [], []
    for k in (0, 1):
        out = sensitivity(SensitivityConfig(**common, run_dir=str(work / f"set{k}"), quant_state=str(state),
                                            n=a.repro_n, probe_set=k, w_bit_options=a.repro_w_bits,
                                            a_bit_options=a.repro_a_bits, layers=a.repro_layers, steps=a.steps))
        recs.append(json.loads((out / "sensitivity.json").read_text()))
        seconds.append(recs[-1]["seconds"])
    return {"spearman": probe_agreement(*recs), "probe_n": a.repro_n, "candidates": recs[0]["candidates"],
            "prompts": [r["signature"]["prompts"] for r in recs], "seeds": [r["signature"]["seeds"] for r in recs],
            "steps": recs[0]["signature"]["steps"], "sensitivity_seconds": seconds, "threshold": 0.8}


PAIRS = [("mixdq-power", "mixdq"), ("mixdq-power", "sorting"), ("mixdq", "mixdq-no-bos")]  # beyond "vs uniform"


def between(res: dict, pairs) -> list[dict]:
    """Paired PSNR / SSIM differences a - b on the same images (per-prompt bootstrap CI, Wilcoxon p), from an
    evaluate run's per-image scores; pairs with a method the run lacks are skipped."""
    split = res["splits"][0]
    per = res["per_image"][split["name"]]
    out = []
    for a, b in pairs:
        if a not in per or b not in per:
            continue
        groups = [i // split["images_per_prompt"] for i in per[a]["index"]]
        for metric in ("psnr", "ssim"):
            d = paired_difference(per[a][metric], per[b][metric], groups)
            out.append({"method": a, "control": b, "metric": metric,
                        **{k: d[k] for k in ("mean_diff", "ci_low", "ci_high", "p_wilcoxon")}})
    return out


def stage(fn, config, name: str) -> Path:
    """Run a stage into config.run_dir unless its `name` folder already finished (then reuse it): an interrupted
    benchmark resumes where it stopped (the stages resume their own partial work)."""
    folder = Path(config.run_dir) / name
    return folder if (folder / "manifest.json").is_file() else Path(fn(config))


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    result = {"args": vars(a), "points": {}}

    def save():
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1))

    common = dict(model=a.model, overwrite=False)  # a rerun resumes: finished stages are reused (`stage`)
    states, records = {}, {}
    for bos in ([True] if a.no_bos_variant or a.repro_only else [True, False]):
        run = work / ("bos" if bos else "nobos")
        t0, reused = time.time(), (run / "quant" / "manifest.json").is_file()
        states[bos] = stage(calibrate, CalibrateConfig(**common, run_dir=str(run), method="naive", w_bits=8,
                                                       w_bit_options="2,4,8", a_bits=8, a_bit_options="4,8,16",
                                                       bos_aware=bos, cali_n=a.cali_n, steps=a.steps), "quant")
        t1 = time.time()
        if a.repro_only:
            result["calibrate_seconds"] = t1 - t0
            break
        records[bos] = stage(sensitivity, SensitivityConfig(**common, run_dir=str(run), quant_state=str(states[bos]),
                                                            n=a.probe_n, a_bit_options=a.a_candidates), "sensitivity")
        rec = json.loads((records[bos] / "sensitivity.json").read_text())
        result[f"sensitivity_{'bos' if bos else 'nobos'}"] = {
            "calibrate_seconds": None if reused else t1 - t0, "sensitivity_seconds": rec["seconds"],
            "layers": len(rec["layers"]), "candidates": rec["candidates"], "group_table": group_table(rec)}
        save()
    if a.repro_n:
        result["reproducibility"] = reproducibility(a, common, states[True], work / "reproducibility")
        save()
        print(json.dumps(result["reproducibility"]["spearman"], indent=1))
    if a.repro_only:
        return
    test = draw_prompts("world", "train", 32, seed=1).prompts
    result["bos_outlier_ratio"] = bos_outlier_ratio(a.model, test)
    save()

    for a_budget in [float(b) for b in a.a_budgets.split(",")]:
        point = f"W{a.w_budget:g}A{a_budget:g}"
        folders, labels = [], []

        def alloc(label, allocator, bos=True, seed=0, val_n=0, sqnr_scale="db"):
            run = work / point / label
            out = stage(mixdq, MixDQConfig(**common, run_dir=str(run), sensitivity=str(records[bos]),
                                           quant_state=str(states[bos]), w_budget=a.w_budget, a_budget=a_budget,
                                           allocator=allocator, seed=seed, val_n=val_n, sqnr_scale=sqnr_scale),
                        "mixdq")
            folders.append(str(out))
            labels.append(label)

        alloc("uniform", "uniform")
        for s in range(a.random_seeds):
            alloc(f"random{s}", "random", seed=s)
        alloc("sorting", "sorting")
        alloc("sqnr-only", "sqnr-only")
        if not a.no_bos_variant:
            alloc("mixdq-no-bos", "ilp", bos=False, val_n=a.val_n)
        alloc("mixdq", "ilp", val_n=a.val_n)
        alloc("mixdq-power", "ilp", val_n=a.val_n, sqnr_scale="power")  # the noise-power objective (docs/mixdq.md)
        t0 = time.time()
        ev = stage(evaluate, EvaluateConfig(**common, run_dir=str(work / point), quant_states=folders, labels=labels,
                                            n=a.eval_n, baseline="uniform", steps=a.steps, sfid=False), "evaluate")
        res = json.loads((ev / "results.json").read_text())
        rows = {r["method"]: r for r in res["rows"]}
        paired = {(p["method"], p["metric"]): p for p in res["paired"]}
        table = {}
        for label in ["FP32"] + labels:
            r = rows.get(label, {})
            table[label] = {k: r.get(k) for k in ("bit_options", "fab", "bitops_T", "size_bytes", "fid_to_fp",
                                                  "psnr", "psnr_ci_low", "psnr_ci_high", "ssim", "ssim_ci_low",
                                                  "ssim_ci_high", "seconds_per_image")}
            for metric in ("psnr", "ssim"):
                p = paired.get((label, metric))
                if p:
                    table[label][f"{metric}_vs_uniform"] = {k: p[k] for k in ("mean_diff", "ci_low", "ci_high",
                                                                               "p_wilcoxon")}
        randoms = [table[f"random{s}"] for s in range(a.random_seeds)]
        table["random (median)"] = {m: statistics.median(r[m] for r in randoms) for m in ("psnr", "ssim", "fid_to_fp")
                                    if all(r.get(m) is not None for r in randoms)}
        result["points"][point] = {"table": table, "evaluate_seconds": time.time() - t0,
                                   "evaluate": str(ev), "paired": between(res, PAIRS)}
        save()
    print(json.dumps({p: {k: (v.get("psnr"), v.get("ssim")) for k, v in d["table"].items()}
                      for p, d in result["points"].items()}, indent=1))


if __name__ == "__main__":
    main()
