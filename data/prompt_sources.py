"""Prompt sources (the `--prompts` value), read as raw lists of strings:

    builtin                    a few world-style captions, for smoke runs
    world[:split]              captions of the embedded world's scenes (data/world.py)
    coco:FILE.json | coco:NAME COCO captions JSON (annotations[].caption), or a Hugging Face dataset name
    cc:FILE.tsv                Conceptual Captions: caption<TAB>url, no header
    parti:FILE.tsv             PartiPrompts: a header with a `Prompt` column
    sd-prompts[:FILE]          Gustavosta/Stable-Diffusion-Prompts by name, or a local .parquet/.csv/.txt
    FILE.txt | FILE.jsonl      one prompt per line | {"prompt": ...} per line
    FILE.csv | FILE.parquet    a table with a prompt / caption / text column

A bare file is recognized by its extension and, for .json and .tsv, its
layout. Every failure names the value and the fix.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

from data import world

# A few captions in the embedded world's style, for smoke runs without it.
BUILTIN = [
    "a red circle", "a blue square on a white background", "two green triangles", "a small yellow star",
    "a striped purple circle at the top left", "an orange square and a red triangle", "a large dotted blue star",
    "a green circle and a yellow square on a black background", "three small red squares",
    "a white triangle in the center", "a pink circle next to a blue triangle", "a big striped green square",
    "a cyan star on a gray background", "two purple circles", "a dotted orange triangle", "a yellow square",
]
SD_PROMPTS_HF = "Gustavosta/Stable-Diffusion-Prompts"
KINDS = ("builtin", "world", "coco", "cc", "parti", "sd-prompts", "txt", "jsonl", "table")
PROMPT_COLUMNS = ("prompt", "Prompt", "caption", "text")  # looked up in this order in tables
DEFAULT_WORLD_N = 1024  # world scenes captioned when no count is given
# The one-line form of the syntax above, quoted by every error about a source and in the flags' help.
SYNTAX = ("world[:train|val|test|unseen] | builtin | coco:FILE.json|NAME | cc:FILE.tsv | parti:FILE.tsv | "
          "sd-prompts[:FILE] | FILE.txt|.jsonl|.json|.tsv|.csv|.parquet")


class PromptSourceError(ValueError):
    """A prompt source that cannot be read: the message names the value and the fix."""


@contextmanager
def utf8(path):
    """Reading prompt file `path`: a file that is not UTF-8 text (binary, another encoding) is named, with the fix."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise PromptSourceError(f"prompt file {path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it "
                                f"to UTF-8 (iconv -t UTF-8) or give another prompt source") from None


def parse_spec(source: str) -> tuple[str, str]:
    """'parti:x.tsv' -> ('parti', 'x.tsv'); a bare file -> (kind from its extension and layout, path)."""
    kind, sep, rest = source.partition(":")
    if sep and kind in KINDS:
        return kind, rest
    if source in ("builtin", "world", "sd-prompts", "coco"):
        return source, ""
    path = Path(source)
    if not path.is_file():
        if sep and "/" not in kind and "\\" not in kind and len(kind) > 1:  # 'foo:x', not a path or a drive
            raise PromptSourceError(f"unknown prompt source {source!r}: {kind + ':'!r} is not a source kind; "
                                    f"use {SYNTAX}")
        raise FileNotFoundError(f"prompt file {path} does not exist; a prompt source is {SYNTAX}")
    suffix = path.suffix.lower()
    if suffix in (".txt", ".jsonl"):
        return suffix[1:], source
    if suffix in (".csv", ".parquet"):
        return "table", source
    if suffix == ".json":
        return "coco", source
    if suffix == ".tsv":
        with utf8(path), path.open(encoding="utf-8") as fh:
            first = fh.readline().rstrip("\n").split("\t")
        if "Prompt" in first:
            return "parti", source
        if len(first) == 2 and first[1].startswith(("http://", "https://")):
            return "cc", source
        raise PromptSourceError(f"{path}: unknown TSV layout (first row {first[:3]}); expected PartiPrompts "
                                f"(a header with a 'Prompt' column) or Conceptual Captions (caption<TAB>url); "
                                f"prefix the path with parti: or cc: to say which")
    raise PromptSourceError(f"prompt file {path} has unknown format {path.suffix!r}: use .txt, .jsonl, .json "
                            f"(COCO captions), .tsv (PartiPrompts, Conceptual Captions), .csv or .parquet")


def is_source(text: str) -> bool:
    """Whether `text` names a prompt source (rather than being a prompt itself)."""
    try:
        parse_spec(text)
    except (FileNotFoundError, PromptSourceError):
        return False
    return True


