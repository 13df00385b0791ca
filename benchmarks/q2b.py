"""QLIP (T2Q + Q2B) acceptance figures and ablations on one model (issue 7).

    python benchmarks/q2b.py --t2q runs/t2q/t2q            # the embedded world, T2Q as quality
    python benchmarks/q2b.py --criterion length            # no T2Q yet: prompt length stands in

Everything goes through the stages, into --work (default runs/bench/q2b); a
step whose artifact exists is skipped, so a rerun resumes:
  qdiff/quant, ptqd/quant   Q-Diffusion / PTQD W4A16 with activation banks {6,8,16,32}
  q2b_<name>/q2b            Q2B: the main {8,16,32} on each base; bit options (Table S4)
                            and selection criteria (Table S3) on Q-Diffusion
  eval_seed<k>/evaluate     the evaluate stage on world:val, seeds 0..--seeds-1
Then: the paper's table (FID mean and seed spread), the acceptance checks,
Tables S3/S4, the richness table (caption -> FAB), Fig. S1 (batch size), the
layer-wise bit shares (Fig. S3), memory and overhead. Writes results.md,
results.json and the figures into --work."""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.prompts import draw_prompts  # noqa: E402
from pipeline.api import CalibrateConfig, EvaluateConfig, Q2BConfig, calibrate, evaluate, q2b  # noqa: E402
from pipeline.plots import plot_bit_heatmaps, plot_bit_shares, plot_fab_vs_batch_size  # noqa: E402
from pipeline.qlip.analysis import batch_size_fab, bits_overhead, q2b_bytes_at_scale, richness_fab  # noqa: E402
from pipeline.qlip.pipeline import QLIPPipeline  # noqa: E402
from pipeline.qlip.train import spearman  # noqa: E402

OPTION_SETS = {"8-16": "8,16", "8-16-32": "8,16,32", "6-8-16-32": "6,8,16,32"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--prompts", default="world",
                   help="prompt source of every stage (calibration and Q2B draw its train split; evaluation "
                        "world:val, or another source's test split): world | builtin | coco:F | parti:F | FILE")
    p.add_argument("--t2q", default=None, help="T2Q folder (python -m pipeline.fit t2q); omit: --criterion")
    p.add_argument("--criterion", default="t2q", help="quality of the main runs: t2q | length | complexity")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench" / "q2b"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--target-fab", type=float, default=11.5, help="Q2B target (acceptance: FAB <= 12)")
    p.add_argument("--n", type=int, default=128, help="evaluation prompts per seed (world:val)")
    p.add_argument("--seeds", type=int, default=3, help="evaluation seeds (the base's seed-to-seed spread)")
    p.add_argument("--eval-batch", type=int, default=1, help="evaluation batch size (QLIP: per-prompt bits at 1)")
    p.add_argument("--q2b-n", type=int, default=32, help="Q2B training prompts")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--kappa", type=float, default=1.0)
    p.add_argument("--iters-w", type=int, default=200, help="AdaRound iterations per unit")
    p.add_argument("--iters-a", type=int, default=50, help="LSQ iterations per unit")
    p.add_argument("--no-ablations", action="store_true", help="skip Tables S3 / S4 (evaluated on seed 0 only)")
    return p.parse_args(argv)


QUIET = {"enable_progress_bar": False}


# ---------------------------------------------------------------------------
# artifacts (each built once)
# ---------------------------------------------------------------------------
def ensure_states(a, work: Path) -> dict[str, Path]:
    common = dict(model=a.model, prompts=a.prompts, w_bits=4, a_bits=16, a_bit_options="6,8,16,32", steps=a.steps,
                  cali_n=16, cali_st=5, iters_w=a.iters_w, iters_a=a.iters_a)
    if not (work / "qdiff" / "quant" / "quant_config.json").is_file():
        calibrate(CalibrateConfig(method="qdiff", run_dir=str(work / "qdiff"), **common), trainer=QUIET)
    if not (work / "ptqd" / "quant" / "quant_config.json").is_file():
        for part in ("partial", "cali_data"):  # PTQD = the same reconstruction + noise statistics: resume it
            if not (work / "ptqd" / part).exists():
                shutil.copytree(work / "qdiff" / part, work / "ptqd" / part)
        calibrate(CalibrateConfig(method="ptqd", run_dir=str(work / "ptqd"), **common), trainer=QUIET)
    return {"qdiff": work / "qdiff" / "quant", "ptqd": work / "ptqd" / "quant"}


