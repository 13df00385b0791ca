"""Text-aware quantized generation (QLIP): prompts -> quality (T2Q) -> Q2B ->
per-layer, per-step activation bits -> images.

    from pipeline.qlip.pipeline import QLIPPipeline
    qlip = QLIPPipeline.from_pretrained("runs/x/q2b")   # the Q2B folder names its quantized state and T2Q
    out = qlip(["a red circle", "a large striped red circle on the left"], batch_size=1)
    out.images, out.quality, out.fab, out.batches[0]["policy"]

A batch takes, per layer and step, the maximum bits over its prompts (the
paper's batch rule). A T2Q on the pipeline's own text encoder reads the pooled
output of the text pass generation makes anyway (one pass serves both).
Besides T2Q, the quality may come from the prompt length or the FP image's
complexity (the selection-criteria ablation, Table S3)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.artifacts import save_tensors, write_json_atomic
from pipeline.metrics.cost import fab_weights, layer_stats, weighted_fab
from pipeline.models import load_pipeline, load_quantized_pipeline, pooled_text_encoder
from pipeline.plots import plot_bit_heatmaps, plot_bit_shares
from pipeline.qlip.q2b import follow_link, load_q2b
from pipeline.qlip.scoring import check_same_sampler
from pipeline.qlip.sources import quality_source
from pipeline.quant import set_bit_policy
from pipeline.sampling import Conditioning, encode_prompts, generate

# ---------------------------------------------------------------------------
# Quality sources: anything with predict(prompts) -> [N] tensor and memory_bytes()
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# The text-aware pipeline
# ---------------------------------------------------------------------------
@dataclass
class QLIPOutput:
    images: np.ndarray  # uint8 [N, H, W, 3]
    quality: torch.Tensor  # [N]
    batches: list[dict] = field(default_factory=list)  # per batch: prompts, q, policy [L, T], fab, ...

    @property
    def fab(self) -> float:
        """Mean FAB over images (each image counts its batch's FAB)."""
        n = sum(len(b["prompts"]) for b in self.batches)
        return sum(b["fab"] * len(b["prompts"]) for b in self.batches) / n


class QLIPPipeline:
    """A diffusers text-to-image pipeline with a quantized UNet, a quality
    source and a Q2B module; `__call__` generates with text-aware bits."""

    def __init__(self, pipe, q2b, quality, steps: int | None = None, guidance: float = 5.0):
        q2b.check_unet(pipe.unet)
        self.pipe, self.q2b, self.quality_source = pipe, q2b, quality
        self.steps = steps or q2b.n_steps
        self.guidance = guidance
        self.fab_w = fab_weights(layer_stats(pipe.unet), q2b.layers)
        # T2Q on the pipeline's own text encoder (SD: its CLIP text model; SDXL: text_encoder_2) reads the
        # pooled output of the pass generation makes anyway: quality prediction then costs only the small head.
        self.shares_text_encoder = hasattr(quality, "reads_same_text_as") and \
            quality.reads_same_text_as(*pooled_text_encoder(pipe))

    @classmethod
    def from_pretrained(cls, q2b_path: str | Path, model: str | None = None, quant_state: str | None = None,
                        t2q: str | None = None, load: dict | None = None) -> "QLIPPipeline":
        """Everything from a q2b-stage folder; `model` / `quant_state` / `t2q` override what it recorded."""

        q2b = load_q2b(q2b_path, deployed=True)
        meta = q2b.meta
        model = model or meta["model"]
        load = load or {}
        pipe = load_quantized_pipeline(model, quant_state or follow_link(q2b_path, meta["quant_state"]), **load)
        criterion = meta["criterion"]
        fp_pipe = None
        if criterion == "complexity":  # needs FP images: a second, unquantized pipeline

            fp_pipe = load_pipeline(model, **load)
        quality = quality_source(criterion, model, fp_pipe or pipe, t2q or follow_link(q2b_path, meta.get("t2q")),
                                 meta["steps"], meta["guidance"], load)
        return cls(pipe, q2b, quality, meta["steps"], meta["guidance"])

    def to(self, device) -> "QLIPPipeline":
        """The pipeline and the quality source (T2Q's text tower, the complexity criterion's FP
        pipeline) onto `device`. Q2B stays on the CPU: a few tables whose bit decisions are read
        on the host anyway."""
        self.pipe.to(device)
        for part in (self.quality_source, getattr(self.quality_source, "pipe", None)):
            if hasattr(part, "to"):
                part.to(device)
        return self

    def fab_of(self, tables: torch.Tensor) -> torch.Tensor:
        return weighted_fab(torch.as_tensor(tables, dtype=torch.float64), self.fab_w)

    @torch.no_grad()
    def set_bits(self, prompts: Sequence[str], pooled: torch.Tensor | None = None) -> dict:
        """Predict quality, decide bits, and put the batch's policy in force. `pooled`: the
        prompts' pooled text embeddings (`encode_prompts(...).pooled`), used when the quality
        source shares the pipeline's text encoder (else it encodes the prompts itself)."""

        if pooled is not None and self.shares_text_encoder:
            q = self.quality_source.predict_pooled(pooled).float().cpu()
        else:
            q = self.quality_source.predict(list(prompts)).float().cpu()
        tables = self.q2b(q)
        policy = tables.amax(dim=0)
        set_bit_policy(self.pipe.unet, policy)
        shares = {int(b): float((policy == b).float().mean()) for b in self.q2b.bit_options}
        return {"prompts": list(prompts), "q": q.tolist(), "prompt_fab": self.fab_of(tables).tolist(),
                "fab": float(self.fab_of(policy)), "shares": shares, "policy": policy}

    def prepare_batch(self, prompts: Sequence[str]) -> tuple[dict, Conditioning | None]:
        """`set_bits` for a batch, through one text-encoder pass when the quality source shares the
        pipeline's encoder; returns the record and the text conditioning generation should
        reuse (None: generation encodes the prompts itself)."""

        if not self.shares_text_encoder:
            return self.set_bits(prompts), None
        text = encode_prompts(self.pipe, prompts)
        return self.set_bits(prompts, pooled=text.pooled), text

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int] | None = None, batch_size: int = 1,
                 guidance: float | None = None, progress: bool = True, on_batch=None) -> QLIPOutput:

        prompts = list(prompts)
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        images, batches = [], []
        for i in range(0, len(prompts), batch_size):
            record, embeds = self.prepare_batch(prompts[i:i + batch_size])
            record["seeds"] = seeds[i:i + batch_size]
            if on_batch is not None:
                on_batch(len(batches), record)
            images.append(generate(self.pipe, record["prompts"], record["seeds"], steps=self.steps,
                                   guidance=self.guidance if guidance is None else guidance,
                                   batch_size=batch_size, progress=False, text=embeds))
            batches.append(record)
        quality = torch.tensor([q for b in batches for q in b["q"]])
        return QLIPOutput(np.concatenate(images), quality, batches)


