"""Run directories: each stage writes named artifacts plus a JSON manifest
(config, versions, seed, metrics) and never overwrites without --overwrite."""
from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path


class RunDirError(FileExistsError):
    pass


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


def versions() -> dict:
    import diffusers
    import lightning
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "lightning": lightning.__version__}


def _jsonable(obj):
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return {k: _jsonable(v) for k, v in vars(obj).items() if not k.startswith("_")}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def write_manifest(path: str | Path, stage: str, config, metrics: dict | None = None, **extra) -> Path:
    path = Path(path)
    manifest = {"stage": stage, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": versions(),
                "config": _jsonable(config), "metrics": metrics or {}, **_jsonable(extra)}
    out = path / "manifest.json"
    out.write_text(json.dumps(manifest, indent=1))
    return out