def ensure_q2b(a, work: Path, name: str, state: Path, criterion: str, options: str) -> Path:
    out = work / f"q2b_{name}"
    if not (out / "q2b" / "q2b.json").is_file():
        q2b(Q2BConfig(model=a.model, prompts=a.prompts, quant_state=str(state), criterion=criterion,
                      t2q=a.t2q if criterion == "t2q" else None, bit_options=options, target_fab=a.target_fab,
                      n=a.q2b_n, epochs=a.epochs, kappa=a.kappa, cali_data=str(work / "q2b_data"),
                      run_dir=str(out), overwrite=True), trainer=QUIET)
    return out / "q2b"


def ensure_eval(a, work: Path, name: str, seed: int, methods: dict[str, Path]) -> dict:
    out = work / f"eval_{name}_seed{seed}"
    res = out / "evaluate" / "results.json"
    if not res.is_file():
        evaluate(EvaluateConfig(model=a.model, quant_states=[str(v) for v in methods.values()], labels=list(methods),
                                in_domain="world:val" if a.prompts == "world" else a.prompts, n=a.n, steps=a.steps,
                                batch_size=a.eval_batch, seed=seed,
                                run_dir=str(out), overwrite=True),
                 trainer={"accelerator": "cpu", "devices": 1, **QUIET})
    return json.loads(res.read_text())


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------
def fmt(v, nd=2):
    return "n/a" if v is None else f"{v:.{nd}f}"


def summarize(evals: list[dict], label: str, key: str):
    vals = [r[key] for e in evals for r in e["rows"] if r["method"] == label and r.get(key) is not None]
    if not vals:
        return None, None, []
    return statistics.mean(vals), (max(vals) - min(vals) if len(vals) > 1 else None), vals


