"""A quantized method's size as the deployable artifact's bytes on disk (what the evaluate table reports), not
arithmetic: the run's own export when there is one, else an export into a temporary folder."""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from torch import nn

from pipeline.artifacts import ARTIFACTS, load_artifact_tensors
from pipeline.deploy.artifact import DEPLOY, export_unet, read_deploy_meta, take_prefixed
from pipeline.deploy.backends import check_backend
from pipeline.deploy.qlip import qlip_payload
from pipeline.quant.state import QUANT_STATE


def existing_export(quant_state: str | Path, q2b: str | Path | None = None) -> Path | None:
    """The export folder beside `quant_state` (or beside `q2b`, for QLIP) made from exactly that state (and
    that Q2B), or None."""
    folder = Path(q2b or quant_state).parent / ARTIFACTS["export"]
    try:
        meta = read_deploy_meta(folder)
    except (FileNotFoundError, ValueError):  # none there, or unreadable: measure a fresh export instead
        return None
    same_state = meta.get("extra", {}).get("quant_state") == str(Path(quant_state).resolve())
    same_q2b = (meta.get("qlip") or {}).get("source") == (str(Path(q2b).resolve()) if q2b else None)
    return folder if same_state and same_q2b else None


@torch.inference_mode(False)
def artifact_bytes(unet: nn.Module, quant_state: str | Path, q2b: str | Path | None = None,
                   model: str | None = None) -> tuple[int | None, str]:
    """(bytes of the artifact's tensors file, where they were measured) for fake-quantized `unet`, loaded from
    `quant_state` (with QLIP's `q2b` folder: its tables and T2Q head included); (None, why) when the state
    cannot be exported (options no integer kernel serves)."""
    found = existing_export(quant_state, q2b)
    if found is not None:
        # named by kind, not by path: results must not depend on where the run directory lies (a resumed run
        # in another folder reproduces them; tests/test_faults.py)
        return (found / DEPLOY.tensors).stat().st_size, "the export beside the state"
    try:
        check_backend("reference", unet.quant_config)  # the file's size does not depend on the backend
        # a Q2B whose criterion cannot deploy (the complexity oracle needs an FP image per prompt) is still an
        # evaluable ablation: it gets no size, not an error
        qlip = qlip_payload(q2b, unet, model) if q2b else None
    except ValueError as e:
        return None, f"not exportable: {e}"
    extra = take_prefixed(load_artifact_tensors(quant_state, QUANT_STATE), "extra.")  # PTQD's statistics
    with tempfile.TemporaryDirectory(prefix="qlip-size-") as tmp:
        export_unet(copy.deepcopy(unet).cpu(), tmp, extra_tensors=extra, qlip=qlip)
        return (Path(tmp) / DEPLOY.tensors).stat().st_size, "exported to a temporary folder"
