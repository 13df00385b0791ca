"""Image grids: rows of images with optional row labels, saved as PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


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
    canvas.save(path)
    return path
