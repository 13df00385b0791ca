"""PCR (Tang et al.): progressive calibration and activation relaxing.

Progressive: time-aware activation quantizers are calibrated step by step in
sampling order; the data for step i comes from trajectories whose steps
0..i-1 (T..t+1) already run the quantized model, so each step's ranges match
the inputs the quantized sampler really produces.
Relaxing: a fraction tau of the steps, at the x_0 end (SD-like) or the x_T
end (SDXL-like), run at a higher activation bit-width."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pipeline.artifacts import (
    check_progress,
    jsonable,
    load_tensors,
    matches_checksum,
    save_tensors,
    sha256_file,
    write_json_atomic,
)
from pipeline.calibration.blocks import reconstruction_units
from pipeline.calibration.qdiff import capture_unit_io, learn_activations
from pipeline.models import is_sdxl
from pipeline.quant import act_banks, get_bit_policy, set_bit_policy, set_quant_state
from pipeline.quant.state import assign_quantizer_tensors, model_fingerprint, quantizer_state
from pipeline.sampling import Trajectory, encode_prompts, initial_latents, noise_generators, prompt_seeds


class _StepCalls:
    """The CFG UNet calls of one sampling step, in CalibrationData's `unet_calls` form."""

    def __init__(self, step: int, calls: list[dict]):
        self.step, self.calls = step, calls

    def unet_calls(self, device="cpu"):
        for call in self.calls:
            yield self.step, {k: _to(v, device) for k, v in call.items()}


def _to(value, device):
    if isinstance(value, dict):  # SDXL's added_cond_kwargs
        return {k: _to(v, device) for k, v in value.items()}
    return value.to(device) if torch.is_tensor(value) else value


