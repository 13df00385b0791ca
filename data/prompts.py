"""Prompt splits: normalization, stable-hash splits and the LightningDataModule
that caches them in the run directory (the sources are read by
data/prompt_sources.py: builtin, world, coco, cc, parti, sd-prompts, txt/jsonl).

Normalization strips and collapses whitespace, drops empty prompts and
duplicates (first occurrence wins) and counts the prompts longer than the
tokenizer's context (they will be truncated by the text encoder; counted and
reported, not altered). Splits come from a stable hash of the prompt text
(SHA-1, not Python's salted `hash`): a prompt lands in the same split on every
machine, in every process, whatever the other prompts are, so adding prompts
never moves old ones. `--limit` keeps the prompts first in a second, independent
hash order: a fixed pseudo-random subset that does not bias the split sizes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import lightning as L
from torch.utils.data import DataLoader, Dataset

from data.prompt_sources import (  # noqa: F401 (re-exported)
    BUILTIN,
    DEFAULT_WORLD_N,
    KINDS,
    SYNTAX,
    PromptSourceError,
    is_source,
    parse_spec,
    read_source,
)
from data.tokenizer import clip_tokenizer

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


# ---------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------
@dataclass
class PromptStats:
    n_raw: int = 0
    n_empty: int = 0
    n_duplicates: int = 0
    n_kept: int = 0
    max_tokens: int | None = None  # the tokenizer's context (77 for CLIP), BOS/EOS included
    n_truncated: int = 0
    truncated_examples: list[str] = field(default_factory=list)


def normalize(prompts: Sequence[str]) -> tuple[list[str], PromptStats]:
    """Strip and collapse whitespace, drop empty prompts and duplicates (first kept)."""
    stats = PromptStats(n_raw=len(prompts))
    out: dict[str, None] = {}
    for p in prompts:
        p = re.sub(r"\s+", " ", str(p)).strip()
        if not p:
            stats.n_empty += 1
        elif p in out:
            stats.n_duplicates += 1
        else:
            out[p] = None
    stats.n_kept = len(out)
    return list(out), stats


def count_truncated(prompts: Sequence[str], tokenizer, stats: PromptStats, examples: int = 5) -> PromptStats:
    """How many prompts exceed the tokenizer's context (the text encoder cuts them there)."""
    limit = int(tokenizer.model_max_length)
    ids = tokenizer(list(prompts), truncation=False, verbose=False).input_ids if prompts else []
    lengths = [len(i) for i in ids]
    long = [p for p, n in zip(prompts, lengths) if n > limit]
    stats.max_tokens, stats.n_truncated, stats.truncated_examples = limit, len(long), long[:examples]
    return stats


# ---------------------------------------------------------------------------
# Stable hashing: splits, --limit, per-prompt seeds
# ---------------------------------------------------------------------------
def stable_unit(text: str, salt: str) -> float:
    """A uniform number in [0, 1) from SHA-1(salt, text): identical on every machine and process."""
    digest = hashlib.sha1(f"{salt}\0{text}".encode("utf-8")).hexdigest()
    return int(digest[:15], 16) / 16 ** 15


def prompt_seed(prompt: str, seed: int = 0) -> int:
    """The fixed generation seed of a prompt (independent of its position, the split and sharding)."""
    return int(stable_unit(prompt, f"seed{seed}") * 2 ** 31)


def check_fractions(fractions: Sequence[float], what: str | None = None) -> tuple[float, ...]:
    """`what`: how the message names the value (default: 'split fractions [...]')."""
    f = tuple(float(x) for x in fractions)
    # written so that NaN fails (every comparison with it is False)
    if len(f) != len(SPLITS) or not all(x >= 0 for x in f) or not abs(sum(f) - 1) <= 1e-6:
        total = f" (they sum to {sum(f):g})" if len(f) == len(SPLITS) and all(x >= 0 for x in f) else ""
        raise ValueError(f"{what or f'split fractions {list(fractions)}'} must be {len(SPLITS)} non-negative "
                         f"numbers (train, val, test) summing to 1{total}, e.g. 0.8,0.1,0.1")
    return f


