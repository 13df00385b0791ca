"""Artifacts: what a stage writes into its run directory, and how it is read back.

- One artifact format (`ArtifactFormat`): a safetensors file of tensors plus a
  JSON file that names the format and its version. Quantized states, T2Q and
  Q2B checkpoints all use it through `save_artifact` / `read_artifact_meta` /
  `load_artifact_tensors`; nothing is ever unpickled.
- One manifest per stage folder (`write_manifest`): config, versions, seed,
  metrics and the SHA-256 of every file in the folder. It is written last, so
  a folder without one is unfinished (a kill during the final write), never
  "results": the rerun redoes it. Every file goes to a temporary name in the
  same folder and is renamed into place (`save_tensors`, `write_json_atomic`).
- Checksums are verified on load: an artifact's JSON records its tensors
  file's SHA-256 (`load_artifact_tensors` checks it) and the manifest lists
  the rest (`verify_manifest`); a truncated safetensors file anywhere is a
  one-line error naming the file and the fix (`load_tensors`). Shard folders
  (calibration data, score shards) keep a `ShardIndex`: a shard is finished
  only when it matches the checksum recorded after it was written.
- One resume check (`check_progress`): unfinished progress is reused only
  under the same settings; progress of other settings is refused with the
  differing settings named, or under --overwrite discarded with a note.
- `prepare_artifact` never overwrites results without --overwrite, and takes
  the run directory's lock (`lock_run_dir`): one process per run directory.
  --overwrite replaces results but keeps the stage's reusable progress
  (`PROGRESS`); --fresh discards that too.
The stage -> folder table is `ARTIFACTS`; docs/architecture.md draws the graph."""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.errors import RunDirError

# stage -> the folder (inside --run-dir) its main artifact goes to
ARTIFACTS = {
    "pretrain": "pretrain", "calibrate": "quant", "score": "scored", "t2q": "t2q", "q2b": "q2b",
    "generate": "images", "evaluate": "evaluate", "export": "deploy", "demo": "demo",
    "policy": "policy", "sensitivity": "sensitivity", "mixdq": "mixdq",
}
PARTIAL = "partial"  # calibrate's resumable reconstruction progress
# stage -> its reusable progress inside --run-dir (docs/reliability.md): kept by --overwrite when made under the
# same settings, discarded by --fresh. score keeps its shards inside its own folder ("scored").
PROGRESS = {
    "calibrate": (PARTIAL, "cali_data"), "score": ("prompts", "scored"),
    "q2b": ("q2b_data", "q2b_items", "q2b_progress"), "evaluate": ("evaluate_progress",),
    "sensitivity": ("sensitivity_progress",),
}


@dataclass(frozen=True)
class ArtifactFormat:
    name: str  # recorded as "<name>/<version>" in the JSON's "format"
    version: int
    tensors: str  # safetensors file name
    meta: str  # JSON file name
    title: str  # what a user calls it, for error messages
    made_by: str  # how a user makes one, for error messages
    required: tuple[str, ...] = ()  # JSON keys its readers index ("a.b": key b of a), checked when it is read

    @property
    def tag(self) -> str:
        return f"{self.name}/{self.version}"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def matches_checksum(path: str | Path, sha256: str | None) -> bool:
    """True if `path` is a file whose SHA-256 is `sha256` (the one test every kept progress file passes)."""
    return sha256 is not None and Path(path).is_file() and sha256_file(path) == sha256