def check_deployed_sampler(q2b_meta: dict, q2b_path: str | Path, deployed: dict, where: str) -> None:
    """A T2Q-driven Q2B (its T2Q's targets) belongs to the sampler its scored set was drawn with, which
    the q2b stage checked and recorded: refuse to deploy it under other steps, guidance or scheduler.
    Other criteria do not read a scored set, so only the calibrated steps bind them (checked elsewhere)."""
    if q2b_meta.get("criterion") != "t2q":
        return
    recorded = q2b_meta.get("sampler") or {"steps": q2b_meta.get("steps"), "guidance": q2b_meta.get("guidance")}
    check_same_sampler(recorded, deployed, f"the T2Q scored set behind {q2b_path} (q2b.json)", where)


def log_batch(i: int, record: dict) -> None:
    """`on_batch` hook that prints what QLIP chose for a batch."""
    shares = ", ".join(f"{b}-bit {s:.0%}" for b, s in record["shares"].items())
    qs = ", ".join(f"{q:.3g}" for q in record["q"])
    print(f"batch {i}: q = [{qs}] -> FAB {record['fab']:.2f} ({shares})")


def write_bits(out: Path, result: QLIPOutput, qlip: QLIPPipeline) -> dict:
    """The chosen bits into `out`: bits.json (summary and per batch), bits.safetensors
    (each batch's [layers, steps] table), bits_heatmap.png and bit_shares.png. Returns the summary."""
    q2b = qlip.q2b
    tables = torch.stack([b["policy"] for b in result.batches])
    save_tensors(out / "bits.safetensors", {"policies": tables})
    batches = [{k: v for k, v in b.items() if k != "policy"} for b in result.batches]
    summary = {"fab": result.fab, "bit_options": q2b.bit_options, "criterion": q2b.meta.get("criterion"),
               "n_batches": len(batches)}
    write_json_atomic(out / "bits.json", {"summary": summary, "layers": q2b.layers, "batches": batches})
    shown = {f"batch {i}: FAB {result.batches[i]['fab']:.2f}": tables[i] for i in range(min(3, len(tables)))}
    plot_bit_heatmaps(shown, q2b.layers, q2b.bit_options, out / "bits_heatmap.png", title="QLIP bits per batch")
    plot_bit_shares(tables, q2b.layers, q2b.bit_options, out / "bit_shares.png")
    return summary
