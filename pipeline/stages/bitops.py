"""`python -m pipeline.fit bitops`: BitOPs / FAB / size of a UNet at given bits,
traced on the meta device (no weights needed for the reference configs)."""
from __future__ import annotations

import json
from pathlib import Path

USES_TRAINER = False


def add_arguments(parser) -> None:
    parser.add_argument("--reference", type=list[str], default=["sd-v1-4", "bk-sdm-tiny", "sdxl-base"],
                        help="published UNet configs to report (sd-v1-4, bk-sdm-tiny, sdxl-base); [] for --model")
    parser.add_argument("--resolution", type=int | None, default=None, help="pixels; default 512 (SD), 1024 (SDXL)")
    parser.add_argument("--bits", type=list[str], default=["32/32", "8/8", "4/8", "4/16"], help="W/A pairs")
    parser.add_argument("--out", type=str | None, default=None, help="also write the table as JSON here")


def bitops_table(unets: dict, resolution, bits: list[str]) -> list[dict]:
    from pipeline.metrics.cost import bitops, layer_stats

    rows = []
    for name, unet in unets.items():
        res = resolution or unet.config.sample_size * 8
        stats = layer_stats(unet, batch=2, resolution=res)
        row = {"model": name, "resolution": res, "layers": len(stats),
               "GMACs_per_image": sum(s.macs for s in stats.values()) / 2 / 1e9}
        for pair in bits:
            w, a = (int(v) for v in pair.split("/"))
            row[f"W{w}A{a}"] = bitops(stats, w, a) / 1e12
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return "\n".join(lines)


def run(cfg) -> list[dict]:
    from pipeline.models import load_pipeline, meta_unet

    unets = {name: meta_unet(name) for name in cfg.reference}
    if not cfg.reference:
        unets[cfg.model] = load_pipeline(cfg.model).unet
    rows = bitops_table(unets, cfg.resolution, cfg.bits)
    print("BitOPs (T) of one UNet call, classifier-free-guidance batch of 2")
    print(format_table(rows))
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(rows, indent=1))
    return rows
