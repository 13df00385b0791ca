"""The engineering every stage shares: the common stage settings, the one
Trainer factory and the one rank check.

A stage is a config dataclass plus a function, `calibrate(CalibrateConfig(...),
trainer={...}) -> Path`; `trainer` holds Lightning Trainer arguments (the CLI's
`--trainer.*` flags), so the same call scales from a CPU to a cluster."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import typing
import warnings
from dataclasses import dataclass, field, fields
from functools import cache

import diffusers
import lightning as L
import torch
import transformers

from pipeline.errors import UserError
from pipeline.models import check_model, check_scheduler, default_model
from pipeline.quant.quantizer import SUPPORTED_BITS


@dataclass
class StageConfig:
    """Settings every stage takes."""

    model: str = field(default_factory=default_model)
    """'embedded', 'tiny-random', a local diffusers folder, or a cached hub id"""
    allow_download: bool = False
    """let diffusers fetch a hub id"""
    run_dir: str = "runs/default"
    """where this stage writes its artifacts"""
    overwrite: bool = False
    """replace results already in --run-dir (progress made under the same settings is reused; docs/reliability.md)"""
    fresh: bool = False
    """start over: discard results and every reusable progress of this stage in --run-dir"""
    seed: int = 0
    """seed of everything random (noise, sampling order)"""
    scheduler: str | None = None
    """sampler: pndm | ddim | ddpm | euler | euler-ancestral | heun | dpm++ | lcm (default: the model's own)"""
    allow_pickle: bool = False
    """load pickle-only (.bin) model weights; unpickling can run arbitrary code, so only for trusted files"""

    def load_options(self) -> dict:
        """How this stage loads the model (pipeline.models.load_pipeline's keywords)."""
        return {"allow_download": self.allow_download, "scheduler": self.scheduler, "allow_pickle": self.allow_pickle}


@dataclass(frozen=True)
class Range:
    """The values a numeric flag takes: the interval from `lo` to `hi` (None: unbounded; an `open_` end is
    excluded), or one of `values`; `text` says it in words where the interval does not."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False
    values: tuple = ()
    text: str = ""

    def allows(self, v) -> bool:
        if self.values:
            return v in self.values
        return ((self.lo is None or (v > self.lo if self.open_lo else v >= self.lo))
                and (self.hi is None or (v < self.hi if self.open_hi else v <= self.hi)))

    def __str__(self) -> str:
        if self.text or self.values:
            return self.text or "one of " + ", ".join(map(str, self.values))
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.open_lo else '['}{self.lo}, {self.hi}{')' if self.open_hi else ']'}"
        if self.lo is not None:
            return f"{'>' if self.open_lo else '>='} {self.lo}"
        return "a finite number" if self.hi is None else f"{'<' if self.open_hi else '<='} {self.hi}"


COUNT = Range(1)  # how many of something (prompts, steps, a batch): at least one
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, open_lo=True)
ANY = Range()  # any finite number
BITS = Range(values=SUPPORTED_BITS, text="an integer in 2..16, or 32 (full precision)")

# The one policy for numeric flags: every int/float field of every stage config, by name (a config class
# may override a name whose meaning is its own: `flag_ranges`). tests/test_bad_input.py fails on a numeric
# field that is missing here. What needs the model (--resolution a multiple of the VAE's scale factor) or
# another flag (--target-fab within the bit options) is checked where that is known.
FLAG_RANGES = {
    "seed": Range(0, 2**32 - 1),  # numpy's seed range; Lightning silently replaces a seed outside it by 0
    # sampling (pipeline.models.sampling_defaults checks the same of the model's own defaults)
    "steps": COUNT, "guidance": NON_NEGATIVE, "resolution": COUNT,
    # prompts, images and batches
    "n": COUNT, "cali_n": COUNT, "score_n": COUNT, "q2b_n": COUNT, "limit": COUNT, "n_reference": COUNT,
    "val_n": NON_NEGATIVE,  # 0: no validation
    "deploy_n": NON_NEGATIVE,  # demo: images timed on the int8 kernels; 0: no export, no timing
    "images_per_prompt": COUNT, "grid_n": COUNT, "richness_scenes": COUNT, "shard_size": COUNT,
    "batch_size": COUNT, "eval_batch": COUNT, "inception_batch": COUNT, "text_aware_batch_size": COUNT,
    # quantization and calibration
    "w_bits": BITS, "a_bits": BITS, "softmax_bits": BITS, "relax_bits": BITS, "bits": BITS,
    "cali_st": COUNT, "iters_w": NON_NEGATIVE, "iters_a": NON_NEGATIVE,  # 0 iterations: the initial ranges
    "relax_tau": Range(0, 1, open_hi=True),  # a fraction of the steps
    "ram_cap_gib": NON_NEGATIVE,  # 0: every item on disk
    # training (T2Q, Q2B)
    "epochs": COUNT, "q2b_epochs": COUNT, "plot_every": COUNT, "lr": POSITIVE, "weight_decay": NON_NEGATIVE,
    "patience": NON_NEGATIVE,  # 0: no early stopping
    "eval_every": NON_NEGATIVE, "eval_n": COUNT,  # q2b's and t2q's paired evaluation while training; 0: off
    "dual_lr": NON_NEGATIVE, "rho": NON_NEGATIVE,  # 0 turns the integral / proportional term off
    "kappa": ANY,  # the sign says which prompts get the bits (tests/test_q2b.py trains kappa -1)
    "tau_start": POSITIVE, "tau_end": POSITIVE,
    "target_fab": ANY,  # within the bit options' range: check_target_fab, once the options are known
    # GIQA (score) and the T2Q targets
    "gmm_components": COUNT, "pca_dim": COUNT, "knn_k": COUNT, "pca_variance": Range(0, 1, open_lo=True),
    "norm_quantile": Range(0, 0.5, open_hi=True),  # min-max between the q and 1 - q quantiles
    # the embedded world (pretrain)
    "n_train": COUNT, "n_val": COUNT, "clip_steps": COUNT, "vae_steps": COUNT, "unet_steps": COUNT,
    "clip_batch_size": COUNT, "vae_batch_size": COUNT, "unet_batch_size": COUNT,
    "clip_lr": POSITIVE, "vae_lr": POSITIVE, "unet_lr": POSITIVE, "cond_dropout": Range(0, 1), "threads": COUNT,
    "monitor_every": NON_NEGATIVE,  # 0: never
}


def flag_name(field_name: str) -> str:
    """The flag a user types for a config field (pipeline.fit generates them so)."""
    return "--" + field_name.replace("_", "-")


def numeric_fields(cls) -> dict[str, type]:
    """The int and float fields of config dataclass `cls` (optional ones too), name -> int or float."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        kinds = typing.get_args(hints[f.name]) or (hints[f.name],)
        kind = next((k for k in (int, float) if k in kinds), None)
        if kind is not None:
            out[f.name] = kind
    return out


def flag_ranges(cls) -> dict[str, Range]:
    return {**FLAG_RANGES, **getattr(cls, "flag_ranges", {})}


def check_flags(cfg) -> None:
    """Every stage function's first call: what can be checked of its config without loading anything or writing
    to --run-dir. Each numeric field against its range (None, an optional flag left at its default, is not
    checked), then --model (it names something loadable) and --scheduler. The message names the flag."""
    ranges = flag_ranges(type(cfg))
    for name, kind in numeric_fields(type(cfg)).items():
        value, flag = getattr(cfg, name), flag_name(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{flag} {value!r} must be a number")
        if not math.isfinite(value):
            raise UserError(f"{flag} {value} must be finite" + ("" if ranges[name] == ANY else f" and {ranges[name]}"))
        if kind is int and value != int(value):
            raise UserError(f"{flag} {value} must be an integer")
        if not ranges[name].allows(value):
            raise UserError(f"{flag} {value} must be {ranges[name]}")
    check_model(cfg.model, cfg.allow_download)
    check_scheduler(cfg.scheduler)


def is_global_zero() -> bool:
    """True in the process of global rank 0, before any Trainer exists.

    Every launcher Lightning supports sets one of these: torchrun and Lightning's
    own DDP launcher (RANK, or LOCAL_RANK with NODE_RANK), SLURM (SLURM_PROCID).
    All must be 0: on a second node LOCAL_RANK is 0 while NODE_RANK is not."""
    return all(int(os.environ.get(v) or 0) == 0 for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


@cache
def quiet_libraries() -> None:
    """Once per process, the libraries' noise off: Lightning's banners ("GPU available", tips,
    seed lines; a stage builds many internal Trainers and each would print them) and the model
    loaders' per-component bars (diffusers, transformers); the stage's own bars show its progress."""
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.accelerators.cuda", "lightning.fabric.utilities.seed",
                 "lightning.pytorch.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*predict returned None.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*|.*litmodels.*|.*treespec, LeafSpec.*")


def make_trainer(trainer: dict | None = None, *, defaults: dict | None = None, forced: dict | None = None,
                 progress: bool = False) -> L.Trainer:
    """The one Trainer builder: the stage's `defaults` (no logger, checkpoints,
    model summary; a progress bar only where this Trainer is the stage's main
    loop), then the user's `trainer` flags (None values ignored), then what the
    stage's loop cannot work without (`forced`)."""
    quiet_libraries()
    kwargs = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False,
              "enable_progress_bar": progress, **(defaults or {})}
    kwargs.update({k: v for k, v in (trainer or {}).items() if v is not None})
    kwargs.update(forced or {})
    return L.Trainer(**kwargs)


# --trainer.precision values and the autocast dtype of the FP passes (None: full fp32)
FP_PASS_DTYPES = {None: None, 32: None, "32": None, "32-true": None,
                  16: torch.float16, "16": torch.float16, "16-mixed": torch.float16,
                  "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16}


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def device_for(accelerator, devices, local_rank: int, n_cuda: int, mps: bool = False) -> torch.device:
    """The device of process `local_rank` for Lightning's `accelerator` / `devices` options,
    as Lightning's strategy.root_device picks it (a pure function: `stage_device` is this
    with the machine's values).

    accelerator: None/'auto' (CUDA, else MPS, else CPU), 'cpu', 'gpu'/'cuda', 'mps'.
    devices: None/'auto'/-1/'-1' (all), an int N (the first N), a list [2, 3] or '2,3'
    (those indices; under DDP process k takes the k-th entry)."""
    acc = str(accelerator or "auto").lower()
    if acc == "auto":
        acc = "cuda" if n_cuda else ("mps" if mps else "cpu")
    if acc == "gpu":
        acc = "cuda" if n_cuda or not mps else "mps"
    if acc == "cpu":
        return torch.device("cpu")
    if acc == "mps":
        if not mps:
            raise ValueError("--trainer.accelerator mps: no MPS device on this machine; use cpu")
        return torch.device("mps")
    if acc != "cuda":
        raise ValueError(f"--trainer.accelerator {accelerator!r}: the stages run on cpu, gpu (cuda), mps or auto")
    if not n_cuda:
        raise ValueError(f"--trainer.accelerator {accelerator}: no CUDA device is visible on this machine "
                         f"(torch.cuda.is_available() is False); use --trainer.accelerator cpu")
    if isinstance(devices, str):
        devices = devices.strip()
        if devices in ("auto", "-1"):
            devices = None
        elif "," in devices or devices.startswith("["):
            devices = [int(d) for d in devices.strip("[]").split(",") if d.strip()]
        else:
            devices = int(devices)
    if devices is None or devices == -1:
        ids = list(range(n_cuda))
    elif isinstance(devices, int):
        if devices < 1:
            raise ValueError(f"--trainer.devices {devices}: give a positive count, a list such as 0,1, or auto")
        ids = list(range(devices))
    else:
        ids = [int(d) for d in devices]
    bad = [i for i in ids if not 0 <= i < n_cuda]
    if bad or not ids:
        raise ValueError(f"--trainer.devices {devices}: CUDA devices {bad or ids} do not exist here "
                         f"({n_cuda} visible)")
    if not 0 <= local_rank < len(ids):
        raise ValueError(f"local rank {local_rank} has no device in --trainer.devices {devices} ({ids})")
    return torch.device("cuda", ids[local_rank])


def stage_device(trainer: dict | None = None) -> torch.device:
    """The one place that decides where a stage computes: the device the Trainer built from the
    same `--trainer.*` options puts its module on (strategy.root_device). Under DDP each process
    gets its own (LOCAL_RANK). Every stage puts every part of the pipeline there."""
    opts = trainer or {}
    return device_for(opts.get("accelerator"), opts.get("devices"), int(os.environ.get("LOCAL_RANK") or 0),
                      _cuda_count(), _mps())


def fp_pass_dtype(trainer: dict | None = None) -> torch.dtype | None:
    """The autocast dtype --trainer.precision gives the full-precision passes (None: fp32)."""
    precision = (trainer or {}).get("precision")
    if precision not in FP_PASS_DTYPES:
        raise ValueError(f"--trainer.precision {precision!r}: the stages support 32-true, 16-mixed and "
                         f"bf16-mixed (mixed precision applies to the FP passes; fake quantization runs in fp32)")
    return FP_PASS_DTYPES[precision]


def fp_autocast(trainer: dict | None, device: torch.device):
    """Autocast of an FP pass outside a Lightning loop (sampling, calibration data, teachers);
    a no-op at precision 32, so CPU runs stay bit-identical."""
    dtype = fp_pass_dtype(trainer)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
