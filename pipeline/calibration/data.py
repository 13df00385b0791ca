"""Calibration data (Q-Diffusion): UNet inputs recorded on sampling trajectories.

At `cali_st` uniformly spaced steps of a `steps`-step schedule, record x_t for
every calibration prompt, with its conditional and unconditional text
embeddings (both CFG branches). Data lives in disk shards, one file per prompt
batch for the embeddings and one per (batch, step) for x_t, so memory stays
bounded for SD-sized models and an interrupted collection resumes at the
first unfinished shard: `index.json` (artifacts.ShardIndex) records each
shard's checksums once it is written, and a shard that is missing, truncated
or changed is deleted and collected again. `meta.json` ties the data to its
model, resolution and schedule; loading it for anything else is refused with
what differs."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from pipeline.artifacts import ShardIndex, load_tensors, save_tensors, write_json_atomic
from pipeline.prediction import PredictionSpace, prediction_space
from pipeline.quant import first_calls
from pipeline.quant.state import model_fingerprint
from pipeline.sampling import (
    Conditioning,
    denoise,
    encode_prompts,
    initial_latents,
    noise_generators,
    prompt_seeds,
    unet_call,
)

META = "meta.json"


def cali_step_indices(steps: int, cali_st: int) -> list[int]:
    """`cali_st` uniformly spaced step indices of a `steps`-step schedule (first and last included)."""
    if not 1 <= cali_st <= steps:
        raise ValueError(f"cali_st={cali_st} must be between 1 and the number of steps ({steps})")
    if cali_st == 1:
        return [0]
    return sorted({round(i * (steps - 1) / (cali_st - 1)) for i in range(cali_st)})


def data_signature(pipe, steps: int, guidance: float, resolution: int) -> dict:
    pipe.scheduler.set_timesteps(steps)
    fp = model_fingerprint(pipe.unet)
    return {"weights_sha256": fp["weights_sha256"], "unet_class": type(pipe.unet).__name__,
            "resolution": resolution, "steps": steps, "timesteps": [_plain(t) for t in pipe.scheduler.timesteps],
            "scheduler": type(pipe.scheduler).__name__, "guidance": guidance}


def _plain(t) -> int | float:
    """A timestep as JSON: an int where it is one (DDIM, PNDM), else the float (Euler, DPM-Solver)."""
    t = float(t)
    return int(t) if t.is_integer() else t


def check_signature(meta: dict, want: dict, path) -> None:
    diff = [k for k in want if meta["signature"].get(k) != want[k]]
    if diff:
        detail = "; ".join(f"{k}: data {meta['signature'].get(k)!r} vs now {want[k]!r}" for k in diff[:4])
        raise ValueError(f"calibration data in {path} belongs to another setting ({detail}); "
                         f"collect it again into another folder")


def _same_collection(old: dict, new: dict) -> bool:
    return all(old.get(k) == new[k] for k in ("signature", "prompts", "cali_steps", "batch_size", "seed"))


def collect(pipe, prompts: Sequence[str], out_dir: str | Path, steps: int = 20, cali_st: int = 5,
            guidance: float = 5.0, batch_size: int = 8, seed: int = 0, resolution: int | None = None,
            shard_ids: Sequence[int] | None = None, discard_stale: bool = False,
            share: tuple[int, int] = (0, 1), wait_s: float = 6 * 3600) -> Path:
    """Record calibration data for `prompts` into `out_dir` (resumable).

    `shard_ids` restricts the work to some prompt batches. `share` = (rank, world) of processes running at
    once on one folder (torchrun, SLURM: `shards.running_share`): rank 0 writes meta.json (and discards stale
    data), each rank collects every world-th batch, and every rank returns only once all batches are finished
    (waiting up to `wait_s` for the others). Data of other settings in `out_dir` is refused, or with
    `discard_stale` (--overwrite) deleted and collected again."""
    rank, world = share

    if not prompts:
        raise ValueError("no calibration prompts")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    sig = data_signature(pipe, steps, guidance, resolution)
    indices = cali_step_indices(steps, cali_st)
    meta_path = out / META
    n_shards = (len(prompts) + batch_size - 1) // batch_size
    meta = {"signature": sig, "cali_steps": indices, "n_prompts": len(prompts), "batch_size": batch_size,
            "n_shards": n_shards, "seed": seed, "prompts": list(prompts),
            "prediction": prediction_space(pipe.scheduler).to_meta()}  # refuses an unsupported type up front
    if rank > 0:  # rank 0 checks, discards and writes the folder's meta; the others wait for it
        _wait(lambda: meta_path.is_file() and _same_collection(json.loads(meta_path.read_text()), meta),
              wait_s, f"rank 0 to write {meta_path} for this collection")
    elif meta_path.is_file() and discard_stale and not _same_collection(json.loads(meta_path.read_text()), meta):
        print(f"note: --overwrite: discarding the calibration data of other settings in {out}")
        shutil.rmtree(out)
        out.mkdir(parents=True)
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        check_signature(old, sig, out)
        if not _same_collection(old, meta):
            raise ValueError(f"{out} holds calibration data of other prompts, steps or seed; pass --overwrite true to "
                             f"discard it, or use another folder")
        if "prediction" not in old:  # collected before the space was recorded; the signature matched, so it is this
            write_json_atomic(meta_path, {**old, "prediction": meta["prediction"]})
    else:
        write_json_atomic(meta_path, meta)
    index = ShardIndex(out)
    mine = [b for b in (range(n_shards) if shard_ids is None else shard_ids) if b % world == rank]
    todo = [b for b in mine if not index.finished(*shard_files(out, b, indices))]
    for b in tqdm(todo, desc="calibration data", leave=False):
        chunk = prompts[b * batch_size:(b + 1) * batch_size]
        text = encode_prompts(pipe, chunk, resolution)
        save_tensors(out / f"emb_{b:05d}.safetensors", text.tensors())
        seeds = prompt_seeds(seed, b * batch_size, len(chunk))
        records = {}

        def record(i, x, t):
            if i in indices:
                records[i] = x.detach().float().cpu().contiguous()  # fp32 also after an autocast pass

        gens = noise_generators(seeds)  # initial latents, then a stochastic sampler's step noise
        denoise(pipe, text, initial_latents(pipe, resolution=resolution, generators=gens), steps, guidance,
                stop=indices[-1] + 1, on_unet_input=record, generators=gens)
        for i in indices:
            save_tensors(out / f"x_{b:05d}_{i:03d}.safetensors", {"x": records[i]})
        index.record(*shard_files(out, b, indices))  # after the shard's last file: the shard is finished
    if world > 1:
        _wait(lambda: not missing_shards(out, range(n_shards), indices), wait_s,
              f"the other ranks' calibration batches in {out}")
    return out


def missing_shards(folder: Path, batches, indices: Sequence[int]) -> list[int]:
    """Batches not yet recorded as finished (read only: another process may be writing them)."""
    recorded = ShardIndex(folder).read()
    return [b for b in batches if not all(f.name in recorded and f.is_file() for f in shard_files(folder, b, indices))]


def _wait(done, wait_s: float, what: str, poll_s: float = 0.5) -> None:
    deadline = time.monotonic() + wait_s
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {wait_s:.0f} s for {what}; is every rank running? Rerun the same command: "
                               f"finished batches are kept")
        time.sleep(poll_s)


def shard_files(folder: Path, b: int, indices: Sequence[int]) -> list[Path]:
    """The files of prompt batch `b`: its text embeddings, then x_t per calibrated step."""
    return [folder / f"emb_{b:05d}.safetensors", *(folder / f"x_{b:05d}_{i:03d}.safetensors" for i in indices)]


class CalibrationData:
    """Read access to a collected folder: samples per step, as UNet call inputs."""

    def __init__(self, path: str | Path, pipe=None, steps: int | None = None, guidance: float | None = None,
                 resolution: int | None = None):
        self.path = Path(path)
        if not (self.path / META).is_file():
            raise FileNotFoundError(f"{self.path / META} is missing: collect calibration data first")
        self.meta = json.loads((self.path / META).read_text())
        if pipe is not None:
            sig = self.meta["signature"]
            want = data_signature(pipe, steps or sig["steps"], sig["guidance"] if guidance is None else guidance,
                                  resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor)
            check_signature(self.meta, want, self.path)
        self._pipe_space = prediction_space(pipe.scheduler) if pipe is not None else None  # on the signature's schedule
        self.steps = self.meta["cali_steps"]
        calls = self.meta["signature"]["timesteps"]  # one per UNet call; a step's first call is its input
        self.timesteps = [calls[k] for k in first_calls(calls)]
        missing = missing_shards(self.path, range(self.meta["n_shards"]), self.steps)
        if missing:
            raise ValueError(f"calibration data in {self.path} is incomplete (shards {missing[:5]} missing); "
                             f"run the collection again to resume it")

    @property
    def space(self) -> PredictionSpace:
        """The UNet's prediction space on this data's schedule (docs/calibration.md#prediction-types)."""
        if "prediction" in self.meta:
            return PredictionSpace.from_meta(self.meta["prediction"])
        if self._pipe_space is None:
            raise ValueError(f"calibration data in {self.path} records no prediction type (collected before it "
                             f"was recorded); open it with its pipeline, CalibrationData(path, pipe), or collect "
                             f"it again")
        return self._pipe_space

    @property
    def fix(self) -> str:
        return "run the same command again: the collection checks every shard and redoes a bad one"

    def batches(self, step_index: int | None = None):
        """Yield (step index, x_t, t, text Conditioning) per shard and step."""
        for b in range(self.meta["n_shards"]):
            text = Conditioning.from_tensors(load_tensors(self.path / f"emb_{b:05d}.safetensors", self.fix))
            for i in self.steps if step_index is None else [step_index]:
                x = load_tensors(self.path / f"x_{b:05d}_{i:03d}.safetensors", self.fix)["x"]
                yield i, x, self.timesteps[i], text

    def unet_calls(self, step_index: int | None = None, device="cpu"):
        """Yield (step index, kwargs) of CFG UNet calls, `unet(**kwargs)`: sample cat([x, x]),
        timestep t and the text arguments of rows [uncond; cond] (SDXL's added conditioning included)."""
        for i, x, t, text in self.batches(step_index):
            yield i, unet_call(torch.cat([x, x]), t, text, device)