def _existing(path: str, kind: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{kind} prompt file {p} does not exist")
    return p


def _missing_column(path, column: str, columns) -> PromptSourceError:
    return PromptSourceError(f"{path} has no {column!r} column (columns: {list(columns)}); give a file with "
                             f"that column, or convert it to one prompt per line (.txt)")


def _read_table(path: str, kind: str) -> list[str]:
    import pandas as pd

    p = _existing(path, kind)
    suffix = p.suffix.lower()
    if suffix == ".txt":
        return p.read_text(encoding="utf-8").splitlines()
    if suffix not in (".csv", ".parquet"):
        raise PromptSourceError(f"{kind} file {p} has unknown format {p.suffix!r}: use .parquet, .csv or .txt")
    df = pd.read_parquet(p) if suffix == ".parquet" else pd.read_csv(p)
    column = next((c for c in PROMPT_COLUMNS if c in df.columns), None)
    if column is None:
        raise _missing_column(p, "Prompt", df.columns)
    return df[column].dropna().astype(str).tolist()


def _read_coco(path: str) -> list[str]:
    if not path:
        raise PromptSourceError("coco needs a captions file or a dataset name: coco:captions_val2017.json or "
                                "coco:ORG/NAME (a Hugging Face dataset in the local cache)")
    if not Path(path).suffix and "/" in path and not Path(path).exists():
        return _read_hf(path, ("caption", "captions", "sentences", "text"))
    p = _existing(path, "coco")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PromptSourceError(f"{p} is not JSON ({e}); coco: takes a COCO captions JSON file") from None
    if not isinstance(data, dict) or "annotations" not in data:
        raise PromptSourceError(f"{p}: unknown JSON layout (no 'annotations' list); coco: expects a COCO "
                                f"captions file such as captions_val2017.json")
    anns = data["annotations"]
    if anns and "caption" not in anns[0]:
        raise _missing_column(p, "caption", anns[0].keys())
    return [a["caption"] for a in anns]


def _read_parti(path: str) -> list[str]:
    import csv

    p = _existing(path, "parti")
    with p.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        if "Prompt" not in (reader.fieldnames or []):
            raise _missing_column(p, "Prompt", reader.fieldnames or [])
        return [row["Prompt"] for row in reader]


def _read_cc(path: str) -> list[str]:
    p = _existing(path, "cc")
    rows = [line.split("\t") for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if rows and len(rows[0]) != 2:
        raise PromptSourceError(f"{p}: Conceptual Captions rows are caption<TAB>url, the first row has "
                                f"{len(rows[0])} fields; check the file or use parti:/a .txt file")
    return [r[0] for r in rows]


def _read_jsonl(path: str) -> list[str]:
    p = _existing(path, "jsonl")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if "prompt" not in row:
                raise _missing_column(f"{p} line {n}", "prompt", row.keys())
            out.append(row["prompt"])
    return out


def _read_hf(name: str, columns: Sequence[str]) -> list[str]:
    """Every split of a Hugging Face dataset, from the local cache unless downloads are allowed."""
    import datasets

    try:
        ds = datasets.load_dataset(name)
    except Exception as e:  # offline / not cached / no such dataset: all mean "give a file instead"
        raise PromptSourceError(f"could not load the Hugging Face dataset {name!r} ({type(e).__name__}: "
                                f"{str(e)[:200]}); it must be in the local cache, or pass a local file") from None
    out = []
    for split in (ds.values() if hasattr(ds, "values") else [ds]):
        column = next((c for c in columns if c in split.column_names), None)
        if column is None:
            raise _missing_column(name, columns[0], split.column_names)
        for v in split[column]:
            out.extend(v if isinstance(v, list) else [v])  # some COCO sets hold 5 captions per row
    return out


def read_source(source: str, n_world: int | None = None, world_split: str = "train", seed: int = 0) -> list[str]:
    """The raw prompts of a source, in file order (not normalized)."""
    kind, rest = parse_spec(source)
    if kind == "builtin":
        return list(BUILTIN)
    if kind == "world":
        split = rest or world_split
        out = []
        for i in range(n_world or DEFAULT_WORLD_N):  # make_scene's captions, without rendering the images
            objects, background, richness, template = world.sample_attributes(world.scene_rng(seed, split, i), split)
            out.append(world.make_caption(objects, background, richness, template))
        return out
    with utf8(rest):  # every kind below reads the file `rest` (or, without one, a Hugging Face dataset)
        if kind == "sd-prompts":
            return _read_table(rest, kind) if rest else _read_hf(SD_PROMPTS_HF, ("Prompt", "prompt"))
        if kind == "table":
            return _read_table(rest, "table")
        if kind == "txt":
            return _existing(rest, "txt").read_text(encoding="utf-8").splitlines()
        return {"coco": _read_coco, "cc": _read_cc, "parti": _read_parti, "jsonl": _read_jsonl}[kind](rest)
