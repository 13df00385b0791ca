"""`python -m pipeline.fit demo`: the README's main job on the embedded default.

Generates FP images, calibrates naive PTQ at W8A8 and W4A8, generates the same
prompts and seeds with each quantized UNet, and writes report.md, results.json
and grid.png into --run-dir. It grows with the project's stages."""
from __future__ import annotations

import json
import time

USES_TRAINER = True


def add_arguments(parser) -> None:
    parser.add_argument("--bits", type=list[str], default=["8/8", "4/8"], help="W/A pairs to calibrate")
    parser.add_argument("--n", type=int, default=8, help="prompts to generate")
    parser.add_argument("--cali-n", type=int, default=16, help="calibration prompts")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)


def run(cfg):
    import lightning as L

    from callbacks.images import save_grid
    from data.prompts import load_prompts
    from pipeline.accounting import layer_stats, quantized_summary
    from pipeline.calibration.naive import calibrate_naive
    from pipeline.metrics.fidelity import fidelity_to_fp
    from pipeline.models import EMBEDDED, TINY_RANDOM, load_pipeline
    from pipeline.quant import QuantConfig, save_quantized
    from pipeline.runs import prepare_artifact, write_manifest
    from pipeline.sampling import generate

    pairs = [tuple(int(v) for v in p.split("/")) for p in cfg.bits]
    qcfgs = [QuantConfig(w_bits=w, a_bits=a, n_steps=cfg.steps) for w, a in pairs]  # validate first
    out = prepare_artifact(cfg.run_dir, "demo", cfg.overwrite)
    L.seed_everything(cfg.seed, verbose=False)
    source = "world" if cfg.model == EMBEDDED else "builtin"
    prompts = load_prompts(source, limit=cfg.n, split="val", seed=cfg.seed)
    cali = load_prompts(source, limit=cfg.cali_n, split="train", seed=cfg.seed + 1)
    seeds = [cfg.seed + i for i in range(len(prompts))]
    trainer_kwargs = {k: v for k, v in vars(cfg.trainer).items() if v is not None}

    t0 = time.time()
    pipe = load_pipeline(cfg.model)
    stats = layer_stats(pipe.unet)
    fp = generate(pipe, prompts, seeds, steps=cfg.steps, guidance=cfg.guidance)
    rows = [{"method": "FP", "W/A": "32/32", **quantized_summary_fp(pipe.unet, stats), "PSNR_to_FP": float("inf"),
             "seconds": time.time() - t0}]
    images, labels = [fp], ["FP32"]
    for (w, a), qcfg in zip(pairs, qcfgs):
        t0 = time.time()
        pipe = load_pipeline(cfg.model)
        calibrate_naive(pipe, qcfg, cali, cfg.steps, cfg.guidance, seed=cfg.seed, trainer_kwargs=trainer_kwargs)
        save_quantized(pipe.unet, out / f"naive_w{w}a{a}", extra={"method": "naive", "model": cfg.model})
        q = generate(pipe, prompts, seeds, steps=cfg.steps, guidance=cfg.guidance)
        s = quantized_summary(pipe.unet, stats)
        rows.append({"method": "naive", "W/A": f"{w}/{a}", **s, "PSNR_to_FP": fidelity_to_fp(fp, q)["psnr"],
                     "seconds": time.time() - t0})
        images.append(q)
        labels.append(f"naive W{w}A{a}")
    grid = save_grid(images, out / "grid.png", labels=labels, scale=4 if fp.shape[1] <= 64 else 1)
    (out / "results.json").write_text(json.dumps({"prompts": prompts, "seeds": seeds, "rows": rows}, indent=1))
    lines = [f"# Demo: naive PTQ on `{cfg.model}`", "",
             f"{len(prompts)} prompts, {cfg.steps} DDIM steps, guidance {cfg.guidance}, "
             f"calibrated on {len(cali)} other prompts.", "",
             "| Method | W/A | FAB | BitOPs (T) | Size (MiB) | PSNR to FP (dB) | Seconds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['W/A']} | {r['fab']:.2f} | {r['bitops_T']:.4g} | "
                     f"{r['size_bytes'] / 2**20:.2f} | {r['PSNR_to_FP']:.2f} | {r['seconds']:.1f} |")
    lines += ["", f"![grid]({grid.name})", "", "Rows: " + ", ".join(labels) + "; columns: " +
              "; ".join(prompts)]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    write_manifest(out, "demo", cfg, {"rows": rows})
    print("\n".join(lines[4:4 + len(rows) + 2]))
    print(f"report -> {out / 'report.md'}")
    if cfg.model == TINY_RANDOM:
        print("note: tiny-random has random weights; its images are noise (the embedded world ships separately)")
    return out


def quantized_summary_fp(unet, stats) -> dict:
    from pipeline.accounting import bitops, model_size_bytes

    return {"bitops_T": bitops(stats, 32, 32) / 1e12, "fab": 32.0, "fab_unweighted": 32.0,
            "size_bytes": model_size_bytes(unet)}