def assign_splits(prompts: Sequence[str], fractions: Sequence[float] = DEFAULT_FRACTIONS,
                  limit: int | None = None, salt: str = "qlip") -> dict[str, list[str]]:
    """{train, val, test} prompt lists (each in input order) by a stable hash of the text."""
    fractions = check_fractions(fractions)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit {limit} must be >= 1 (or left out for every prompt)")
        keep = set(sorted(prompts, key=lambda p: stable_unit(p, salt + ":order"))[:limit])
        prompts = [p for p in prompts if p in keep]
    bounds = [sum(fractions[:i + 1]) for i in range(len(SPLITS))]
    out = {s: [] for s in SPLITS}
    for p in prompts:
        u = stable_unit(p, salt + ":split")
        out[SPLITS[next((i for i, b in enumerate(bounds) if u < b), len(SPLITS) - 1)]].append(p)
    return out


def load_prompts(source: str, limit: int | None = None, split: str = "train", seed: int = 0) -> list[str]:
    """A quick, unsplit prompt list (tests, benchmarks, `t2q --predict`): the first `limit` normalized prompts.

    For 'world', `split` and `seed` pick the world's scenes; files are read in order. Stages draw
    their prompts with `draw_prompts` instead, which keeps train / val / test apart."""
    prompts, _ = normalize(read_source(source, n_world=limit or 64, world_split=split, seed=seed))
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise no_prompts(source)
    return prompts


def no_prompts(source: str) -> PromptSourceError:
    return PromptSourceError(f"prompt source {source!r} gave no prompts after stripping and de-duplication (an "
                             f"empty file, or only blank lines); give a source with at least one prompt")


def parse_fractions(text: str | Sequence[float], flag: str = "--split-fractions") -> tuple[float, ...]:
    """'0.8,0.1,0.1' -> (0.8, 0.1, 0.1), checked."""
    if not isinstance(text, str):
        return check_fractions(text, f"{flag} {','.join(map(str, text))}")
    try:
        fractions = [float(f) for f in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text!r} must be three numbers (train,val,test) such as 0.8,0.1,0.1") from None
    return check_fractions(fractions, f"{flag} {text}")


def split_source(source: str, fractions: Sequence[float] = DEFAULT_FRACTIONS, limit: int | None = None,
                 seed: int = 0, salt: str = "qlip") -> tuple[dict[str, list[str]], PromptStats]:
    """Read a source, normalize it and split it by the prompts' SHA-1 (`assign_splits`).

    'world' here means the world's train scenes (`limit` of them, else DEFAULT_WORLD_N): the score
    stage hashes those into T2Q's own train / val."""
    prompts, stats = normalize(read_source(source, n_world=limit or DEFAULT_WORLD_N, seed=seed))
    if not prompts:  # not "split 'train' is empty": no fraction would help
        raise no_prompts(source)
    return assign_splits(prompts, fractions, limit, salt), stats


@dataclass
class PromptDraw:
    """The prompts a stage drew from a source, and how (recorded in its manifest)."""

    source: str
    split: str
    prompts: list[str]
    split_by: str  # "sha1" (hashed split), "world scenes" (the world's own split) or "none" (builtin)
    counts: dict[str, int]  # prompts in each split of the source (hashed), or in the drawn one
    fractions: tuple[float, ...] | None = None
    n_requested: int | None = None
    salt: str | None = None

    def describe(self) -> dict:
        return {"source": self.source, "split": self.split, "split_by": self.split_by, "counts": self.counts,
                "fractions": None if self.fractions is None else list(self.fractions), "salt": self.salt,
                "n": len(self.prompts), "n_requested": self.n_requested}


