"""PTQD (He et al., 2023): split the quantization noise of the noise
prediction into a part correlated with it and a residual.

Per sampling step and per activation bit option: eps_q - eps_fp = k_t * eps_fp + r, k_t >= 0 by least
squares on the *guided* noise prediction (eps_u + w (eps_c - eps_u), the one the sampler uses, as PTQD fits
it); the residual's per-channel mean is a bias, its std the uncorrelated noise. The statistics come from FP
sampling trajectories of the calibration prompts, at every step of the schedule (PTQD's own collection),
with the quantized UNet evaluated on the same inputs once per bit option of its banks.

At sampling: eps <- (eps - bias_t) / (1 + k_t), applied to both CFG branches (the correction is affine with
slope 1/(1 + k_t), so it commutes with the guidance and corrects the guided eps exactly), with the statistics
of the bits the policy has in force at that step (`step_weights`). Stochastic samplers (DDIM with eta > 0,
DDPM, Euler ancestral) also get PTQD's noise fusion: the corrected eps still carries the residual,
variance var_q = std_t^2 / (1 + k_t)^2, which enters x_{t-1} through the sampler's coefficient c_t on eps,
so the injected noise's std s_t is lowered to sqrt(max(s_t^2 - c_t^2 var_q, 0)) and the total noise is
the sampler's (`NoiseFusion`). Deterministic samplers are left untouched.

All of it lives in eps space, where PTQD derives it: a v- or x0-predicting UNet's outputs are converted to eps
before the regression, and the hook converts its output to eps, corrects it and converts it back
(pipeline/prediction.py; docs/calibration.md#prediction-types, docs/calibration.md#ptqd)."""
from __future__ import annotations

import inspect
import math

import diffusers
import torch
from diffusers.utils.torch_utils import randn_tensor

from pipeline.prediction import PREDICTION_TYPES, check_prediction_type, prediction_space
from pipeline.quant import get_bit_policy, quant_layers, set_bit_policy, set_quant_state, set_step
from pipeline.sampling import Trajectory, initial_latents, noise_generators, prompt_seeds


class _Moments:
    """Running sums of one (bit option, step)'s guided error d = eps_q - eps_fp and FP eps e, per channel,
    in float64: enough for the least-squares slope, the per-channel residual mean and the residual std
    without keeping the tensors (an SD-sized run would hold GBs)."""

    def __init__(self):
        self.n = self.d = self.e = self.dd = self.de = self.ee = 0

    def add(self, d: torch.Tensor, e: torch.Tensor) -> None:
        d, e = d.double(), e.double()
        dims = (0, 2, 3)
        self.n = self.n + d.numel() // d.shape[1]
        self.d, self.e = self.d + d.sum(dims), self.e + e.sum(dims)
        self.dd, self.de = self.dd + (d * d).sum(dims), self.de + (d * e).sum(dims)
        self.ee = self.ee + (e * e).sum(dims)

    def fit(self) -> tuple[float, float, torch.Tensor, float]:
        """(k clipped at 0, raw k, per-channel bias of r = d - k e, std of r - bias)."""
        raw = float(self.de.sum() / self.ee.sum())
        k = max(0.0, raw)  # clipped at 0 (docs/calibration.md#ptqd); the raw slope is kept for reports
        bias = (self.d - k * self.e) / self.n
        ss = (self.dd - 2 * k * self.de + k * k * self.ee - self.n * bias * bias).sum()  # sum (r - bias)^2
        total = self.n * len(bias)
        return k, raw, bias.float(), math.sqrt(max(float(ss), 0.0) / (total - 1))  # unbiased, as torch.std


def _guided(eps: torch.Tensor, w: float) -> torch.Tensor:
    u, c = eps.chunk(2)  # the calls hold [uncond; cond]
    return u + w * (c - u)


