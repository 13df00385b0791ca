"""Pictures the pipeline writes: image grids (rows of images with optional row
labels) and bit-allocation plots like the QLIP paper's (a layer x step heatmap
of the chosen bits, the layer-wise proportion of each bit option, supplementary
Fig. S3, cross-attention layers in red; the FAB against batch size, Fig. S1)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline.artifacts import atomic_path

_SHORT = [("down_blocks.", "d"), ("up_blocks.", "u"), ("mid_block.", "m."), ("attentions.", "at"),
          ("resnets.", "r"), ("transformer_blocks.", "tb"), ("downsamplers.", "ds"), ("upsamplers.", "us"),
          ("time_embedding.", "temb.")]


def save_images(images: np.ndarray, folder: str | Path) -> Path:
    """uint8 images [N, H, W, 3] as folder/00000.png, 00001.png, ..."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        with atomic_path(folder / f"{i:05d}.png") as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
    return folder


def save_grid(rows: Sequence[np.ndarray], path: str | Path, labels: Sequence[str] | None = None,
              scale: int = 1, pad: int = 2, label_width: int = 90) -> Path:
    """rows: each a uint8 array [N, H, W, 3]; all rows the same N, H, W."""
    rows = [np.asarray(r) for r in rows]
    n, h, w, _ = rows[0].shape
    lw = label_width if labels else 0
    canvas = Image.new("RGB", (lw + n * (w * scale + pad) + pad, len(rows) * (h * scale + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = pad + r * (h * scale + pad)
        if labels:
            draw.text((4, y + h * scale // 2 - 6), str(labels[r])[:14], fill="black")
        for c, img in enumerate(row):
            tile = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (lw + pad + c * (w * scale + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def short_name(layer: str) -> str:
    for long, short in _SHORT:
        layer = layer.replace(long, short)
    return layer


def is_cross_attention_block(layer: str) -> bool:
    """Layers inside a Transformer2DModel (proj_in, attn1/attn2, ff, proj_out): Fig. S3's red."""
    return ".attentions." in f".{layer}"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colours(bit_options: Sequence[int]):
    plt = _plt()
    cmap = plt.get_cmap("viridis", len(bit_options))
    return [cmap(i) for i in range(len(bit_options))]


def plot_bit_heatmaps(tables: Mapping[str, torch.Tensor], layers: Sequence[str], bit_options: Sequence[int],
                      path: str | Path, title: str | None = None) -> Path:
    """One panel per table ([n_layers, n_steps] bits), e.g. {"q = 0.2 (FAB 9.8)": table, ...}."""
    from matplotlib.colors import BoundaryNorm, ListedColormap

    plt = _plt()
    opts = sorted(int(b) for b in bit_options)
    cmap = ListedColormap(_colours(opts))
    norm = BoundaryNorm(np.arange(len(opts) + 1) - 0.5, len(opts))
    n = len(tables)
    height = max(3.0, min(0.12 * len(layers), 30))
    fig, axes = plt.subplots(1, n, figsize=(2.2 + 2.6 * n, height), squeeze=False, sharey=True)
    for ax, (name, table) in zip(axes[0], tables.items()):
        idx = np.searchsorted(opts, torch.as_tensor(table).cpu().numpy())
        im = ax.imshow(idx, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("sampling step")
    every = max(1, len(layers) // 60)
    axes[0][0].set_yticks(range(0, len(layers), every))
    axes[0][0].set_yticklabels([short_name(layer) for layer in layers][::every], fontsize=5)
    for tick, layer in zip(axes[0][0].get_yticklabels(), list(layers)[::every]):
        tick.set_color("tab:red" if is_cross_attention_block(layer) else "black")
    bar = fig.colorbar(im, ax=axes[0].tolist(), ticks=range(len(opts)), fraction=0.03)
    bar.ax.set_yticklabels([f"{b} bit" for b in opts])
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def bit_shares(tables: torch.Tensor, bit_options: Sequence[int]) -> torch.Tensor:
    """[n_options, n_layers]: per layer, the fraction of (prompt, step) entries at each option."""
    t = torch.as_tensor(tables)
    t = t.reshape(-1, *t.shape[-2:])  # [N, L, T]
    return torch.stack([(t == b).float().mean(dim=(0, 2)) for b in sorted(bit_options)])


def plot_bit_shares(tables: torch.Tensor, layers: Sequence[str], bit_options: Sequence[int], path: str | Path,
                    title: str | None = None) -> Path:
    """Fig. S3: per layer, the proportion of each bit option over prompts and steps."""
    plt = _plt()
    opts = sorted(int(b) for b in bit_options)
    shares = bit_shares(tables, opts).numpy()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.09 * len(layers) + 2), 3.6))
    bottom = np.zeros(len(layers))
    for share, b, c in zip(shares, opts, _colours(opts)):
        ax.bar(range(len(layers)), share, bottom=bottom, color=c, width=0.9, label=f"{b} bit")
        bottom += share
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([short_name(layer) for layer in layers], rotation=90, fontsize=4)
    for tick, layer in zip(ax.get_xticklabels(), layers):
        tick.set_color("tab:red" if is_cross_attention_block(layer) else "black")
    ax.set_ylabel("proportion")
    ax.set_xlim(-0.5, len(layers) - 0.5)
    ax.legend(fontsize=7, loc="upper right", ncols=len(opts))
    ax.set_title(title or "bit proportion per layer (red: cross-attention blocks)", fontsize=9)
    return _save(fig, path)


def plot_fab_vs_batch_size(fab: Mapping[int, float], path: str | Path, baseline: float | None = None) -> Path:
    """Fig. S1: mean FAB against batch size under the max-over-prompts rule."""
    plt = _plt()
    sizes = sorted(fab)
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    ax.plot(sizes, [fab[s] for s in sizes], "o-", label="QLIP")
    if baseline is not None:
        ax.axhline(baseline, color="gray", ls="--", label="static")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels(map(str, sizes))
    ax.set_xlabel("batch size")
    ax.set_ylabel("FAB")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    _plt().close(fig)
    return path


def plot_quality_vs_fab(curves: Mapping[str, Sequence[dict]], path: str | Path, metric: str = "PSNR to FP (dB)",
                        title: str | None = None) -> Path:
    """Quality against FAB, one line per method with its 95% band: `curves[name]` = points
    {"fab", "mean", "low", "high"} (a single point is drawn as a marker with an error bar)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for name, points in curves.items():
        pts = sorted(points, key=lambda p: p["fab"])
        x = [p["fab"] for p in pts]
        y, lo, hi = ([p[k] for p in pts] for k in ("mean", "low", "high"))
        if len(pts) == 1:
            ax.errorbar(x, y, yerr=[[y[0] - lo[0]], [hi[0] - y[0]]], fmt="s", capsize=3, label=name)
            continue
        (line,) = ax.plot(x, y, "o-", label=name, ms=3)
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("FAB (mean activation bits, input-size weighted)")
    ax.set_ylabel(metric)
    if title:
        ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_sensitivity(rec: Mapping, path: str | Path, title: str | None = None) -> Path:
    """MixDQ's per-layer sensitivity (a sensitivity record): 1 - SSIM (log) and SQNR (dB) per layer and
    candidate bit; content layers' names in red."""
    plt = _plt()
    layers, cands = list(rec["layers"]), list(rec["candidates"])
    ssim = np.array([[1.0 - rec["ssim"][n][c] for c in cands] for n in layers]).clip(1e-8, None)
    sqnr = np.array([[rec["sqnr"][n][c] for c in cands] for n in layers])
    fig, axes = plt.subplots(1, 2, figsize=(7, max(3.0, min(0.12 * len(layers), 30))), sharey=True)
    for ax, values, name in ((axes[0], np.log10(ssim), "log10(1 - SSIM)"), (axes[1], sqnr, "SQNR (dB)")):
        im = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="magma_r" if ax is axes[0] else "magma")
        ax.set_xticks(range(len(cands)))
        ax.set_xticklabels(cands, fontsize=6)
        ax.set_title(name, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.05)
    every = max(1, len(layers) // 60)
    axes[0].set_yticks(range(0, len(layers), every))
    axes[0].set_yticklabels([short_name(n) for n in layers][::every], fontsize=5)
    for tick, n in zip(axes[0].get_yticklabels(), layers[::every]):
        tick.set_color("tab:red" if rec.get("groups", {}).get(n) == "content" else "black")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)
