"""Artifacts: what a stage writes into its run directory, and how it is read back.

- One artifact format (`ArtifactFormat`): a safetensors file of tensors plus a
  JSON file that names the format and its version. Quantized states, T2Q and
  Q2B checkpoints all use it through `save_artifact` / `read_artifact_meta` /
  `load_artifact_tensors`; nothing is ever unpickled.
- One manifest per stage folder (`write_manifest`): config, versions, seed, metrics.
- One resume check (`check_progress`): unfinished progress is reused only
  under the same settings, and refused with the differing settings named.
- `prepare_artifact` never overwrites results without --overwrite.
The stage -> folder table is `ARTIFACTS`; docs/architecture.md draws the graph."""
from __future__ import annotations

import json
import os
import platform
import shutil
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
    "generate": "images", "evaluate": "evaluate", "demo": "demo",
}
PARTIAL = "partial"  # calibrate's resumable reconstruction progress


@dataclass(frozen=True)
class ArtifactFormat:
    name: str  # recorded as "<name>/<version>" in the JSON's "format"
    version: int
    tensors: str  # safetensors file name
    meta: str  # JSON file name
    title: str  # what a user calls it, for error messages
    made_by: str  # how a user makes one, for error messages

    @property
    def tag(self) -> str:
        return f"{self.name}/{self.version}"


def save_artifact(folder: str | Path, fmt: ArtifactFormat, tensors: dict[str, torch.Tensor], meta: dict,
                  tensor_metadata: dict[str, str] | None = None) -> Path:
    """Write `fmt.tensors` and `fmt.meta` (with "format" first) into `folder`;
    each file is written under a temporary name and renamed into place."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (fmt.tensors + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=tensor_metadata)
    tmp.replace(folder / fmt.tensors)
    write_json_atomic(folder / fmt.meta, {"format": fmt.tag, **{k: v for k, v in meta.items() if k != "format"}})
    return folder


def read_artifact_meta(folder: str | Path, fmt: ArtifactFormat) -> dict:
    """The artifact's JSON, after checking both files exist and the format matches."""
    folder = Path(folder)
    for f in (folder / fmt.meta, folder / fmt.tensors):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: {folder} is not a {fmt.title} ({fmt.made_by})")
    try:
        meta = json.loads((folder / fmt.meta).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder / fmt.meta} is corrupted ({e}); {fmt.made_by} again") from e
    if meta.get("format") != fmt.tag:
        raise ValueError(f"{folder / fmt.meta} has format {meta.get('format')!r}, expected {fmt.tag!r}; "
                         f"{fmt.made_by} again")
    return meta


def load_artifact_tensors(folder: str | Path, fmt: ArtifactFormat, device="cpu") -> dict[str, torch.Tensor]:
    path = Path(folder) / fmt.tensors
    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as e:
        raise ValueError(f"{path} is unreadable ({e}); {fmt.made_by} again") from e


def write_json_atomic(path: str | Path, obj) -> Path:
    """JSON written to a temporary name and renamed: a kill never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)
    return path


def prepare_artifact(run_dir: str | Path, name: str, overwrite: bool) -> Path:
    """Path of artifact `name` in `run_dir`, refusing to clobber an existing one."""
    path = Path(run_dir) / name
    if path.exists() and any(path.iterdir() if path.is_dir() else [path]):
        if not overwrite:
            raise RunDirError(f"{path} already holds results; pass --overwrite true to replace them, "
                              f"or choose another --run-dir")
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_progress(path: str | Path, signature: dict, what: str) -> dict | None:
    """The progress record at `path` (JSON with a "signature") if it was made
    under `signature`; None if there is none. Progress of other settings is
    refused, naming the settings that differ, rather than silently mixed in."""
    path = Path(path)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    old = record.get("signature", {})
    signature = jsonable(signature)
    # settings both runs have but set differently first: they are what a user changed
    changed = sorted(k for k in set(signature) & set(old) if old[k] != signature[k])
    diff = changed + sorted(k for k in set(signature) ^ set(old))
    if diff:
        shown = "; ".join(f"{k}: {old.get(k)!r:.40} (now {signature.get(k)!r:.40})" for k in diff[:3])
        raise RunDirError(f"{path.parent} holds {what} of other settings ({shown}); pass --overwrite true to "
                          f"start over, or use another --run-dir")
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
    manifest = {"stage": stage, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": versions(),
                "config": jsonable(config), "metrics": metrics or {}, **jsonable(extra)}
    return write_json_atomic(Path(path) / "manifest.json", manifest)
