"""Does text-awareness pay? QLIP against static controls at equal FAB, with paired statistics.

On one calibrated state (default: naive W8 with activation banks {4,6,8,16,32} on the embedded world, so that
activation bits visibly matter), for every target FAB:
- QLIP: T2Q -> Q2B (the q2b stage, --criterion t2q);
- text-blind Q2B: the same training with q constant (--criterion text-blind), a learned static table;
- random: random options at that FAB (the policy stage, --control random);
- with --criteria, Q2B on other quality sources: prompt length, the measured image complexity (an oracle: an FP
  generation per prompt) and T2C (a T2Q head trained on that complexity, `t2q --target complexity`);
- MixDQ: its static per-layer allocation at that FAB (sensitivity once, then the mixdq stage; --mixdq-probe-n 0
  leaves it out), once per --mixdq-sqnr-scales entry: "db" sums SQNR in dB as MixDQ publishes, "power" sums
  the noise power (the "MixDQ (power)" curve);
and, at the options themselves, uniform A_b (the policy stage, --control uniform).
Every method scores the same test prompts under the same noise seeds (one evaluate run per seed, FP reference
included), so each comparison is paired per image. Per FAB it records QLIP - text-blind (and - random) on
per-image PSNR and SSIM to FP: the mean, a 95% bootstrap interval over prompts and the Wilcoxon p; and
`qlip_beats_text_blind[fab]`: true when QLIP is higher with p < 0.05, and null when the two *achieved* FABs
differ by more than FAB_TOLERANCE (Q2B steers to its target; it does not always reach it). "Equal" is an
equivalence reading: the interval contains 0 and lies within +-margin (`statistics.verdict`). FID to FP is
given per seed with its spread. Writes benchmarks/results/qlip_pareto.json and qlip_pareto.png.

    python benchmarks/qlip_pareto.py                                  # the issue's setting (>= 200 x 3 seeds)
    python benchmarks/qlip_pareto.py --n 8 --seeds 1 --fabs 8 --q2b-epochs 1 --work runs/bench/pareto_smoke \\
        --out /tmp/pareto.json                                        # smoke
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.api import (  # noqa: E402
    CalibrateConfig,
    EvaluateConfig,
    MixDQConfig,
    PolicyConfig,
    Q2BConfig,
    ScoreConfig,
    SensitivityConfig,
    T2QConfig,
    calibrate,
    evaluate,
    mixdq,
    policy,
    q2b,
    score,
    sensitivity,
    t2q,
)
from pipeline.evaluation.statistics import mean_ci, paired_difference, verdict  # noqa: E402
from pipeline.plots import plot_quality_vs_fab  # noqa: E402

METRICS = ("psnr", "ssim")
MARGIN = {"psnr": 0.25, "ssim": 0.005}  # dB and SSIM units: differences below these are not worth bits
FAMILIES = {"t2q": "QLIP", "text-blind": "text-blind Q2B", "length": "length Q2B",
            "complexity": "complexity Q2B (oracle)", "t2c": "T2C Q2B"}  # --criteria -> the curve's name
FAB_TOLERANCE = 0.5  # achieved FABs further apart than this are not "equal bits": no verdict (None)


def done(folder: Path) -> bool:
    return (folder / "manifest.json").is_file()


def stage(fn, config, folder: Path, **kw) -> Path:
    """Run a stage into folder's parent unless its artifact is finished (a rerun resumes the sweep)."""
    if done(folder):
        return folder
    config.run_dir = str(folder.parent)
    fn(config, **kw)
    return folder


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--method", default="naive", help="calibration method of the base state")
    ap.add_argument("--w-bits", type=int, default=8)
    ap.add_argument("--bit-options", default="4,6,8,16,32")
    ap.add_argument("--fabs", default="6,8,10,12", help="target FABs of the sweep")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cali-n", type=int, default=16)
    ap.add_argument("--t2q", default=None, help="a T2Q folder trained at --steps (default: score + t2q here)")
    ap.add_argument("--score-n", type=int, default=240)
    ap.add_argument("--q2b-n", type=int, default=32)
    ap.add_argument("--q2b-epochs", type=int, default=8)
    ap.add_argument("--criteria", default="t2q,text-blind",
                    help="Q2B quality sources to sweep: t2q (QLIP) and text-blind always; also length, complexity "
                         "(oracle), t2c")
    ap.add_argument("--mixdq-probe-n", type=int, default=1,
                    help="probe prompts of MixDQ's sensitivity pass (0: no MixDQ control)")
    ap.add_argument("--mixdq-sqnr-scales", default="db,power",
                    help="the mixdq stage's --sqnr-scale per MixDQ curve: db (as published), power")
    ap.add_argument("--n", type=int, default=210, help="test prompts asked for (210 draws 201 distinct world "
                                                       "test prompts: duplicates are dropped)")
    ap.add_argument("--seeds", type=int, default=3, help="noise seeds (one evaluate run each)")
    ap.add_argument("--batch-size", type=int, default=8, help="evaluation batch of the static methods")
    ap.add_argument("--text-aware-batch-size", type=int, default=1,
                    help="QLIP's generation calls inside each batch; a call runs the max of its prompts' bits, so "
                         "1 gives every prompt its own FAB")
    ap.add_argument("--real-images", default="world:1000", help="FID to real: a folder, world:N, or none")
    ap.add_argument("--work", default="runs/bench/qlip_pareto")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "qlip_pareto.json"))
    a = ap.parse_args(argv)
    t0 = time.time()
    work = Path(a.work)
    options = [int(b) for b in a.bit_options.split(",")]
    fabs = [float(f) for f in a.fabs.split(",")]
    common = {"model": a.model, "overwrite": False}
    base = stage(calibrate, CalibrateConfig(**common, method=a.method, w_bits=a.w_bits, a_bits=8,
                                            a_bit_options=a.bit_options, steps=a.steps, cali_n=a.cali_n,
                                            cali_st=min(5, a.steps), prompts="world"), work / "base" / "quant")
    t2q_dir = Path(a.t2q) if a.t2q else stage(t2q, T2QConfig(**common, scored=str(stage(
        score, ScoreConfig(**common, prompts="world", limit=a.score_n, split_fractions="0.8,0.2,0", n_reference=300,
                           steps=a.steps), work / "scored" / "scored")), richness=False), work / "t2q" / "t2q")
    quiet = {"trainer": {"enable_progress_bar": False}}
    criteria = ["t2q", "text-blind"] + [c for c in a.criteria.split(",") if c not in ("t2q", "text-blind")]
    unknown = sorted(set(criteria) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"--criteria {a.criteria!r}: unknown {unknown}; choose from {', '.join(FAMILIES)}")
    heads = {"t2q": t2q_dir}
    if "t2c" in criteria:  # the same scored set, the FP images' complexity as the target
        scored = json.loads((t2q_dir / "t2q.json").read_text())["scored"]
        heads["t2c"] = stage(t2q, T2QConfig(**common, scored=scored, target="complexity", richness=False),
                             work / "t2c" / "t2q")
    methods: dict[str, dict] = {}  # label -> {"path", "family", "target"}
    for f in fabs:
        for criterion in criteria:
            family = FAMILIES[criterion]
            folder = work / f"{criterion}_fab{f:g}" / "q2b"
            stage(q2b, Q2BConfig(**common, quant_state=str(base), criterion="t2q" if criterion in heads else criterion,
                                 t2q=str(heads[criterion]) if criterion in heads else None, target_fab=f,
                                 prompts="world", n=a.q2b_n, val_n=0, epochs=a.q2b_epochs), folder, **quiet)
            methods[f"{family} @{f:g}"] = {"path": folder, "family": family, "target": f}
        folder = stage(policy, PolicyConfig(**common, quant_state=str(base), control="random", target_fab=f),
                       work / f"random_fab{f:g}" / "policy")
        methods[f"random @{f:g}"] = {"path": folder, "family": "random", "target": f}
    if a.mixdq_probe_n:  # MixDQ's static allocation: one sensitivity pass, one integer program per FAB
        sens = stage(sensitivity, SensitivityConfig(**common, quant_state=str(base), n=a.mixdq_probe_n,
                                                    prompts="world", steps=a.steps), work / "sensitivity" /
                     "sensitivity")
        for scale in a.mixdq_sqnr_scales.split(","):
            name, family = ("mixdq", "MixDQ") if scale == "db" else (f"mixdq-{scale}", f"MixDQ ({scale})")
            for f in fabs:
                folder = stage(mixdq, MixDQConfig(**common, sensitivity=str(sens), quant_state=str(base),
                                                  w_budget=float(a.w_bits), a_budget=f, steps=a.steps,
                                                  sqnr_scale=scale), work / f"{name}_fab{f:g}" / "mixdq")
                methods[f"{family} @{f:g}"] = {"path": folder, "family": family, "target": f}
    for b in options:
        if b < 32 and min(fabs) - 2 <= b <= max(fabs) + 4:
            folder = stage(policy, PolicyConfig(**common, quant_state=str(base), control="uniform", bits=b),
                           work / f"uniform_a{b}" / "policy")
            methods[f"uniform A{b}"] = {"path": folder, "family": "uniform", "target": float(b)}

    labels = list(methods)
    runs = []
    for seed in range(a.seeds):
        folder = stage(evaluate, EvaluateConfig(**common, seed=seed, quant_states=[str(m["path"]) for m in
                                                                                   methods.values()],
                                                labels=labels, in_domain="world:test", n=a.n, steps=a.steps,
                                                batch_size=a.batch_size,
                                                text_aware_batch_size=a.text_aware_batch_size, fid=a.n >= 65,
                                                sfid=False, grid_n=4,
                                                real_images=None if a.real_images == "none" or a.n < 65
                                                else a.real_images),
                       work / f"evaluate_seed{seed}" / "evaluate", **quiet)
        runs.append(json.loads((folder / "results.json").read_text()))
    result = summarize(runs, methods, fabs, a)
    result["seconds"] = time.time() - t0
    write(result, Path(a.out))
    return result