def _tmp_name(path: Path) -> Path:
    # same folder (the rename stays on one file system); the PID keeps DDP processes off each other's files
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file written under a temporary name and renamed: a kill never leaves half a file."""
    path = Path(path)
    tmp = _tmp_name(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def load_tensors(path: str | Path, fix: str, device="cpu") -> dict[str, torch.Tensor]:
    """load_file, with a truncated or corrupted file reported by name and `fix` (what makes it again)."""
    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as e:
        raise ValueError(f"{path} is truncated or corrupted ({e}); {fix}") from e


def save_artifact(folder: str | Path, fmt: ArtifactFormat, tensors: dict[str, torch.Tensor], meta: dict,
                  tensor_metadata: dict[str, str] | None = None) -> Path:
    """Write `fmt.tensors` and then `fmt.meta` (with "format" first and the tensors' SHA-256) into `folder`,
    each under a temporary name renamed into place: the JSON's presence means the tensors are complete."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / fmt.tensors, tensors, tensor_metadata)
    meta = {k: v for k, v in meta.items() if k not in ("format", "sha256")}
    write_json_atomic(folder / fmt.meta, {"format": fmt.tag, **meta,
                                          "sha256": {fmt.tensors: sha256_file(folder / fmt.tensors)}})
    return folder


def read_artifact_meta(folder: str | Path, fmt: ArtifactFormat, flag: str | None = None) -> dict:
    """The artifact's JSON, after checking both files exist, the JSON against the folder's
    manifest (where there is one), the format and its required keys. `flag`: the flag that
    named the folder, for the messages."""
    folder = Path(folder)
    named = f"{flag} {folder}: " if flag else ""
    if not folder.exists():
        raise FileNotFoundError(f"{named or f'{folder}: '}no such folder; expected a {fmt.title} ({fmt.made_by})")
    for f in (folder / fmt.meta, folder / fmt.tensors):
        if not f.is_file():
            raise FileNotFoundError(f"{named}{f} is missing: {folder} is not a {fmt.title} ({fmt.made_by})")
    verify_manifest(folder, [fmt.meta], fix=f"{fmt.made_by} again")
    try:
        meta = json.loads((folder / fmt.meta).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder / fmt.meta} is corrupted ({e}); {fmt.made_by} again") from e
    if not isinstance(meta, dict) or meta.get("format") != fmt.tag:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{folder / fmt.meta} has format {found!r}, expected {fmt.tag!r}; {fmt.made_by} again")
    require_keys(meta, fmt.required, folder / fmt.meta, f"{fmt.made_by} again")
    return meta


def require_keys(meta: dict, keys, path: str | Path, fix: str) -> None:
    """Refuse JSON `meta` (read from `path`) that lacks one of `keys` ("a.b": key b of a), naming it and `fix`:
    once, where the file is read, rather than a KeyError wherever it is used."""
    for key in keys:
        node, parts = meta, key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                missing = ".".join(parts[:i + 1])  # the outermost key that is gone
                raise ValueError(f"{path} has no {missing!r} entry (written by another version, or edited); {fix}")
            node = node[part]


def load_artifact_tensors(folder: str | Path, fmt: ArtifactFormat, device="cpu") -> dict[str, torch.Tensor]:
    """The artifact's tensors, after checking the file against the SHA-256 its JSON records."""
    folder = Path(folder)
    path = folder / fmt.tensors
    want = read_artifact_meta(folder, fmt).get("sha256", {}).get(fmt.tensors)
    if want is None:
        raise ValueError(f"{folder / fmt.meta} records no checksum of {fmt.tensors} (written before checksums "
                         f"were kept); {fmt.made_by} again")
    remake = f"{fmt.made_by} again, with --overwrite true on its --run-dir"
    if sha256_file(path) != want:
        raise ValueError(f"{path} does not match the SHA-256 recorded when it was written (corrupted or changed "
                         f"since); {remake}")
    return load_tensors(path, remake, device)


def write_json_atomic(path: str | Path, obj, **dumps) -> Path:
    """JSON written to a temporary name and renamed: a kill never leaves half a file."""
    return write_text_atomic(path, json.dumps(obj, indent=1, **dumps))


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Text written to a temporary name and renamed."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """A temporary name next to `path` to write to (images, plots: pass the format explicitly, the
    name ends in .tmp); renamed to `path` when the block ends without error, removed otherwise."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


MANIFEST = "manifest.json"


def is_finished(folder: str | Path) -> bool:
    """A stage folder holds results only once its manifest (written last, atomically) is there."""
    return (Path(folder) / MANIFEST).is_file()


def refuse_existing_results(folder: str | Path, overwrite: bool) -> None:
    """Finished results are replaced only with --overwrite true; writes nothing, so a stage may ask before it
    loads a model (prepare_artifact asks again)."""
    if not overwrite and is_finished(folder):
        raise RunDirError(f"{folder} already holds results; pass --overwrite true to replace them, "
                          f"or choose another --run-dir")


def folder_checksums(folder: str | Path) -> dict[str, str]:
    """SHA-256 of every file under `folder` (relative POSIX paths), but the manifest and temporary files."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")}


def verify_manifest(folder: str | Path, names: list[str] | None = None,
                    fix: str = "re-run the stage with --overwrite true") -> None:
    """Check `names` (default: every file the manifest lists) against the SHA-256 the folder's
    manifest records; a folder without a manifest, or a file it does not list, is not checked."""
    folder = Path(folder)
    if not is_finished(folder):
        return
    try:
        files = json.loads((folder / MANIFEST).read_text()).get("files", {})
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder / MANIFEST} is corrupted ({e}); {fix}") from e
    for name in files if names is None else [n for n in names if n in files]:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing, though {folder / MANIFEST} lists it; {fix}")
        if sha256_file(path) != files[name]:
            raise ValueError(f"{path} does not match the SHA-256 in {folder / MANIFEST} (corrupted or changed "
                             f"since it was written); {fix}")


class ShardIndex:
    """`index.json` in a shard folder: shard file name -> SHA-256, updated (atomically, under a
    file lock: DDP processes write shards of one folder) after each shard is written. A shard is
    finished only when its file matches the index; anything else is deleted to be redone."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / "index.json"

    def read(self) -> dict[str, str]:
        try:
            return json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}  # unreadable: no shard counts as finished, all are redone

    def record(self, *paths: str | Path) -> None:
        sums = {Path(p).name: sha256_file(p) for p in paths}
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".index.lock", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            write_json_atomic(self.path, {**self.read(), **sums})

    def finished(self, *paths: str | Path) -> bool:
        """True if every file matches the index; else the files are deleted (a note says which was bad)."""
        index = self.read()
        paths = [Path(p) for p in paths]
        bad = [p for p in paths if p.is_file() and (p.name not in index or sha256_file(p) != index[p.name])]
        if bad or not all(p.is_file() for p in paths):
            for p in bad:
                print(f"note: {p} is truncated or does not match its checksum in {self.path}; redoing it")
            for p in paths:
                p.unlink(missing_ok=True)
            return False
        return True


