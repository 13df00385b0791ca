"""Prompt lists for calibration and generation: the embedded world's captions
or a local text file (one prompt per line) / JSONL file ({"prompt": ...})."""
from __future__ import annotations

import json
from pathlib import Path


# A few captions in the embedded world's style, for smoke runs without it.
BUILTIN = [
    "a red circle", "a blue square on a white background", "two green triangles", "a small yellow star",
    "a striped purple circle at the top left", "an orange square and a red triangle", "a large dotted blue star",
    "a green circle and a yellow square on a black background", "three small red squares",
    "a white triangle in the center", "a pink circle next to a blue triangle", "a big striped green square",
    "a cyan star on a gray background", "two purple circles", "a dotted orange triangle", "a yellow square",
]


def load_prompts(source: str, limit: int | None = None, split: str = "train", seed: int = 0) -> list[str]:
    if source == "builtin":
        prompts = BUILTIN
    elif source == "world":
        from data.world import make_scene  # the embedded world's renderer (32x32: cheap)

        prompts = [make_scene(seed, split, i).caption for i in range(limit or 64)]
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist (use 'world', 'builtin' or a .txt/.jsonl file)")
        if path.suffix == ".jsonl":
            prompts = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
        elif path.suffix == ".txt":
            prompts = path.read_text().splitlines()
        else:
            raise ValueError(f"prompt file {path} has unknown format {path.suffix!r}: use .txt or .jsonl")
    prompts = list(dict.fromkeys(p.strip() for p in prompts if p and p.strip()))
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise ValueError(f"prompt source {source!r} gave no prompts after stripping and de-duplication")
    return prompts
