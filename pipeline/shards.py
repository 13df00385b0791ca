"""A bounded-memory item store: training items in RAM up to a byte cap, the rest in disk shards.

The reconstruction (a unit's FP inputs and outputs) and Q2B (prompt batches with their FP targets) train on
lists of items, each a dict of tensors and plain values. At SD scale those lists outgrow RAM, so they live in
an `ItemStore`: items are kept as they are (same objects, same device) while the bytes held stay within
`ram_cap_bytes`; every later item is written to its own safetensors shard (under a temporary name, then
renamed) and read back, memory-mapped by `safe_open`, each time it is indexed. An item read from disk is the
caller's for its batch; the store itself never holds more than the cap. Values round-trip exactly (dtype,
shape and bytes), so a run with a tiny cap trains on the same numbers as an all-in-RAM run.

Under DDP each process keeps only its own share of the items (`rank_share`), so no rank builds or holds the
others' items. `estimate_line` states, before a stage starts, what it will hold in RAM and on disk."""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.engine import make_trainer

GIB = 2 ** 30
DEFAULT_RAM_CAP_GIB = 4.0
PLAIN = (str, int, float, bool, type(None))


def ram_cap_bytes(gib: float | None) -> float:
    """The cap in bytes; None means no cap (everything in RAM)."""
    if gib is None:
        return math.inf
    if not gib >= 0:
        raise ValueError(f"--ram-cap-gib {gib!r} must be >= 0 (GiB of items kept in RAM; 0 puts every item on disk)")
    return gib * GIB


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)


def item_nbytes(item) -> int:
    """Bytes of the tensors in `item` (each tensor object counted once)."""
    seen = {id(t): t for t in _tensors(item)}
    return sum(tensor_nbytes(t) for t in seen.values())


def _encode(obj, tensors: dict, ids: dict):
    """A JSON skeleton of `obj` with its tensors moved into `tensors` (one entry per tensor object)."""
    if torch.is_tensor(obj):
        if id(obj) not in ids:
            ids[id(obj)] = key = f"t{len(ids)}"
            # a copy of its own: safetensors refuses tensors that share storage, and views lose their strides anyway
            tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"t": ids[id(obj)], "device": str(obj.device)}
    if isinstance(obj, tuple):
        return {"tuple": [_encode(v, tensors, ids) for v in obj]}
    if isinstance(obj, list):
        return {"list": [_encode(v, tensors, ids) for v in obj]}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"item dict keys must be strings to go to a disk shard, got {list(obj)[:5]}")
        return {"dict": {k: _encode(v, tensors, ids) for k, v in obj.items()}}
    if isinstance(obj, PLAIN):
        return {"v": obj}
    raise TypeError(f"an item holds a {type(obj).__name__}, which a disk shard cannot store (tensors, tuples, "
                    f"lists, str-keyed dicts and plain values only)")


def _decode(node, f, cache: dict):
    if "t" in node:
        key = node["t"]
        if key not in cache:
            cache[key] = f.get_tensor(key).to(node["device"])
        return cache[key]
    if "tuple" in node:
        return tuple(_decode(v, f, cache) for v in node["tuple"])
    if "list" in node:
        return [_decode(v, f, cache) for v in node["list"]]
    if "dict" in node:
        return {k: _decode(v, f, cache) for k, v in node["dict"].items()}
    return node["v"]