def ptqd_statistics(unet, data, device="cpu", pipe=None) -> dict[str, torch.Tensor]:
    """PTQD's statistics, in eps space, per activation bit option of the quantized UNet's banks.

    With `pipe` (the calibration pipeline: its scheduler and VAE scale), at every step of the data's schedule:
    each calibration prompt's FP trajectory is rerun (`Trajectory`, the data's seeds, so it passes through the
    recorded x_t) and the quantized UNet is evaluated on each step's input once per bit option (every layer at
    that option). Without `pipe`, at the data's calibrated steps only (`--cali-st`; the states before every-step
    statistics). The policy in force is restored afterwards.

    `ptqd_k`, `ptqd_k_raw`, `ptqd_bias`, `ptqd_std` ([steps, ...]) hold the statistics at the state's default
    bits (`a_bits`), `ptqd_bits` every option (the default first), and with more than one option the
    `*_others` tensors ([options - 1, steps, ...]) the other options' statistics, in `ptqd_bits[1:]` order.
    `ptqd_space` records the model's prediction type (an index into PREDICTION_TYPES), so the correction
    refuses a sampler of another type."""
    space = data.space
    w = float(data.meta["signature"]["guidance"])
    cfg = unet.quant_config
    options = list(cfg.a_bit_options)
    saved = get_bit_policy(unet)

    def quantized_errors(call, step: int, eps_fp: torch.Tensor) -> list[torch.Tensor]:
        set_step(unet, step)
        set_quant_state(unet, True, True)
        out = []
        for bits in options:
            set_bit_policy(unet, bits)
            eps_q = space.to_eps(unet(**call).sample, call["sample"], call["timestep"])
            out.append((_guided(eps_q, w) - eps_fp).cpu())
        return out

    steps = list(data.steps) if pipe is None else list(range(int(data.meta["signature"]["steps"])))

    def fp_outputs():  # (step, UNet call, the FP UNet's output on it): recorded calls, or the rerun trajectories
        if pipe is None:
            for step, call in data.unet_calls(device=device):
                set_step(unet, step)
                set_quant_state(unet, False, False)
                yield step, call, unet(**call).sample
            return
        for traj in _fp_trajectories(pipe, data, device):
            while traj.step < len(steps):
                step, call = traj.step, traj.unet_input()
                outputs = []  # the FP output of the step's first call, which advances the trajectory
                set_quant_state(unet, False, False)
                handle = unet.register_forward_hook(lambda m, a, o: outputs.append(o.sample))
                try:
                    traj.advance(unet)
                finally:
                    handle.remove()
                yield step, call, outputs[0]

    moments = {(o, s): _Moments() for o in range(len(options)) for s in steps}
    try:
        with torch.no_grad():
            for step, call, out in fp_outputs():
                eps_fp = _guided(space.to_eps(out, call["sample"], call["timestep"]), w)
                for o, d in enumerate(quantized_errors(call, step, eps_fp)):
                    moments[o, step].add(d, eps_fp.cpu())
    finally:
        set_quant_state(unet, True, True)
        set_bit_policy(unet, saved)
    default = options.index(cfg.a_bits)
    order = [default] + [o for o in range(len(options)) if o != default]  # the default bits first
    fits = [[moments[o, s].fit() for s in steps] for o in order]
    table = {name: torch.tensor([[f[i] for f in row] for row in fits])
             for i, name in ((0, "ptqd_k"), (1, "ptqd_k_raw"), (3, "ptqd_std"))}
    table["ptqd_bias"] = torch.stack([torch.stack([f[2] for f in row]) for row in fits])
    out = {"ptqd_steps": torch.tensor(steps, dtype=torch.long), "ptqd_bits": torch.tensor([options[o] for o in order]),
           "ptqd_space": torch.tensor(PREDICTION_TYPES.index(space.prediction_type))}
    for name, t in table.items():  # one copy of each number: the default row, then the other options'
        out[name] = t[0]
        if len(order) > 1:
            out[f"{name}_others"] = t[1:]
    return out


def _fp_trajectories(pipe, data, device):
    """One trajectory per calibration prompt batch, with the data's text conditioning and noise seeds."""
    size, seed = int(data.meta["batch_size"]), int(data.meta["seed"])
    resolution = int(data.meta["signature"]["resolution"])
    steps, w = int(data.meta["signature"]["steps"]), float(data.meta["signature"]["guidance"])
    for b, (_, _, _, text) in enumerate(data.batches(step_index=data.steps[0])):
        gens = noise_generators(prompt_seeds(seed, b * size, len(text)))
        yield Trajectory(pipe, text.to(device), initial_latents(pipe, resolution=resolution, generators=gens),
                         steps, w, gens)