LOCK = ".lock"
_held: set[Path] = set()  # lock files this process holds (re-entrant: the demo runs several stages)


def lock_run_dir(run_dir: str | Path, stage: str) -> Path | None:
    """Take `<run-dir>/.lock` ({pid, host, started, stage}) for this process, or refuse at once
    naming the holder. Re-entrant within a process; a lock of a dead process on this host is
    taken over (with a note); released at exit or by `release_run_dir`.

    Under DDP only global rank 0 takes it: ranks > 0 are the same job, started by its launcher."""
    # lazy: pipeline.engine imports pipeline.models, which imports the quantizer, which imports this module
    from pipeline.engine import is_global_zero

    if not is_global_zero():
        return None
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = (run_dir / LOCK).resolve()
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
          "stage": stage}
    with open(run_dir / ".lock.guard", "w") as guard:  # one process at a time checks and takes the lock
        fcntl.flock(guard, fcntl.LOCK_EX)
        holder = _lock_holder(path)
        if holder is not None and holder.get("pid") != me["pid"]:
            alive = holder.get("host") != me["host"] or _pid_alive(holder.get("pid"))
            if alive:
                raise RunDirError(
                    f"{run_dir} is in use by process {holder.get('pid')} on host {holder.get('host')} "
                    f"(stage {holder.get('stage')}, since {holder.get('started')}); wait for it to finish or use "
                    f"another --run-dir (if that process is gone, delete {path})")
            print(f"note: taking over the stale lock {path} of process {holder.get('pid')} on {holder.get('host')} "
                  f"(stage {holder.get('stage')}, since {holder.get('started')}), which is no longer running")
        if holder is None or holder.get("pid") != me["pid"]:
            write_json_atomic(path, me)
    if path not in _held:
        if not _held:
            atexit.register(_release_all)
        _held.add(path)
    return path


