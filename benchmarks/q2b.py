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
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.fit import main as stage  # noqa: E402

OPTION_SETS = {"8-16": "8,16", "8-16-32": "8,16,32", "6-8-16-32": "6,8,16,32"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
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


QUIET = ["--trainer.enable_progress_bar", "false"]


# ---------------------------------------------------------------------------
# artifacts (each built once)
# ---------------------------------------------------------------------------
def ensure_states(a, work: Path) -> dict[str, Path]:
    common = ["--model", a.model, "--w-bits", "4", "--a-bits", "16", "--a-bit-options", "6,8,16,32",
              "--steps", str(a.steps), "--cali-n", "16", "--cali-st", "5", "--iters-w", str(a.iters_w),
              "--iters-a", str(a.iters_a), *QUIET]
    if not (work / "qdiff" / "quant" / "quant_config.json").is_file():
        stage(["calibrate", "--method", "qdiff", "--run-dir", str(work / "qdiff"), *common])
    if not (work / "ptqd" / "quant" / "quant_config.json").is_file():
        for part in ("partial", "cali_data"):  # PTQD = the same reconstruction + noise statistics: resume it
            if not (work / "ptqd" / part).exists():
                shutil.copytree(work / "qdiff" / part, work / "ptqd" / part)
        stage(["calibrate", "--method", "ptqd", "--run-dir", str(work / "ptqd"), *common])
    return {"qdiff": work / "qdiff" / "quant", "ptqd": work / "ptqd" / "quant"}


def ensure_q2b(a, work: Path, name: str, state: Path, criterion: str, options: str) -> Path:
    out = work / f"q2b_{name}"
    if not (out / "q2b" / "q2b.json").is_file():
        stage(["q2b", "--model", a.model, "--quant-state", str(state), "--criterion", criterion,
               *(["--t2q", a.t2q] if criterion == "t2q" else []), "--bit-options", options,
               "--target-fab", str(a.target_fab), "--n", str(a.q2b_n), "--epochs", str(a.epochs),
               "--kappa", str(a.kappa), "--cali-data", str(work / "q2b_data"), "--run-dir", str(out),
               "--overwrite", "true", *QUIET])
    return out / "q2b"


def ensure_eval(a, work: Path, name: str, seed: int, methods: dict[str, Path]) -> dict:
    out = work / f"eval_{name}_seed{seed}"
    res = out / "evaluate" / "results.json"
    if not res.is_file():
        stage(["evaluate", "--model", a.model, "--quant-states", f"[{','.join(map(str, methods.values()))}]",
               "--labels", f"[{','.join(methods)}]", "--in-domain", "world:val", "--n", str(a.n),
               "--steps", str(a.steps), "--batch-size", str(a.eval_batch), "--seed", str(seed),
               "--run-dir", str(out), "--overwrite", "true", "--trainer.accelerator", "cpu",
               "--trainer.devices", "1", *QUIET])
    return json.loads(res.read_text())


# ---------------------------------------------------------------------------
# measurements without generation
# ---------------------------------------------------------------------------
def richness_table(qlip, n_scenes: int = 64, seed: int = 0) -> dict:
    """Caption series of the world's validation scenes at richness 0..4 -> q and FAB."""
    from data.world import make_scene, recaption

    series = [[recaption(make_scene(seed, "val", i), r) for r in range(5)] for i in range(n_scenes)]
    flat = [c for s in series for c in s]
    q = qlip.quality_source.predict(flat).float()
    fab = qlip.fab_of(qlip.q2b(q))
    q, fab = q.reshape(n_scenes, 5), fab.reshape(n_scenes, 5)
    return {"mean_q": q.mean(0).tolist(), "mean_fab": fab.mean(0).tolist(),
            "examples": [{"captions": series[i], "q": q[i].tolist(), "fab": fab[i].tolist()} for i in range(4)]}


def batch_size_effect(qlip, prompts: list[str], sizes=(1, 2, 4, 8, 16, 32), seed: int = 0) -> dict[int, float]:
    """Mean FAB per image when random batches of each size take the max over their prompts."""
    q = qlip.quality_source.predict(prompts).float()
    tables = qlip.q2b(q)
    perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))
    out = {}
    for bs in sizes:
        fabs = [float(qlip.fab_of(tables[perm[i:i + bs]].amax(0))) * len(perm[i:i + bs])
                for i in range(0, len(perm), bs)]
        out[bs] = sum(fabs) / len(perm)
    return out