def main(argv=None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(1)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.criterion == "t2q" and not a.t2q:
        raise SystemExit("pass --t2q runs/x/t2q (train it with `python -m pipeline.fit t2q`), "
                         "or --criterion length|complexity")
    states = ensure_states(a, work)
    qlips = {"qdiff+QLIP": ensure_q2b(a, work, "qdiff", states["qdiff"], a.criterion, "8,16,32"),
             "ptqd+QLIP": ensure_q2b(a, work, "ptqd", states["ptqd"], a.criterion, "8,16,32")}
    methods = {"Q-Diffusion": states["qdiff"], "qdiff+QLIP": qlips["qdiff+QLIP"], "PTQD": states["ptqd"],
               "ptqd+QLIP": qlips["ptqd+QLIP"]}
    evals = [ensure_eval(a, work, "main", s, methods) for s in range(a.seeds)]
    ablations = {}
    if not a.no_ablations:
        for name in ("8-16", "6-8-16-32"):
            ablations[f"QLIP-{name}"] = ensure_q2b(a, work, f"qdiff_{name}", states["qdiff"], a.criterion,
                                                   OPTION_SETS[name])
        for crit in ("t2q", "length", "complexity"):
            if crit != a.criterion and (crit != "t2q" or a.t2q):
                ablations[f"QLIP-{crit}"] = ensure_q2b(a, work, f"qdiff_{crit}", states["qdiff"], crit, "8,16,32")
    if ablations:  # seed 0 only (CPU time), beside the main Q-Diffusion rows for reference
        evals.append(ensure_eval(a, work, "ablations", 0, {"Q-Diffusion": states["qdiff"],
                                                           "qdiff+QLIP": qlips["qdiff+QLIP"], **ablations}))
    methods.update(ablations)

    qlip = QLIPPipeline.from_pretrained(qlips["qdiff+QLIP"], model=a.model)
    val = draw_prompts(a.prompts, "val", a.n).prompts
    q_val = qlip.quality_source.predict(val).float()
    fab_val = qlip.fab_of(qlip.q2b(q_val))
    res = {"args": vars(a), "methods": {k: str(v) for k, v in methods.items()},
           "spearman_q_fab": spearman(q_val, fab_val), "fab_val_batch1": float(fab_val.mean()),
           "richness": richness_fab(qlip) if a.prompts == "world" else None,
           "batch_size_fab": batch_size_fab(qlip, val),
           "overhead": bits_overhead(qlip, val[0], a.steps),
           "memory": {"quality_source_bytes": qlip.quality_source.memory_bytes(),
                      "q2b_bytes": qlip.q2b.memory_bytes(), "q2b_bk_sdm_tiny": q2b_bytes_at_scale()}}
    rows = {}
    main_evals = evals[:a.seeds]
    for label in ["FP32", *methods]:
        runs = main_evals if label in ("FP32", "Q-Diffusion", "qdiff+QLIP", "PTQD", "ptqd+QLIP") else evals[a.seeds:]
        fid, fid_spread, fids = summarize(runs, label, "fid_to_fp")
        first = next(r for r in runs[0]["rows"] if r["method"] == label)
        rows[label] = {"bit_options": first["bit_options"], "fab": summarize(runs, label, "fab")[0],
                       "bitops_T": summarize(runs, label, "bitops_T")[0], "fid": fid, "fid_spread": fid_spread,
                       "fids": fids, "sfid": summarize(runs, label, "sfid_to_fp")[0],
                       "clip": summarize(runs, label, "clip_score")[0]}
    if len(evals) > a.seeds:  # the ablation run's own Q-Diffusion and +QLIP rows, for same-seed comparison
        for label in ("Q-Diffusion", "qdiff+QLIP"):
            r0 = next(r for r in evals[-1]["rows"] if r["method"] == label)
            rows[f"{label} (seed 0)"] = {"bit_options": r0["bit_options"], "fab": r0["fab"], "fid": r0["fid_to_fp"],
                                         "fid_spread": None, "sfid": r0["sfid_to_fp"], "bitops_T": r0["bitops_T"],
                                         "clip": r0.get("clip_score"), "fids": [r0["fid_to_fp"]]}
    res["rows"] = rows
    base, main_ = rows["Q-Diffusion"], rows["qdiff+QLIP"]
    res["acceptance"] = {
        "fab_le_12": main_["fab"] <= 12.0,
        "fid_within_base_spread": (None if base["fid_spread"] is None
                                   else main_["fid"] - base["fid"] <= base["fid_spread"]),
        "spearman_ge_0.5": res["spearman_q_fab"] >= 0.5,
        "overhead_lt_1pct": res["overhead"]["ratio"] < 0.01,
    }
    write_report(work, res, qlip, val, q_val)
    (work / "results.json").write_text(json.dumps(res, indent=1))
    print((work / "results.md").read_text())


def write_report(work: Path, res: dict, qlip, val, q_val) -> None:
    head = qlip.q2b
    tables = head(q_val)
    plot_bit_shares(tables, head.layers, head.bit_options, work / "bit_shares.png",
                    title=f"bit proportion per layer, {len(val)} validation prompts (Fig. S3)")
    order = torch.argsort(q_val)
    picks = {"low": order[len(order) // 10], "median": order[len(order) // 2], "high": order[-len(order) // 10]}
    plot_bit_heatmaps({f"{k} q={float(q_val[i]):.3g} FAB {float(qlip.fab_of(tables[i])):.2f}": tables[i]
                       for k, i in picks.items()}, head.layers, head.bit_options, work / "bits_heatmap.png",
                      title="bit allocation over layers and steps")
    plot_fab_vs_batch_size(res["batch_size_fab"], work / "fab_vs_batch_size.png", baseline=16.0)
    r, n = res["rows"], res["args"]["seeds"]
    L = [f"# QLIP on `{res['args']['model']}` (quality: {res['args']['criterion']})", "",
         f"FID/sFID to FP over {n} seeds ({res['args']['n']} {res['args']['prompts']}:val prompts each, eval batch "
         f"{res['args']['eval_batch']}); FID = mean, spread = max - min over seeds.", "",
         "| Method | Bit options | FAB | BitOPs (T) | FID | FID spread | sFID | CLIP score |",
         "|---|---|---|---|---|---|---|---|"]
    for label in ["FP32", "Q-Diffusion", "qdiff+QLIP", "PTQD", "ptqd+QLIP"]:
        x = r[label]
        L.append(f"| {label} | {x['bit_options']} | {fmt(x['fab'])} | {fmt(x['bitops_T'], 4)} | {fmt(x['fid'], 3)} | "
                 f"{fmt(x['fid_spread'], 3)} | {fmt(x['sfid'], 3)} | {fmt(x['clip'], 3)} |")
    acc, ov = res["acceptance"], res["overhead"]
    text = (f"the T2Q head reads the text pass generation makes anyway, {ov['shared_text_pass_s'] * 1e3:.2f} ms, "
            f"not counted" if ov.get("text_encoder_shared") else "the quality source's own text encoding included")
    L += ["", "## Acceptance", "",
          f"- FAB of +QLIP {fmt(r['qdiff+QLIP']['fab'])} <= 12: **{acc['fab_le_12']}**",
          f"- FID of +QLIP {fmt(r['qdiff+QLIP']['fid'], 3)} vs base {fmt(r['Q-Diffusion']['fid'], 3)} "
          f"(seed spread {fmt(r['Q-Diffusion']['fid_spread'], 3)}): within spread **{acc['fid_within_base_spread']}**",
          f"- Spearman(q, FAB) over {len(val)} validation prompts (batch 1): {res['spearman_q_fab']:.3f} "
          f">= 0.5: **{acc['spearman_ge_0.5']}**",
          f"- overhead: quality + Q2B + policy {ov['t2q_q2b_s'] * 1e3:.2f} ms ({text}) vs one generation "
          f"{ov['generation_s'] * 1e3:.0f} ms = {ov['ratio']:.2%}: "
          f"**{acc['overhead_lt_1pct']}**"]
    ablation = [k for k in r if k.startswith("QLIP-")]
    if ablation:
        L += ["", "## Ablations (Q-Diffusion base; Tables S4, S3)", "",
              "| Variant | Bit options | FAB | FID | FID spread | sFID |", "|---|---|---|---|---|---|"]
        for label in ["Q-Diffusion (seed 0)", "qdiff+QLIP (seed 0)", *ablation]:
            x = r[label]
            L.append(f"| {label} | {x['bit_options']} | {fmt(x['fab'])} | {fmt(x['fid'], 3)} | "
                     f"{fmt(x['fid_spread'], 3)} | {fmt(x['sfid'], 3)} |")
    rich = res["richness"]
    if rich:  # the world's scenes only: other prompt sources have no richness levels
        L += ["", "## Richness (caption -> FAB, world:val scenes recaptioned at richness 0..4)", "",
              "| Richness | mean q | mean FAB |", "|---|---|---|"]
        L += [f"| {i} | {q:.3f} | {f:.2f} |" for i, (q, f) in enumerate(zip(rich["mean_q"], rich["mean_fab"]))]
        L += ["", "| Caption | q | FAB |", "|---|---|---|"]
        for ex in rich["examples"][:2]:
            L += [f"| {c} | {q:.3f} | {f:.2f} |" for c, q, f in zip(ex["captions"], ex["q"], ex["fab"])]
    L += ["", "## Batch size (Fig. S1: a batch runs the max bits of its prompts)", "",
          "| Batch size | " + " | ".join(map(str, res["batch_size_fab"])) + " |",
          "|---|" + "---|" * len(res["batch_size_fab"]),
          "| FAB | " + " | ".join(f"{v:.2f}" for v in res["batch_size_fab"].values()) + " |"]
    m = res["memory"]
    paper = m["q2b_bk_sdm_tiny"]
    L += ["", "## Memory", "",
          f"- quality source (T2Q): {m['quality_source_bytes'] / 2**20:.3f} MiB (paper: 1.5 MB)",
          f"- Q2B here: {m['q2b_bytes'] / 1024:.2f} KiB; at BK-SDM-Tiny scale ({paper['layers']} layers x "
          f"{paper['steps']} steps, {{8,16,32}}): {paper['bytes'] / 1024:.1f} KiB (paper: 12.1 KB)",
          "", "Figures: bits_heatmap.png, bit_shares.png, fab_vs_batch_size.png"]
    (work / "results.md").write_text("\n".join(L) + "\n")


if __name__ == "__main__":
    main()