def release_run_dir(run_dir: str | Path) -> None:
    """Give the run directory's lock back (only if this process holds it)."""
    path = (Path(run_dir) / LOCK).resolve()
    holder = _lock_holder(path)
    if holder is not None and holder.get("pid") == os.getpid():
        path.unlink(missing_ok=True)
    _held.discard(path)


def _release_all() -> None:
    for path in list(_held):
        release_run_dir(path.parent)


def _lock_holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"pid": None, "host": socket.gethostname()}  # unreadable: nobody alive can be holding it


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def prepare_artifact(run_dir: str | Path, name: str, overwrite: bool, fresh: bool = False) -> Path:
    """Path of artifact `name` in `run_dir`, after taking the run directory's lock. Finished
    results (a manifest) are never clobbered without `overwrite` (or `fresh`); an unfinished folder
    (no manifest: a kill before the final write) is cleared and redone, with a note. `fresh` also
    discards the stage's reusable progress (`PROGRESS`)."""
    path = Path(run_dir) / name
    if not path.resolve().is_relative_to(Path(run_dir).resolve()) or path.resolve() == Path(run_dir).resolve():
        raise ValueError(f"output name {name!r} is not a folder inside --run-dir {run_dir}; use a plain name "
                         f"such as 'samples'")
    stage = next((k for k, v in ARTIFACTS.items() if v == name), name)
    if lock_run_dir(run_dir, stage) is None:  # a DDP rank > 0: rank 0 prepares the folder
        path.mkdir(parents=True, exist_ok=True)
        return path
    if fresh:
        discard_progress(run_dir, stage)
    if path.exists() and any(path.iterdir() if path.is_dir() else [path]):
        refuse_existing_results(path, overwrite or fresh)
        if not (overwrite or fresh):
            print(f"note: {path} holds an unfinished {name} (no {MANIFEST}: interrupted before the end); redoing it")
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def discard_progress(run_dir: str | Path, stage: str) -> None:
    """--fresh: delete the stage's reusable progress folders in `run_dir` (with a note)."""
    for name in PROGRESS.get(stage, ()):
        folder = Path(run_dir) / name
        if folder.exists():
            print(f"note: --fresh: discarding {folder}")
            shutil.rmtree(folder)


def check_progress(path: str | Path, signature: dict, what: str, discard_stale: bool = False) -> dict | None:
    """The progress record at `path` (JSON with a "signature") if it was made
    under `signature`; None if there is none. Progress of other settings is
    refused, naming the settings that differ, rather than silently mixed in;
    with `discard_stale` (--overwrite) its folder, `path.parent`, is deleted instead, with a note."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = {"signature": {"unreadable": str(path)}}  # a kill cannot leave this (atomic writes); redo it
    old = record.get("signature", {})
    signature = jsonable(signature)
    # settings both runs have but set differently first: they are what a user changed
    changed = sorted(k for k in set(signature) & set(old) if old[k] != signature[k])
    diff = changed + sorted(k for k in set(signature) ^ set(old))
    if diff:
        shown = "; ".join(f"{k}: {old.get(k)!r:.40} (now {signature.get(k)!r:.40})" for k in diff[:3])
        if discard_stale:
            print(f"note: --overwrite: discarding {what} of other settings in {path.parent} ({shown})")
            shutil.rmtree(path.parent)
            return None
        raise RunDirError(f"{path.parent} holds {what} of other settings ({shown}); pass --overwrite true to "
                          f"discard it, or use another --run-dir")
    return record


def versions() -> dict:
    import diffusers
    import lightning
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "lightning": lightning.__version__}


def jsonable(obj):
    """Plain JSON values of configs, namespaces and paths (round-trips through json)."""
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return {k: jsonable(v) for k, v in vars(obj).items() if not k.startswith("_")}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def write_manifest(path: str | Path, stage: str, config, metrics: dict | None = None, **extra) -> Path:
    """The folder's manifest, with the SHA-256 of every file in it; written last: it marks the folder finished."""
    manifest = {"stage": stage, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": versions(),
                "config": jsonable(config), "metrics": metrics or {}, **jsonable(extra),
                "files": folder_checksums(path)}
    return write_json_atomic(Path(path) / MANIFEST, manifest)