def pooled(runs: list[dict], label: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-image values of `label` over every seed's run, and each image's prompt (the bootstrap's group)."""
    values, groups = [], []
    for run in runs:
        split = run["splits"][0]
        per = run["per_image"][split["name"]][label]
        values += per[metric]
        groups += [i // split["images_per_prompt"] for i in per["index"]]
    return np.asarray(values), np.asarray(groups)


def summarize(runs: list[dict], methods: dict, fabs: list[float], a) -> dict:
    rows = {}
    for label, m in methods.items():
        per_seed = [next(r for r in run["rows"] if r["method"] == label) for run in runs]
        row = {"family": m["family"], "target_fab": m["target"], "fab": float(np.mean([r["fab"] for r in per_seed])),
               "fid_to_fp_per_seed": [r.get("fid_to_fp") for r in per_seed]}
        for metric in METRICS:
            v, g = pooled(runs, label, metric)
            mean, lo, hi = mean_ci(v, g)
            row[metric] = {"mean": mean, "low": lo, "high": hi}
        row["n_images"], row["n_prompts"] = int(v.size), int(np.unique(g).size)
        row["fid_to_real_per_seed"] = [r.get("fid_to_real") for r in per_seed]
        for key in ("fid_to_fp", "fid_to_real"):  # set statistics: their spread over the seeds
            fids = [f for f in row[f"{key}_per_seed"] if f is not None]
            if fids:
                row[key] = {"mean": float(np.mean(fids)), "min": float(min(fids)), "max": float(max(fids)),
                            "std": float(np.std(fids, ddof=1)) if len(fids) > 1 else 0.0}
        rows[label] = row
    comparisons, beats, unmatched = [], {}, {}
    for f in fabs:
        q = f"QLIP @{f:g}"
        controls = [label for label, m in methods.items() if m["target"] == f and m["family"] not in ("QLIP",
                                                                                                       "uniform")]
        for control in controls:
            for metric in METRICS:
                qa, g = pooled(runs, q, metric)
                cb, _ = pooled(runs, control, metric)
                p = paired_difference(qa, cb, g)
                comparisons.append({"target_fab": f, "method": q, "control": control, "metric": metric,
                                    "fab_method": rows[q]["fab"], "fab_control": rows[control]["fab"],
                                    **p, "margin": MARGIN[metric], "verdict": verdict(p, MARGIN[metric])})
        psnr = next(c for c in comparisons if c["target_fab"] == f and c["control"].startswith("text-blind")
                    and c["metric"] == "psnr")
        gap = psnr["fab_method"] - psnr["fab_control"]
        # equal bits or no claim: a QLIP run that spent more bits than its control is not evidence for it
        beats[f"{f:g}"] = bool(psnr["mean_diff"] > 0 and psnr["p_wilcoxon"] < 0.05) if abs(gap) <= FAB_TOLERANCE \
            else None
        unmatched.update({f"{f:g}": gap} if abs(gap) > FAB_TOLERANCE else {})
    split = runs[0]["splits"][0]
    return {"model": a.model, "base": {"method": a.method, "w_bits": a.w_bits, "bit_options": a.bit_options},
            "t2q": a.t2q, "real_images": a.real_images, "steps": a.steps, "seeds": a.seeds,
            "n_prompts": split["n_prompts"], "prompt_source": split["source"],
            "mixdq_probe_n": a.mixdq_probe_n, "mixdq_sqnr_scales": a.mixdq_sqnr_scales, "eval_batch": a.batch_size,
            "text_aware_batch": a.text_aware_batch_size, "q2b": {"n": a.q2b_n, "epochs": a.q2b_epochs},
            "criterion": "QLIP beats the text-blind control at a FAB when its per-image PSNR to FP is higher, "
                         "Wilcoxon p < 0.05 (per-prompt means, prompts pooled over seeds), at achieved FABs within "
                         "fab_tolerance (else null); equal = the 95% interval contains 0 and lies within +-margin",
            "fab_tolerance": FAB_TOLERANCE, "fab_gap_qlip_minus_text_blind_unmatched": unmatched,
            "rows": rows, "comparisons": comparisons, "qlip_beats_text_blind": beats}


def write(result: dict, out: Path) -> None:
    curves: dict[str, list] = {}
    for label, row in result["rows"].items():
        curves.setdefault(row["family"], []).append({"fab": row["fab"], **row["psnr"]})
    uniform = curves.pop("uniform", [])
    for point in uniform:  # one marker per option: the static points of the curve
        curves[f"uniform A{point['fab']:g}"] = [point]
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_quality_vs_fab(curves, out.with_suffix(".png"),
                        title=f"{result['model']}: {result['n_prompts']} test prompts x {result['seeds']} seeds, "
                              f"95% bootstrap bands")
    out.write_text(json.dumps(result, indent=1))
    print("| method | FAB | PSNR to FP (95% CI) | SSIM | FID to FP (seed min..max) | images (prompts) |")
    print("|---|---|---|---|---|---|")
    for label, r in result["rows"].items():
        fid = r.get("fid_to_fp")
        print(f"| {label} | {r['fab']:.2f} | {r['psnr']['mean']:.2f} [{r['psnr']['low']:.2f}, {r['psnr']['high']:.2f}]"
              f" | {r['ssim']['mean']:.4f} | " + (f"{fid['mean']:.4f} ({fid['min']:.4f}..{fid['max']:.4f})" if fid
                                                    else "-") + f" | {r['n_images']} ({r['n_prompts']}) |")
    print("\n| FAB | QLIP - control | metric | mean diff [95% CI] | Wilcoxon p | verdict |\n|---|---|---|---|---|---|")
    for c in result["comparisons"]:
        print(f"| {c['target_fab']:g} | {c['control']} | {c['metric']} | {c['mean_diff']:+.4f} "
              f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] | {c['p_wilcoxon']:.3g} | {c['verdict']} |")
    print(f"qlip_beats_text_blind: {result['qlip_beats_text_blind']}  -> {out}")


if __name__ == "__main__":
    main()
