"""One method's QDiffBench pass as a Lightning predict loop.

One predict pass covers the splits in `active` (the runner runs one split at a
time, so each finished (method, split) can be kept: pipeline/evaluation/progress.py);
the method's pipeline is loaded once and kept across its passes until `release`.
predict_step generates one global batch (same prompts and seeds for every
method), runs the Inception once for all Frechet metrics and updates every
metric of the batch's split; on_predict_end computes them, which syncs the
metric states across processes. The FP pass (first) fills the per-process
FP reference that the quantized passes compare against. Per-image scores to FP
are kept (`per_image`, in image order over every process) for the confidence
intervals of each row and the paired tests between methods."""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from data.images import list_images
from pipeline.evaluation.methods import EvalMethod
from pipeline.evaluation.real_images import real_features
from pipeline.evaluation.reference import FPReference
from pipeline.evaluation.settings import EvalSettings
from pipeline.evaluation.splits import BatchDataset, Split, identity
from pipeline.evaluation.statistics import mean_ci
from pipeline.metrics import FAB, BitOPs, FidelityToFP, FrechetDistance, Timing
from pipeline.metrics.clip import clip_score_metric
from pipeline.metrics.cost import layer_stats, model_size_bytes
from pipeline.metrics.inception import shared_backbone
from pipeline.sampling import generate


@dataclass
class SharedState:
    """What one process keeps between the passes of the methods."""

    reference: FPReference = field(default_factory=FPReference)
    real_features: torch.Tensor | None = None  # this process's share of the real set
    n_real: int = 0


def all_gather_objects(obj):
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _float(v):
    v = float(v)
    return None if np.isnan(v) or np.isinf(v) else v