def draw_prompts(source: str, split: str | None, n: int | None = None, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 seed: int = 0, salt: str = "qlip", world_split: str | None = None) -> PromptDraw:
    """The one resolver of every stage's prompt flag (the syntax: data/prompt_sources.py, docs/prompts.md).

    A data source is split by the SHA-1 of each normalized prompt (`assign_splits`), so train, val and
    test never share a prompt and a prompt's split does not depend on the file's order or on the other
    prompts; `n` keeps the first prompts of `split` in a second hash order (also order-free). `split=None`
    (generate, `t2q --predict`: prompts to look at, not data) takes the whole source in file order. 'world'
    and 'world:SPLIT' use the world's own scene split (SPLIT, else `world_split`, else `split`, else train),
    and 'builtin' is a fixed smoke-test list that is not split. An empty split is refused with the counts."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown prompt split {split!r}; choose from {list(SPLITS)}")
    if n is not None and n < 1:
        raise ValueError(f"prompt count {n} must be >= 1 (or left out for the whole split)")
    kind, rest = parse_spec(source)
    if kind == "world":
        scenes = rest or world_split or split or "train"
        prompts = load_prompts(source, limit=n, split=scenes, seed=seed)
        return PromptDraw(source, scenes, prompts, "world scenes", {scenes: len(prompts)}, n_requested=n)
    if kind == "builtin" or split is None:
        prompts = load_prompts(source, limit=n, seed=seed)
        return PromptDraw(source, "all", prompts, "none", {"all": len(prompts)}, n_requested=n)
    fractions = check_fractions(fractions)
    splits, _ = split_source(source, fractions, seed=seed, salt=salt)
    counts = {s: len(v) for s, v in splits.items()}
    if not splits[split]:
        raise EmptySplitError(
            f"prompt split {split!r} of {source!r} is empty: the split counts are "
            f"{', '.join(f'{s} {c}' for s, c in counts.items())} under fractions "
            f"{','.join(f'{f:g}' for f in fractions)}; give {split!r} a larger fraction (--split-fractions) "
            f"or use a larger source")
    prompts = sorted(splits[split], key=lambda p: stable_unit(p, salt + ":order"))[:n]
    return PromptDraw(source, split, prompts, "sha1", counts, fractions, n, salt)


# ---------------------------------------------------------------------------
# The DataModule: splits cached in the run directory
# ---------------------------------------------------------------------------
class EmptySplitError(ValueError):
    pass


class PromptList(Dataset):
    def __init__(self, prompts: Sequence[str]):
        self.prompts = list(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> str:
        return self.prompts[i]


def _collate_prompts(batch: list[str]) -> list[str]:
    return list(batch)


class PromptDataModule(L.LightningDataModule):
    """Train / val / test prompt splits of one source, cached as
    `<run_dir>/prompts/{train,val,test}.txt` + `meta.json`.

    `prepare_data` (one process) reads, normalizes, counts truncations and
    writes the cache, or checks that an existing cache was made with the same
    settings (refusing otherwise unless `overwrite`); `setup` (every process)
    reads it. Loaders yield lists of prompt strings."""

    CACHE = "prompts"

    def __init__(self, source: str = "world", run_dir: str | Path | None = None, limit: int | None = None,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS, batch_size: int = 8, seed: int = 0,
                 tokenizer=None, overwrite: bool = False, salt: str = "qlip",
                 predict_splits: Sequence[str] = ("train", "val"), shard_size: int = 32):
        super().__init__()
        self.source, self.limit, self.fractions = source, limit, check_fractions(fractions)
        self.batch_size, self.seed, self.salt, self.overwrite = batch_size, seed, salt, overwrite
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.tokenizer = tokenizer
        self.predict_splits, self.shard_size = list(predict_splits), shard_size
        if shard_size < 1:
            raise ValueError(f"--shard-size {shard_size} must be >= 1")
        self.splits: dict[str, list[str]] | None = None
        self.stats: PromptStats | None = None
        self._read = None  # (splits, stats) read by check_source, for prepare_data to write

    # -- the cache ------------------------------------------------------------
    @property
    def cache_dir(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / self.CACHE

    def settings(self) -> dict:
        return {"source": self.source, "limit": self.limit, "fractions": list(self.fractions), "salt": self.salt,
                "world_seed": self.seed}

    def _build(self) -> tuple[dict[str, list[str]], PromptStats]:
        splits, stats = split_source(self.source, self.fractions, self.limit, self.seed, self.salt)
        kept = [p for s in SPLITS for p in splits[s]]
        if self.tokenizer is None:
            self.tokenizer = clip_tokenizer()
        count_truncated(kept, self.tokenizer, stats)
        stats.n_kept = len(kept)
        if stats.n_truncated:
            print(f"note: {stats.n_truncated} of {len(kept)} prompts of {self.source!r} exceed the tokenizer's "
                  f"{stats.max_tokens} tokens and will be truncated, e.g. {stats.truncated_examples[0][:80]!r}")
        return splits, stats

    def _cache_diff(self) -> dict | None:
        """How the cache's settings differ from these ({} when they match); None without a cache."""
        meta_path = self.cache_dir / "meta.json"
        if not meta_path.is_file():
            return None
        old = json.loads(meta_path.read_text())
        return {k: (old["settings"].get(k), v) for k, v in self.settings().items() if old["settings"].get(k) != v}

    def check_source(self) -> None:
        """Read the source now, unless a cache of these settings will be reused: a bad or empty source fails
        before anything is written to the run directory (prepare_data writes what was read)."""
        if self.cache_dir is not None and self._cache_diff() != {}:
            self._read = self._build()

    def prepare_data(self) -> None:
        cache = self.cache_dir
        if cache is None:
            return
        meta_path = cache / "meta.json"
        diff = self._cache_diff()
        if diff == {}:
            return  # made with these settings: reuse (idempotent, also under DDP)
        if diff and not self.overwrite:
            detail = "; ".join(f"{k}: cached {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise FileExistsError(f"prompt splits in {cache} were made with other settings ({detail}); pass "
                                  f"--overwrite true to rebuild them, or choose another --run-dir")
        splits, stats = self._read or self._build()
        cache.mkdir(parents=True, exist_ok=True)
        for s in SPLITS:
            write_atomic(cache / f"{s}.txt", "".join(p + "\n" for p in splits[s]))
        write_atomic(meta_path, json.dumps({"settings": self.settings(), "stats": asdict(stats),
                                             "counts": {s: len(splits[s]) for s in SPLITS}}, indent=1))
        self.splits, self.stats = splits, stats

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        cache = self.cache_dir
        if cache is None:
            self.splits, self.stats = self._build()
            return
        if not (cache / "meta.json").is_file():
            raise FileNotFoundError(f"no prompt splits in {cache}: call prepare_data() first")
        meta = json.loads((cache / "meta.json").read_text())
        self.stats = PromptStats(**meta["stats"])
        self.splits = {s: (cache / f"{s}.txt").read_text(encoding="utf-8").splitlines() for s in SPLITS}

    # -- access -----------------------------------------------------------------
    def split(self, name: str) -> list[str]:
        if name not in SPLITS:
            raise ValueError(f"unknown prompt split {name!r}; choose from {list(SPLITS)}")
        if self.splits is None:
            self.setup()
        prompts = self.splits[name]
        if not prompts:
            total = sum(len(v) for v in self.splits.values())
            raise EmptySplitError(
                f"prompt split {name!r} of {self.source!r} is empty after filtering ({total} prompts in all, "
                f"fractions {'/'.join(f'{f:g}' for f in self.fractions)}, limit {self.limit}); use more prompts "
                f"(a larger --limit or another source) or give {name!r} a larger fraction")
        return prompts

    def _loader(self, name: str) -> DataLoader:
        return DataLoader(PromptList(self.split(name)), batch_size=self.batch_size, collate_fn=_collate_prompts)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    # -- generation shards (the score stage's predict loop) ------------------------
    def generation_shards(self) -> list[dict]:
        """The `predict_splits` cut into shards of `shard_size` prompts, each with
        its prompts' fixed seeds (`prompt_seed`): {kind, split, shard, indices, prompts, seeds}."""
        shards = []
        for name in self.predict_splits:
            prompts = self.split(name)
            for k, start in enumerate(range(0, len(prompts), self.shard_size)):
                chunk = prompts[start:start + self.shard_size]
                shards.append({"kind": "generate", "split": name, "shard": k,
                               "indices": list(range(start, start + len(chunk))), "prompts": chunk,
                               "seeds": [prompt_seed(p, self.seed) for p in chunk]})
        return shards

    def predict_dataloader(self) -> DataLoader:
        return dealt_loader(PromptList(self.generation_shards()), self.trainer)


def dealt_loader(dataset: Dataset, trainer=None) -> DataLoader:
    """Items (whole shards) dealt to processes without padding: no shard is done twice."""
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=None, sampler=sampler, collate_fn=_identity)


def _identity(x):
    return x


def write_atomic(path: Path, text: str) -> None:
    """Readers in other processes see the old file or the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
