"""Text-aware generation from a deployable artifact. `export --q2b runs/x/q2b` stores Q2B's gate and tables and
the T2Q head (projection + MLP) in the artifact's tensors file under `qlip.q2b.*` / `qlip.t2q.*`, and in
deploy.json what rebuilds them (the layer list, steps, bit options, the quality criterion, the sampler, and the
T2Q's text tower by reference: the model's own text encoder, which the pipeline being attached to holds anyway).

    qlip = load_qlip("runs/x/deploy", load_pipeline("embedded"), backend="onednn")
    out = qlip(prompts, batch_size=4)    # per batch: T2Q -> q -> Q2B -> [layers, steps] bits -> int8 or weight-only

The result is a `QLIPPipeline` over the deployed UNet: the same batch rule, records and bit tables as the
fake-quant one, each (layer, step) call routed by its bits (RealQuantLayer: <= 8 bits on the int8 kernel)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.deploy.artifact import DEPLOY, attach, read_deploy_meta, take_prefixed
from pipeline.qlip.pipeline import QLIPPipeline
from pipeline.qlip.q2b import follow_link, load_q2b, q2b_from_state, q2b_state
from pipeline.qlip.sources import PromptLength, TextBlind
from pipeline.qlip.t2q import load_t2q, t2q_from_state, t2q_state

# criteria whose quality comes from the prompt alone; `complexity` needs an FP generation per prompt (an ablation)
DEPLOYABLE = ("t2q", "length", "text-blind")


def qlip_payload(q2b_path: str | Path, unet: nn.Module, model: str) -> tuple[dict[str, torch.Tensor], dict]:
    """What export stores of a q2b-stage folder for fake-quantized `unet`: tensors (`qlip.*`) and deploy.json's
    "qlip" record. Refuses a Q2B that does not fit `unet` or whose quality criterion cannot deploy."""
    q2b = load_q2b(q2b_path, deployed=True)
    meta = q2b.meta
    if meta["criterion"] not in DEPLOYABLE:
        raise ValueError(f"--q2b {q2b_path}: its quality criterion {meta['criterion']!r} needs an FP image per "
                         f"prompt (an ablation, not a deployment path); deployable criteria: {', '.join(DEPLOYABLE)}")
    q2b.check_unet(unet)
    tables, q2b_meta = q2b_state(q2b)
    tensors = {f"q2b.{k}": v for k, v in tables.items()}
    record = {"criterion": meta["criterion"], "steps": meta["steps"], "guidance": meta["guidance"],
              "sampler": meta.get("sampler"), "q2b": q2b_meta, "source": str(Path(q2b_path).resolve()),
              "source_sha256": meta["sha256"]}
    if meta["criterion"] == "t2q":
        t2q_dir = follow_link(q2b_path, meta.get("t2q"))
        if not t2q_dir:
            raise ValueError(f"--q2b {q2b_path}: q2b.json names no T2Q folder for criterion 't2q'")
        state, config = t2q_state(load_t2q(t2q_dir, model=model))  # checks the tower matches this model
        tensors.update({f"t2q.{k}": v for k, v in state.items()})
        record["t2q"] = config
    return tensors, record


def load_qlip(folder: str | Path, pipe, backend: str = "onednn", model: str | None = None,
              clip: str | None = None, dtype: str = "fp32") -> QLIPPipeline:
    """A QLIPPipeline over `pipe` with the deployed UNet of `folder` (attached in place) and the artifact's own
    Q2B and T2Q. `model` / `clip`: where T2Q's frozen text tower loads from (default: what it was trained on).
    `dtype` "bf16": the bf16 runtime (load_unet), where a table's 16- and 32-bit calls run as bf16 GEMMs."""
    meta = read_deploy_meta(folder)
    record = meta.get("qlip")
    if record is None:
        raise ValueError(f"{Path(folder) / DEPLOY.meta} holds no Q2B tables (exported without --q2b); export it "
                         f"again with --q2b runs/x/q2b for text-aware generation, or use attach() for a fixed policy")
    attach(pipe, folder, backend, dtype=dtype)
    tensors = dict(pipe.unet.deploy_qlip)
    where = Path(folder) / DEPLOY.tensors
    q2b = q2b_from_state(record["q2b"], take_prefixed(tensors, "q2b."), where)
    q2b.meta = record  # what QLIPPipeline's reports read (criterion, steps, guidance)
    criterion = record["criterion"]
    if criterion == "t2q":
        quality = t2q_from_state(record["t2q"], take_prefixed(tensors, "t2q."), where, model, clip)
    elif criterion == "length":
        quality = PromptLength(pipe.tokenizer)
    elif criterion == "text-blind":
        quality = TextBlind()
    else:
        raise ValueError(f"{Path(folder) / DEPLOY.meta}: quality criterion {criterion!r} does not deploy "
                         f"(choose one of {', '.join(DEPLOYABLE)}); export it again")
    return QLIPPipeline(pipe, q2b, quality, record["steps"], record["guidance"])