def step_weights(layers, bits: list[int]) -> torch.Tensor:
    """The rule that picks a step's statistics from the bits in force: the share of quantized layers
    whose activation bits (at the UNet's current step) are each option of `bits` (a bit-width with no
    statistics counts as the nearest one that has them). A uniform policy gives one option weight 1, so its
    own statistics exactly; a mixed one (QLIP, MixDQ) mixes k, bias and the residual variance by those shares,
    as the error of a UNet is close to the sum of its layers' contributions."""
    counts = torch.zeros(len(bits), dtype=torch.float64)
    for layer in layers:
        b = layer.bit_options[layer.bit_index()]
        counts[min(range(len(bits)), key=lambda o: abs(bits[o] - b))] += 1
    return counts / counts.sum()


def _by_bits(stats: dict[str, torch.Tensor]) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bits, k [O, S], bias [O, S, C], residual variance [O, S]), the default bits' row first; a state from
    before per-option statistics has that row only, used whatever the bits."""
    bits = stats["ptqd_bits"].tolist() if "ptqd_bits" in stats else [-1]
    std = stats.get("ptqd_std")  # absent in hand-made (test) statistics: no fusion then
    rows = {"k": [stats["ptqd_k"]], "bias": [stats["ptqd_bias"]],
            "std": [torch.zeros(len(stats["ptqd_k"])) if std is None else std]}
    if len(bits) > 1:
        for name in rows:
            rows[name].extend(stats[f"ptqd_{name}_others"])
    k, bias, std = (torch.stack([torch.as_tensor(r).double() for r in rows[n]]) for n in ("k", "bias", "std"))
    return bits, k, bias, std ** 2


def apply_ptqd(unet, stats: dict[str, torch.Tensor], pipe=None, fuse_noise: bool = True):
    """Correct the quantized UNet's output at every call; returns the hook handle.

    The statistics are those of the call's step (the nearest calibrated step for states from before
    every-step statistics) and of the bits in force (`step_weights`). A v- or x0-predicting model needs `pipe`:
    its current scheduler (read at every call, so a swapped scheduler is followed) converts each output to
    eps and back. With `pipe` and `fuse_noise`, a stochastic scheduler of the pipeline also gets the noise
    fusion (`NoiseFusion`), installed on whichever scheduler the pipeline holds at each call. States from
    before `ptqd_space` existed hold raw-output statistics and are applied to the raw output, as they were
    computed."""
    steps = stats["ptqd_steps"].tolist()
    recorded = PREDICTION_TYPES[int(stats["ptqd_space"])] if "ptqd_space" in stats else None
    if recorded not in (None, "epsilon") and pipe is None:
        raise ValueError(f"this PTQD state was calibrated on a {recorded!r} model: pass the pipeline "
                         f"(apply_ptqd(unet, stats, pipe)) so its outputs are corrected in eps space")
    if recorded is not None and pipe is not None:
        # the type alone: a freshly loaded scheduler has no schedule (set_timesteps) yet
        now = check_prediction_type(getattr(pipe.scheduler.config, "prediction_type", None))
        if now != recorded:
            raise ValueError(f"this PTQD state was calibrated on a {recorded!r} model but the pipeline's "
                             f"scheduler predicts {now!r}; use the model's own prediction type")
    bits, ks, biases, variances = _by_bits(stats)
    layers = list(quant_layers(unet).values()) if len(bits) > 1 else []
    fusion = NoiseFusion() if pipe is not None and fuse_noise else None
    if fusion is not None:
        fusion.install(pipe.scheduler)  # now, so that a copy of the scheduler (Trajectory) carries it

    def nearest(step: int) -> int:
        return min(range(len(steps)), key=lambda j: abs(steps[j] - step))

    def hook(module, args, kwargs, output):
        j = nearest(module.quant_context.step)
        weights = step_weights(layers, bits) if layers else torch.ones(1, dtype=torch.float64)
        o = int(weights.argmax())
        if weights[o] == 1:  # one option in force: its own statistics, exactly
            k, bias, var = float(ks[o, j]), biases[o, j], float(variances[o, j])
        else:
            k, bias, var = float(weights @ ks[:, j]), weights @ biases[:, j], float(weights @ variances[:, j])
        out = output[0] if isinstance(output, tuple) else output.sample
        space = prediction_space(pipe.scheduler) if recorded not in (None, "epsilon") else None
        if space is not None:
            x_t = args[0] if args else kwargs["sample"]
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            out = space.to_eps(out, x_t, t)
        out = (out - bias.to(out.device, out.dtype).reshape(1, -1, 1, 1)) / (1 + k)
        if space is not None:
            out = space.from_eps(out, x_t, t)
        if fusion is not None:
            fusion.install(pipe.scheduler)
            fusion.variance = var / (1 + k) ** 2  # the corrected eps's residual, for this call's sampler step
        if isinstance(output, tuple):  # pipelines call the UNet with return_dict=False
            return (out,) + tuple(output[1:])
        output.sample = out
        return output

    return unet.register_forward_hook(hook, with_kwargs=True)


# ---------------------------------------------------------------------------
# Noise fusion (PTQD Sec. 3.3): the residual quantization noise is part of the injected noise.
# ---------------------------------------------------------------------------
STOCHASTIC = ("DDIMScheduler", "DDPMScheduler", "EulerAncestralDiscreteScheduler")  # the ones fusion knows


def _alphas(sched, t, prev_t) -> tuple[float, float]:
    ac = sched.alphas_cumprod
    a_t = float(ac[int(t)])
    final = getattr(sched, "final_alpha_cumprod", None)
    a_prev = float(ac[int(prev_t)]) if int(prev_t) >= 0 else float(final if final is not None else sched.one)
    return a_t, a_prev


def noise_terms(sched, timestep, eta: float = 0.0) -> tuple[float, float]:
    """(c, s) of the scheduler's coming `step` at `timestep`: x_{t-1} = (terms without eps) + c * eps + s * z,
    with eps the noise prediction (in eps space, whatever the prediction type: each of these steps is affine in
    it) and z the standard normal draw it injects. Read before the step (Euler's index advances in it).

      DDIM:  c = sqrt(1 - a_prev - s^2) - sqrt(a_prev (1 - a_t) / a_t),  s = eta sqrt(var(t, prev)) (PTQD's own);
      DDPM:  c = -sqrt(a_prev) beta_t / (1 - a_t) * sqrt(1 - a_t) / sqrt(a_t),  s from its variance_type;
      Euler ancestral:  c = sigma_down - sigma,  s = sigma_up."""
    name = type(sched).__name__
    if isinstance(sched, diffusers.EulerAncestralDiscreteScheduler):
        if sched.step_index is None:
            sched._init_step_index(timestep)  # what its step does first
        sigma, sigma_to = float(sched.sigmas[sched.step_index]), float(sched.sigmas[sched.step_index + 1])
        up = math.sqrt(sigma_to ** 2 * (sigma ** 2 - sigma_to ** 2) / sigma ** 2)
        return math.sqrt(sigma_to ** 2 - up ** 2) - sigma, up
    if isinstance(sched, diffusers.DDIMScheduler):
        prev = int(timestep) - sched.config.num_train_timesteps // sched.num_inference_steps
        a_t, a_prev = _alphas(sched, timestep, prev)
        s = eta * math.sqrt(float(sched._get_variance(int(timestep), prev))) if eta > 0 else 0.0
        return math.sqrt(max(1 - a_prev - s * s, 0.0)) - math.sqrt(a_prev * (1 - a_t) / a_t), s
    if isinstance(sched, diffusers.DDPMScheduler):
        kind = sched.config.variance_type
        if kind not in ("fixed_small", "fixed_small_log", "fixed_large"):
            raise ValueError(f"PTQD's noise fusion needs DDPM's noise std, which variance_type {kind!r} does not fix; "
                             f"use variance_type 'fixed_small' (SD's), or apply_ptqd(..., fuse_noise=False)")
        a_t, a_prev = _alphas(sched, timestep, sched.previous_timestep(timestep))
        beta = 1 - a_t / a_prev
        c = -math.sqrt(a_prev) * beta / (1 - a_t) * math.sqrt((1 - a_t) / a_t)
        if int(timestep) <= 0:
            return c, 0.0
        var = float(sched._get_variance(timestep))
        return c, {"fixed_small": math.sqrt(var), "fixed_small_log": var, "fixed_large": math.sqrt(beta)}[kind]
    raise ValueError(f"PTQD's noise fusion does not know scheduler {name}; it knows {', '.join(STOCHASTIC)}")


def _clone(generator):
    if generator is None:
        return None
    if isinstance(generator, (list, tuple)):
        return [_clone(g) for g in generator]
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy


class NoiseFusion:
    """PTQD's noise fusion on a stochastic diffusers scheduler, shared with the UNet hook.

    The hook leaves the corrected eps's residual variance in `variance`; the scheduler's next `step` (wrapped
    by `install`) consumes it: it runs the scheduler's own step, then replaces that step's injected noise s z
    by s' z with s' = sqrt(max(s^2 - c^2 variance, 0)) (`noise_terms`), the same z (redrawn from a copy of the
    generators taken before the step), so the images keep their noise and the generators their position. A
    step with s = 0 (DDIM with eta = 0, DDPM's last step) is returned untouched. Copies of the scheduler (e.g.
    `copy.deepcopy`) share this object."""

    def __init__(self):
        self.variance: float | None = None

    def __deepcopy__(self, memo):
        return self  # the hook feeds one object; a copied scheduler must read it too

    def install(self, sched) -> None:
        if type(sched).__name__ not in STOCHASTIC:
            return  # deterministic (or unknown): nothing is injected, nothing to fuse
        current = sched.__dict__.get("step")
        if isinstance(current, _FusedStep) and current.fusion is self:
            return
        sched.step = _FusedStep(sched, self)


class _FusedStep:
    """A scheduler's `step` with noise fusion, as an instance attribute. A callable object, not a closure: a
    deep copy of the scheduler copies it with its `scheduler` mapped onto the copy."""

    def __init__(self, scheduler, fusion: NoiseFusion):
        self.scheduler, self.fusion = scheduler, fusion
        self.__signature__ = inspect.signature(type(scheduler).step.__get__(scheduler))

    def __call__(self, model_output, timestep, sample, *args, **kwargs):
        sched, var = self.scheduler, self.fusion.variance
        self.fusion.variance = None  # one UNet call, one step
        own = type(sched).step.__get__(sched)
        if not var or args:  # no PTQD call before this step (or positional extras: leave it to the scheduler)
            return own(model_output, timestep, sample, *args, **kwargs)
        c, s = noise_terms(sched, timestep, float(kwargs.get("eta", 0.0)))
        if s == 0:
            return own(model_output, timestep, sample, **kwargs)
        if kwargs.get("generator") is None and kwargs.get("variance_noise") is None:
            seed = int(torch.randint(0, 2 ** 62, (1,)))  # from the global RNG, as an unseeded step would be
            kwargs["generator"] = torch.Generator(device="cpu").manual_seed(seed)
        copies = _clone(kwargs.get("generator"))
        out = own(model_output, timestep, sample, **kwargs)
        z = kwargs.get("variance_noise")
        if z is None:  # the scheduler's own draw, again
            z = randn_tensor(model_output.shape, generator=copies, device=model_output.device, dtype=model_output.dtype)
        fused = math.sqrt(max(s * s - c * c * var, 0.0))
        prev = out[0] if isinstance(out, tuple) else out.prev_sample
        prev = prev + ((fused - s) * z).to(prev.device, prev.dtype)
        if isinstance(out, tuple):
            return (prev,) + tuple(out[1:])
        out.prev_sample = prev
        return out