def overhead(qlip, prompt: str, steps: int, repeats: int = 5) -> dict:
    """Quality + Q2B + policy switch for one prompt vs one generation (batch 1), medians.

    When the T2Q reads the pipeline's own text encoder, its CLIP pass is the one generation
    makes anyway (`QLIPPipeline.__call__` shares it): that pass is timed and reported but
    not counted as overhead; otherwise the quality source's own encoding is counted."""
    from pipeline.sampling import encode_prompts_pooled, generate

    t_text, t_bits, t_gen = [], [], []
    generate(qlip.pipe, [prompt], [0], steps=steps, progress=False)  # warm-up
    for _ in range(repeats):
        t = time.perf_counter()
        pooled = encode_prompts_pooled(qlip.pipe, [prompt])[2]
        t_text.append(time.perf_counter() - t)
        t = time.perf_counter()
        qlip.set_bits([prompt], pooled=pooled)
        t_bits.append(time.perf_counter() - t)
        t = time.perf_counter()
        generate(qlip.pipe, [prompt], [0], steps=steps, progress=False)
        t_gen.append(time.perf_counter() - t)
    bits, gen = statistics.median(t_bits), statistics.median(t_gen)
    return {"t2q_q2b_s": bits, "generation_s": gen, "ratio": bits / gen,
            "text_encoder_shared": qlip.shares_text_encoder, "shared_text_pass_s": statistics.median(t_text)}


def paper_scale_q2b_bytes(steps: int = 25) -> dict:
    """Q2B storage for BK-SDM-Tiny's UNet (meta device), {8,16,32}: compare the paper's 12.1 KB."""
    from torch import nn

    from pipeline.models import meta_unet

    n = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in meta_unet("bk-sdm-tiny").modules())
    return {"layers": n, "steps": steps, "bytes": 2 * (2 * n + 2 * n * steps)}


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
    q2b = {"qdiff+QLIP": ensure_q2b(a, work, "qdiff", states["qdiff"], a.criterion, "8,16,32"),
           "ptqd+QLIP": ensure_q2b(a, work, "ptqd", states["ptqd"], a.criterion, "8,16,32")}
    methods = {"Q-Diffusion": states["qdiff"], "qdiff+QLIP": q2b["qdiff+QLIP"], "PTQD": states["ptqd"],
               "ptqd+QLIP": q2b["ptqd+QLIP"]}
    evals = [ensure_eval(a, work, "main", s, methods) for s in range(a.seeds)]
    ablations = {}
    if not a.no_ablations:
        for name in ("8-16", "6-8-16-32"):  # labels without commas: they travel in a CLI list
            ablations[f"QLIP-{name}"] = ensure_q2b(a, work, f"qdiff_{name}", states["qdiff"], a.criterion,
                                                   OPTION_SETS[name])
        for crit in ("t2q", "length", "complexity"):
            if crit != a.criterion and (crit != "t2q" or a.t2q):
                ablations[f"QLIP-{crit}"] = ensure_q2b(a, work, f"qdiff_{crit}", states["qdiff"], crit, "8,16,32")
    if ablations:  # seed 0 only (CPU time), beside the main Q-Diffusion rows for reference
        evals.append(ensure_eval(a, work, "ablations", 0, {"Q-Diffusion": states["qdiff"],
                                                           "qdiff+QLIP": q2b["qdiff+QLIP"], **ablations}))
    methods.update(ablations)

    from data.prompts import load_prompts
    from pipeline.qlip.pipeline import QLIPPipeline
    from pipeline.qlip.train import spearman

    qlip = QLIPPipeline.from_pretrained(q2b["qdiff+QLIP"], model=a.model)
    val = load_prompts("world", limit=a.n, split="val", seed=0)
    q_val = qlip.quality_source.predict(val).float()
    fab_val = qlip.fab_of(qlip.q2b(q_val))
    res = {"args": vars(a), "methods": {k: str(v) for k, v in methods.items()},
           "spearman_q_fab": spearman(q_val, fab_val), "fab_val_batch1": float(fab_val.mean()),
           "richness": richness_table(qlip), "batch_size_fab": batch_size_effect(qlip, val),
           "overhead": overhead(qlip, val[0], a.steps),
           "memory": {"quality_source_bytes": qlip.quality_source.memory_bytes(),
                      "q2b_bytes": qlip.q2b.memory_bytes(), "q2b_bk_sdm_tiny": paper_scale_q2b_bytes()}}
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
    from pipeline.plots import plot_bit_heatmaps, plot_bit_shares, plot_fab_vs_batch_size

    q2b = qlip.q2b
    tables = q2b(q_val)
    plot_bit_shares(tables, q2b.layers, q2b.bit_options, work / "bit_shares.png",
                    title=f"bit proportion per layer, {len(val)} validation prompts (Fig. S3)")
    order = torch.argsort(q_val)
    picks = {"low": order[len(order) // 10], "median": order[len(order) // 2], "high": order[-len(order) // 10]}
    plot_bit_heatmaps({f"{k} q={float(q_val[i]):.3g} FAB {float(qlip.fab_of(tables[i])):.2f}": tables[i]
                       for k, i in picks.items()}, q2b.layers, q2b.bit_options, work / "bits_heatmap.png",
                      title="bit allocation over layers and steps")
    plot_fab_vs_batch_size(res["batch_size_fab"], work / "fab_vs_batch_size.png", baseline=16.0)
    r, n = res["rows"], res["args"]["seeds"]
    L = [f"# QLIP on `{res['args']['model']}` (quality: {res['args']['criterion']})", "",
         f"FID/sFID to FP over {n} seeds ({res['args']['n']} world:val prompts each, eval batch "
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