def fidelity_intervals(per_image: dict, images_per_prompt: int) -> dict:
    """`<score>_ci_low` / `<score>_ci_high`: the bootstrap interval of each per-image score's mean (over prompts)."""
    prompts = [i // images_per_prompt for i in per_image["index"]]
    out = {}
    for name, values in per_image.items():
        if name != "index" and values:
            _, out[f"{name}_ci_low"], out[f"{name}_ci_high"] = mean_ci(values, prompts)
    return out


class MethodEvaluation(L.LightningModule):
    def __init__(self, method: EvalMethod, model: str, splits: list[Split], batches: list[dict],
                 settings: EvalSettings, shared: SharedState, load: dict | None = None):
        super().__init__()
        self.method, self.model_name, self.load_options = method, model, load or {}
        self.splits, self.batches, self.settings, self.shared = splits, batches, settings, shared
        self.pipe = None
        self.active: list[Split] = list(splits)  # the splits of the next predict pass
        self.split_metrics = nn.ModuleDict()
        self.results: dict[str, dict] = {}
        self.per_image: dict[str, dict | None] = {}  # split -> per-image scores to FP (None for the FP model)
        self.grid_images: dict[str, np.ndarray] = {}
        self._grid: dict[tuple[str, int], np.ndarray] = {}
        self.size = None  # (artifact bytes, where measured, arithmetic estimate): once per method

    # -- data: whole global batches dealt to processes, never padded -----------
    def predict_dataloader(self):
        from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

        names = {s.name for s in self.active}
        ds = BatchDataset([b for b in self.batches if b["split"] in names])
        sampler = UnrepeatedDistributedSampler(ds, num_replicas=self.trainer.world_size,
                                               rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(ds, batch_size=None, sampler=sampler, collate_fn=identity)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # prompts and ints; images are made on the device by the pipeline

    # -- setup ----------------------------------------------------------------
    def on_predict_start(self) -> None:
        s = self.settings
        if self.pipe is None:  # loaded once per method, kept across its splits
            with torch.inference_mode(False):  # quantizer state loaded here must stay a normal tensor
                self.pipe = self.method.load(self.model_name, self.load_options)
            self.pipe.set_progress_bar_config(disable=True)
        self.pipe.to(self.device)  # a predict Trainer's teardown moves the module (not the pipeline) back
        self.method.to(self.device)
        unet = self.pipe.unet
        side = s.resolution or unet.config.sample_size * self.pipe.vae_scale_factor
        latent = side // self.pipe.vae_scale_factor
        stats = layer_stats(unet, batch=2, resolution=latent * 8, tokens=self.pipe.tokenizer.model_max_length)
        layers, w_bits = self.method.policy_layers(self.pipe), self.method.weight_bits(self.pipe)
        if self.size is None:
            with torch.inference_mode(False):  # the export copies and packs the UNet's tensors
                self.size = (*self.method.artifact_bytes(self.pipe, self.model_name), model_size_bytes(unet))
        if s.real_images and self.shared.real_features is None:
            self._load_real_features(side)
        self.split_metrics = nn.ModuleDict()
        self._grid = {}
        for split in self.active:
            m = nn.ModuleDict({"fab": FAB(stats, layers), "bitops": BitOPs(stats, layers, w_bits), "timing": Timing()})
            if not self.method.is_reference:
                m["fidelity"] = FidelityToFP(lpips=s.lpips)
                if s.fid:
                    m["fid_fp"] = FrechetDistance(s.fid_dims)
                if s.sfid:
                    m["sfid_fp"] = FrechetDistance("spatial", s.sfid_grid)
            if s.real_images:
                m["fid_real"] = FrechetDistance(s.fid_dims)
                if self.shared.real_features.shape[0]:
                    m["fid_real"].update(features=self.shared.real_features, real=True)
            if s.clip_path:
                m["clip"] = clip_score_metric(s.clip_path)
            self.split_metrics[split.name] = m
        self.split_metrics.to(self.device)

    def _load_real_features(self, side: int) -> None:
        files = list_images(self.settings.real_images)
        mine = files[self.trainer.global_rank::self.trainer.world_size]
        backbone = shared_backbone().to(self.device)
        feats = real_features(mine, side, backbone, self.settings.fid_tap, self.settings.inception_batch,
                              self.device, progress=self.trainer.is_global_zero) if mine else \
            torch.zeros(0, self.settings.fid_dims)
        self.shared.real_features, self.shared.n_real = feats, len(files)

    # -- one batch --------------------------------------------------------------
    def predict_step(self, batch, batch_idx):
        s = self.settings
        split, idx, prompts, seeds = batch["split"], batch["indices"], batch["prompts"], batch["seeds"]
        m = self.split_metrics[split]
        n = len(idx)
        t0 = time.perf_counter()
        # A text-aware method may run its batch in smaller calls (each with its prompts' own bits); the global
        # batch, and so which process holds which FP reference, stays the same.
        call = s.text_aware_batch if self.method.text_aware and s.text_aware_batch else n  # prompts per call
        parts = []
        for i in range(0, n, call):
            embeds = self.method.before_batch(self.pipe, prompts[i:i + call])
            policy = self.method.policy(self.pipe)
            parts.append(generate(self.pipe, prompts[i:i + call], seeds[i:i + call], steps=s.steps,
                                  guidance=s.guidance, batch_size=call, resolution=s.resolution, progress=False,
                                  text=embeds))
            m["fab"].update(policy, len(parts[-1]))
            m["bitops"].update(policy, len(parts[-1]))
        images = np.concatenate(parts)
        t1 = time.perf_counter()
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        xd = x.to(self.device)
        taps = s.taps()
        feats = {}
        if taps:
            backbone = shared_backbone().to(self.device)
            for i in range(0, n, s.inception_batch):
                part = backbone.taps(xd[i:i + s.inception_batch], taps, s.sfid_grid)
                for k, v in part.items():
                    feats.setdefault(k, []).append(v)
            feats = {k: torch.cat(v) for k, v in feats.items()}
        if self.method.is_reference:
            self.shared.reference.put(split, idx, prompts, seeds, x, feats)
        else:
            ref = self.shared.reference.get(split, idx, prompts, seeds, label=self.method.label)
            if s.fid:
                m["fid_fp"].update(features=ref.features[s.fid_tap], real=True)
                m["fid_fp"].update(features=feats[s.fid_tap], real=False)
            if s.sfid:
                m["sfid_fp"].update(features=ref.features["spatial"], real=True)
                m["sfid_fp"].update(features=feats["spatial"], real=False)
            m["fidelity"].update(ref.images.to(self.device), xd, idx)
        if "fid_real" in m:
            m["fid_real"].update(features=feats[s.fid_tap], real=False)
        if "clip" in m:
            m["clip"].update(xd, list(prompts))
        m["timing"].update(t1 - t0, time.perf_counter() - t1, n)
        for j, i in enumerate(idx):
            if i < s.grid_n:
                self._grid[(split, i)] = images[j]
        return None

    # -- results ----------------------------------------------------------------
    def on_predict_end(self) -> None:
        with warnings.catch_warnings():  # a process may hold no batch of some split: its states are zeros
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            for split in self.active:
                self.results[split.name] = self._compute(self.split_metrics[split.name], split)
        grids = {}
        for part in all_gather_objects(self._grid):
            grids.update(part)
        for split in self.active:
            keys = sorted(k for k in grids if k[0] == split.name)
            if keys:
                self.grid_images[split.name] = np.stack([grids[k] for k in keys])
        self.split_metrics = nn.ModuleDict()  # free the covariance sums

    def release(self) -> None:
        """After the method's last pass: free its pipeline."""
        self.pipe = None

    def _compute(self, m: nn.ModuleDict, split: Split) -> dict:
        timing = dict(m["timing"].compute())  # synced sums over processes
        out = {"n_images": int(timing.pop("n_images")), "n_prompts": len(split.prompts)}
        out.update({k: _float(v) for k, v in m["fab"].compute().items()})
        out["bitops_T"] = _float(m["bitops"].compute()) / 1e12
        # the deployable artifact's bytes on disk (None: not exportable), and the arithmetic estimate beside it
        out["size_bytes"], out["size_source"], out["size_estimate_bytes"] = self.size
        timing = {k: _float(v) for k, v in timing.items()}
        if self.method.is_reference:
            out.update({"fid_to_fp": 0.0 if self.settings.fid else None,
                        "sfid_to_fp": 0.0 if self.settings.sfid else None})
            self.per_image[split.name] = None
        else:
            out["fid_to_fp"] = _float(m["fid_fp"].compute()) if "fid_fp" in m else None
            out["sfid_to_fp"] = _float(m["sfid_fp"].compute()) if "sfid_fp" in m else None
            out.update({k: _float(v) for k, v in m["fidelity"].compute().items()})
            per_image = self.per_image[split.name] = m["fidelity"].per_image()
            out.update(fidelity_intervals(per_image, split.images_per_prompt))
        if "fid_real" in m:
            out["fid_to_real"] = _float(m["fid_real"].compute())
        if "clip" in m:
            out["clip_score"] = _float(m["clip"].compute())
        out.update(timing)
        return out
