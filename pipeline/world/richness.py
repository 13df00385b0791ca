"""QLIP's richness table, in kind, on the embedded world: the same scenes
captioned at richness 0..4 (data/world.py `recaption`), with the quality T2Q
predicts for each caption.

Extra columns plug in as `columns={"FAB": fn}`, fn(list of prompts) -> one
number per prompt; the Q2B work adds its FAB there."""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from data.world import RICHNESS_LEVELS, make_scene, recaption

Column = Callable[[Sequence[str]], Sequence[float]]


def richness_series(n_scenes: int = 100, seed: int = 0, split: str = "test") -> list[list[str]]:
    """n_scenes caption series; series[i][r] = scene i captioned at richness r."""

    scenes = [make_scene(seed, split, i) for i in range(n_scenes)]
    return [[recaption(s, r) for r in RICHNESS_LEVELS] for s in scenes]


def richness_table(predict: Column, series: list[list[str]], columns: Mapping[str, Column] | None = None,
                   examples: int = 2) -> dict:
    """{"levels": [{richness, q_mean, q_std, <column>_mean...}], "examples": [[{caption, q, <column>...}]]}."""
    columns = {"q": predict, **(columns or {})}
    levels = len(series[0])
    flat = [caption for s in series for caption in s]  # one call per column: batched
    values = {name: np.asarray(fn(flat), dtype=np.float64).reshape(len(series), levels) for name, fn in columns.items()}
    rows = []
    for r in range(levels):
        row = {"richness": r}
        for name, v in values.items():
            row[f"{name}_mean"], row[f"{name}_std"] = float(v[:, r].mean()), float(v[:, r].std())
        rows.append(row)
    ex = [[{"caption": series[i][r], **{name: float(v[i, r]) for name, v in values.items()}} for r in range(levels)]
          for i in range(min(examples, len(series)))]
    return {"levels": rows, "examples": ex, "n_scenes": len(series), "columns": list(columns)}


def format_richness_table(table: dict) -> str:
    extra = [c for c in table["columns"] if c != "q"]
    lines = [f"predicted quality by caption richness ({table['n_scenes']} world scenes, each captioned at every level)",
             f"{'richness':>8} {'q mean':>7} {'q std':>6}" + "".join(f" {c + ' mean':>9}" for c in extra)]
    for row in table["levels"]:
        lines.append(f"{row['richness']:>8} {row['q_mean']:>7.3f} {row['q_std']:>6.3f}"
                     + "".join(f" {row[c + '_mean']:>9.2f}" for c in extra))
    for series in table["examples"]:
        lines.append("")
        lines.append(f"{'q':>6}" + "".join(f" {c:>7}" for c in extra) + "  caption")
        for item in series:
            lines.append(f"{item['q']:>6.3f}" + "".join(f" {item[c]:>7.2f}" for c in extra) + f"  {item['caption']}")
    return "\n".join(lines)