def calibrate_progressive(pipe, prompts, steps: int, guidance: float, seed: int = 0, batch_size: int = 8,
                          resolution: int | None = None, iters_a: int = 0, a_lr: float = 4e-4,
                          trainer_kwargs: dict | None = None, partial_dir: str | Path | None = None,
                          is_rank_zero: bool = True, signature: dict | None = None,
                          discard_stale: bool = False) -> None:
    """Set the time-aware activation quantizers step by step in sampling order.

    iters_a = 0: ranges (min-max / L_p) from the whole quantized UNet observing
    step i's inputs. iters_a > 0 (Q-Diffusion states): per reconstruction unit,
    range init and then LSQ step sizes for slot i against the full-precision
    unit outputs, about iters_a / steps iterations per (unit, bit option, step),
    so the learned step sizes survive and see the quantized trajectory's inputs.
    With `partial_dir`, the state after each finished step is kept there and a
    rerun continues with the first unfinished step; progress made under other
    settings, another model or another starting state (e.g. other Q-Diffusion
    weights) is refused (`discard_stale`: discarded). `signature` adds the caller's own settings to that check.
    The progress lives in `partial_dir`/progressive, apart from Q-Diffusion's units that it starts from."""
    unet = pipe.unet
    cfg = unet.quant_config
    if not cfg.time_aware or cfg.n_steps != steps:
        raise ValueError(f"progressive calibration needs time-aware quantizers for {steps} steps "
                         f"(QuantConfig(time_aware=True, n_steps={steps}))")
    banks = act_banks(unet)
    device = next(unet.parameters()).device
    signature = json.loads(json.dumps({
        "steps": steps, "iters_a": iters_a, "a_lr": a_lr, "guidance": guidance, "seed": seed,
        "batch_size": batch_size, "resolution": resolution, "prompts": list(prompts),
        "quant_config": cfg.to_dict(), "weights_sha256": model_fingerprint(unet)["weights_sha256"],
        "start_state_sha256": _state_hash(unet), **(signature or {})}))
    done = _load_progress(unet, partial_dir, signature, discard_stale)
    set_quant_state(unet, True, True)
    for bank in banks.values():
        bank.observing = False
    trajectories = []  # one per prompt batch, advanced a step at a time (O(1) UNet calls per step)
    for b in range(0, len(prompts), batch_size):
        chunk = prompts[b:b + batch_size]
        gens = noise_generators(prompt_seeds(seed, b, len(chunk)))
        traj = Trajectory(pipe, encode_prompts(pipe, chunk, resolution),
                          initial_latents(pipe, resolution=resolution, generators=gens), steps, guidance, gens)
        for _ in range(done):  # a resumed run: through the steps already calibrated
            traj.advance(unet)
        trajectories.append(traj)
    for i in tqdm(range(done, steps), desc="progressive", initial=done, total=steps, leave=False):
        calls = [traj.unet_input() for traj in trajectories]  # steps 0..i-1 ran quantized (calibrated slots)
        if iters_a > 0:
            per_step = max(1, iters_a // steps)
            for name, unit in reconstruction_units(unet).items():
                items = capture_unit_io(unet, unit, _StepCalls(i, calls), device)
                learn_activations(unet, name, unit, items, per_step, a_lr, trainer_kwargs, seed + i, slots=[i])
        else:
            for bank in banks.values():
                bank.observing = True
            unet.quant_context.timesteps = []
            unet.quant_context.step = i
            with torch.no_grad():
                for call in calls:
                    unet(**call)
            for bank in banks.values():
                bank.finalize(cfg.act_init, p=cfg.lp_norm, n_candidates=cfg.lp_candidates, slots=[i])
        if is_rank_zero:
            _save_progress(unet, partial_dir, i + 1, signature)
        for bank in banks.values():
            bank.observing = False
        set_quant_state(unet, True, True)
        if i + 1 < steps:
            for traj in trajectories:  # through step i, now calibrated
                traj.advance(unet)
    set_quant_state(unet, True, True)


def _state_hash(unet) -> str:
    """Checksum of every quantizer tensor: the state progressive calibration starts from."""
    h = hashlib.sha256()
    for k, v in sorted(quantizer_state(unet).items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


PROGRESSIVE = "progressive"  # its folder inside partial_dir


def _load_progress(unet, partial_dir, signature: dict, discard_stale: bool = False) -> int:
    """Number of steps already done in `partial_dir` (their quantizers loaded), else 0."""
    if partial_dir is None:
        return 0
    d = Path(partial_dir) / PROGRESSIVE
    record = check_progress(d / "progressive.json", signature, "progressive calibration", discard_stale)
    if record is None:
        return 0
    path = d / str(record.get("file"))
    if not matches_checksum(path, record.get("sha256")):
        print(f"note: {path} does not match the checksum of its record; redoing progressive calibration")
        return 0
    assign_quantizer_tensors(unet, load_tensors(path, "re-run calibrate with --fresh true to start it over"))
    return int(record["done"])


def _save_progress(unet, partial_dir, done: int, signature: dict) -> None:
    if partial_dir is None:
        return
    d = Path(partial_dir) / PROGRESSIVE
    d.mkdir(parents=True, exist_ok=True)
    path = save_tensors(d / f"step_{done:04d}.safetensors", quantizer_state(unet))
    # the record last: a kill before it leaves the previous step's record and file, so one step is redone
    write_json_atomic(d / "progressive.json", {"done": done, "signature": jsonable(signature), "file": path.name,
                                               "sha256": sha256_file(path)})
    for old in d.glob("step_*.safetensors"):
        if old != path:
            old.unlink()


def default_relax_end(pipe) -> str:
    """PCR (Sec. 3.3): SD is sensitive to fidelity loss near x_0, SDXL to text-image matching near x_T."""
    return "xT" if is_sdxl(pipe) else "x0"


def relaxed_steps(n_steps: int, tau: float, end: str = "x0") -> list[int]:
    """Step indices (sampling order, 0 = x_T) that get the relaxed bit-width."""
    if not 0 <= tau < 1:
        raise ValueError(f"--relax-tau {tau} must be in [0, 1)")
    if end not in ("x0", "xT"):
        raise ValueError(f"--relax-end {end!r} must be 'x0' (SD-like) or 'xT' (SDXL-like)")
    n = int(round(tau * n_steps))
    return list(range(n_steps - n, n_steps)) if end == "x0" else list(range(n))


def apply_relaxing(unet, tau: float, relax_bits: int, end: str = "x0") -> list[int]:
    """Raise the activation bits of every layer at the relaxed steps."""
    cfg = unet.quant_config
    if relax_bits not in cfg.a_bit_options:
        raise ValueError(f"--relax-bits {relax_bits} has no calibrated quantizer; options are {cfg.a_bit_options}")
    steps = relaxed_steps(cfg.n_steps, tau, end)

    table = get_bit_policy(unet).clone()
    table[:, steps] = relax_bits
    set_bit_policy(unet, table)
    return steps
