"""`python -m pipeline.fit generate`: images from the FP, a quantized, or a
text-aware (QLIP: `--q2b runs/x/q2b`) UNet.

Writes <run-dir>/<name>/{images/*.png, grid.png, manifest.json}; with --q2b
also bits.json (per batch: prompts, q, per-prompt and batch FAB, option
shares), bits.safetensors (each batch's [layers, steps] bit table),
bits_heatmap.png and bit_shares.png."""
from __future__ import annotations

USES_TRAINER = False


def add_arguments(parser) -> None:
    parser.add_argument("--prompts", type=str, default="world", help="'world', a .txt/.jsonl file")
    parser.add_argument("--n", type=int, default=8, help="number of prompts")
    parser.add_argument("--quant-state", type=str | None, default=None,
                        help="a calibrate output folder (with --q2b: overrides the state it was trained on)")
    parser.add_argument("--q2b", type=str | None, default=None, help="a q2b output folder: text-aware bits (QLIP)")
    parser.add_argument("--t2q", type=str | None, default=None, help="with --q2b: a T2Q folder other than its own")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=8, help="with --q2b a batch runs the max bits of its prompts")
    parser.add_argument("--name", type=str, default="images")


def run(cfg):
    from PIL import Image

    from pipeline.plots import save_grid
    from data.prompts import load_prompts
    from pipeline.qlip.pipeline import QLIPPipeline
    from pipeline.models import load_quantized_pipeline
    from pipeline.runs import prepare_artifact, write_manifest
    from pipeline.sampling import generate

    prompts = load_prompts(cfg.prompts, limit=cfg.n, split="val", seed=cfg.seed)
    qlip = None
    if cfg.q2b:
        qlip = QLIPPipeline.from_pretrained(cfg.q2b, model=cfg.model, quant_state=cfg.quant_state, t2q=cfg.t2q,
                                            allow_download=cfg.allow_download)
        pipe = qlip.pipe
    else:
        pipe = load_quantized_pipeline(cfg.model, cfg.quant_state, cfg.allow_download)
    n_steps = pipe.unet.quant_config.n_steps if getattr(pipe.unet, "quant_config", None) is not None else 1
    if n_steps > 1 and n_steps != cfg.steps:
        raise ValueError(f"--steps {cfg.steps} differs from the {n_steps} steps the quantized state was "
                         f"calibrated for")
    out = prepare_artifact(cfg.run_dir, cfg.name, cfg.overwrite)
    seeds = [cfg.seed + i for i in range(len(prompts))]
    extra = {}
    if qlip is None:
        images = generate(pipe, prompts, seeds, steps=cfg.steps, guidance=cfg.guidance, batch_size=cfg.batch_size)
    else:
        result = qlip(prompts, seeds, batch_size=cfg.batch_size, guidance=cfg.guidance, on_batch=log_batch)
        images = result.images
        extra["bits"] = write_bits(out, result, qlip)
    (out / "images").mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(out / "images" / f"{i:05d}.png")
    save_grid([images], out / "grid.png", scale=4 if images.shape[1] <= 64 else 1)
    write_manifest(out, "generate", cfg, extra.get("bits", {}).get("summary"), prompts=prompts, seeds=seeds)
    print(f"{len(images)} images -> {out}")
    return out


def log_batch(i: int, record: dict) -> None:
    shares = ", ".join(f"{b}-bit {s:.0%}" for b, s in record["shares"].items())
    qs = ", ".join(f"{q:.3g}" for q in record["q"])
    print(f"batch {i}: q = [{qs}] -> FAB {record['fab']:.2f} ({shares})")


def write_bits(out, result, qlip) -> dict:
    """The chosen bits: JSON summary per batch, the tables, and two pictures."""
    import json

    import torch
    from safetensors.torch import save_file

    from pipeline.plots import plot_bit_heatmaps, plot_bit_shares

    q2b = qlip.q2b
    tables = torch.stack([b["policy"] for b in result.batches])
    save_file({"policies": tables.contiguous()}, str(out / "bits.safetensors"))
    batches = [{k: v for k, v in b.items() if k != "policy"} for b in result.batches]
    summary = {"fab": result.fab, "bit_options": q2b.bit_options, "criterion": q2b.meta.get("criterion"),
               "n_batches": len(batches)}
    (out / "bits.json").write_text(json.dumps({"summary": summary, "layers": q2b.layers, "batches": batches},
                                              indent=1))
    shown = {f"batch {i}: FAB {result.batches[i]['fab']:.2f}": tables[i] for i in range(min(3, len(tables)))}
    plot_bit_heatmaps(shown, q2b.layers, q2b.bit_options, out / "bits_heatmap.png", title="QLIP bits per batch")
    plot_bit_shares(tables, q2b.layers, q2b.bit_options, out / "bit_shares.png")
    return {"summary": summary}