class ItemStore(Sequence):
    """Items kept in RAM while `held_bytes` stays within `ram_cap_bytes`, the rest in shards under `spill_dir`.

    `field(i, key)` reads a top-level plain value (e.g. an item's "step") without loading the item.
    `close()` deletes the shards; use the store as a context manager to do that on the way out."""

    def __init__(self, spill_dir: str | Path | None = None, ram_cap_bytes: float = math.inf, name: str = "item"):
        if ram_cap_bytes < math.inf and spill_dir is None:
            raise ValueError("an ItemStore with a RAM cap needs a spill_dir for the items beyond it")
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.cap, self.name = ram_cap_bytes, name
        self._slots: list = []  # the item itself (in RAM) or the Path of its shard
        self._fields: list[dict] = []
        self.held_bytes = self.peak_held_bytes = self.disk_bytes = 0

    def append(self, item: dict) -> None:
        n = item_nbytes(item)
        self._fields.append({k: v for k, v in item.items() if isinstance(v, PLAIN)})
        if self.held_bytes + n <= self.cap:
            self._slots.append(item)
            self.held_bytes += n
            self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)
            return
        tensors, ids = {}, {}
        skeleton = _encode(item, tensors, ids)
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"{self.name}_{len(self._slots):06d}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"skeleton": json.dumps(skeleton)})
        tmp.replace(path)  # a kill never leaves a half shard under the final name
        self.disk_bytes += path.stat().st_size
        self._slots.append(path)

    def __len__(self) -> int:
        return len(self._slots)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.subset(range(len(self))[i])
        slot = self._slots[i]
        if not isinstance(slot, Path):
            return slot
        with safe_open(str(slot), framework="pt") as f:
            return _decode(json.loads(f.metadata()["skeleton"]), f, {})

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def field(self, i: int, key: str):
        return self._fields[i][key]

    def on_disk(self) -> int:
        return sum(isinstance(s, Path) for s in self._slots)

    def subset(self, indices) -> ItemView:
        return ItemView(self, list(indices))

    def close(self) -> None:
        """Forget every item and delete the shards (and the spill folder, if this left it empty)."""
        for s in self._slots:
            if isinstance(s, Path):
                s.unlink(missing_ok=True)
        self._slots, self._fields, self.held_bytes = [], [], 0
        if self.spill_dir is not None and self.spill_dir.is_dir() and not any(self.spill_dir.iterdir()):
            shutil.rmtree(self.spill_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ItemView(Sequence):
    """Some items of a store, by index, without copying them (a train / held-out split)."""

    def __init__(self, store: ItemStore, indices: list[int]):
        self.store, self.indices = store, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ItemView(self.store, self.indices[i])
        return self.store[self.indices[i]]

    def __iter__(self):
        for i in self.indices:
            yield self.store[i]

    def field(self, i: int, key: str):
        return self.store.field(self.indices[i], key)


def item_field(items, i: int, key: str):
    """Item i's top-level plain value `key`, without loading a stored item from disk."""
    return items.field(i, key) if hasattr(items, "field") else items[i][key]


def process_share(trainer_kwargs: dict | None) -> tuple[int, int]:
    """(global rank, world size) of this process as the stage's Trainer will see them.

    Read from a Trainer built with the stage's flags: under Lightning's own launcher the processes beyond
    rank 0 do not exist yet before the first fit, but the Trainer already knows how many there will be."""
    t = make_trainer(trainer_kwargs)
    return t.global_rank, t.world_size


def running_share(trainer_kwargs: dict | None) -> tuple[int, int]:
    """(rank, world) among the processes that run now: torchrun's or SLURM's ranks, which all start at once; but
    (0, 1) before the first fit under Lightning's own launcher, whose other processes do not exist yet (they
    start later, rerun the script, and find rank 0's work done)."""
    t = make_trainer(trainer_kwargs)
    env = getattr(t.strategy, "cluster_environment", None)
    if t.world_size > 1 and env is not None and env.creates_processes_externally:
        return t.global_rank, t.world_size
    return 0, 1


def rank_share(n: int, rank: int, world: int) -> list[int]:
    """The item indices process `rank` of `world` builds and holds: every world-th one, from its rank."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world} processes")
    return list(range(rank, n, world))


def estimate_line(what: str, total_bytes: float, cap_bytes: float, item_bytes: float = 0) -> str:
    """'<what> will hold about X GiB in RAM, Y GiB on disk', from the items' total size and the cap.

    RAM counts the items kept (at most the cap) plus one item read back from disk at a time."""
    ram = min(total_bytes, cap_bytes)
    disk = max(0.0, total_bytes - cap_bytes)
    ram += item_bytes if disk else 0
    cap = "no cap" if cap_bytes == math.inf else f"cap {cap_bytes / GIB:.3g} GiB"
    return f"{what} will hold about {ram / GIB:.3g} GiB in RAM, {disk / GIB:.3g} GiB on disk ({cap})"


def take(items, indices) -> Sequence:
    """Items at `indices`: a view of a store (nothing loaded), or a list of a list's items."""
    return items.subset(indices) if hasattr(items, "subset") else [items[i] for i in indices]
