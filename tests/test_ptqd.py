"""PTQD (issue 17 item 3): statistics at every sampling step and per activation bit option, and the noise
fusion of stochastic samplers (docs/calibration.md#ptqd)."""
import numpy as np
import pytest
import torch

from data.prompts import load_prompts
from pipeline.calibration.data import CalibrationData, collect
from pipeline.calibration.naive import ranges_from_calls
from pipeline.calibration.ptqd import NoiseFusion, apply_ptqd, noise_terms, ptqd_statistics
from pipeline.models import load_pipeline, quantize_pipeline, set_scheduler, tiny_pipeline
from pipeline.quant import (
    QuantConfig,
    quant_layers,
    quantize_unet,
    save_quantized,
    set_bit_policy,
    set_quant_state,
    set_step,
)
from pipeline.sampling import denoise, encode_prompts, generate, initial_latents, noise_generators

STEPS = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny DDIM pipeline at W4 A{5, 8}, calibration data (batches of 2 and 1 prompts) at 2 of its 4 steps,
    PTQD statistics both ways."""
    path = tmp_path_factory.mktemp("cali")
    pipe = tiny_pipeline(0)
    collect(pipe, load_prompts("builtin", 3), path, steps=STEPS, cali_st=2, guidance=5.0, batch_size=2)
    data = CalibrationData(path, pipe, steps=STEPS)
    config = QuantConfig(w_bits=4, a_bits=5, a_bit_options=[8, 5], n_steps=STEPS)
    unet = ranges_from_calls(quantize_unet(pipe.unet, config), data.unet_calls())
    return {"pipe": pipe, "data": data, "every": ptqd_statistics(unet, data, pipe=pipe),
            "calibrated": ptqd_statistics(unet, data)}


def test_statistics_at_every_step_follow_the_calibration_trajectories(tiny):
    """With the pipeline, PTQD's statistics cover every step of the schedule: the FP trajectories rerun with the
    data's seeds pass through the recorded x_t, so at the calibrated steps they equal the data-only statistics,
    and the steps between are fitted, not copied. Mutation caught: seeding the trajectories by batch index
    (`prompt_seeds(seed, b, ...)`) instead of the batch's first prompt gives other inputs at step 0."""
    every, calibrated, data = tiny["every"], tiny["calibrated"], tiny["data"]
    assert every["ptqd_steps"].tolist() == list(range(STEPS)) and calibrated["ptqd_steps"].tolist() == data.steps
    for j, step in enumerate(data.steps):
        for name in ("ptqd_k_raw", "ptqd_std", "ptqd_k_raw_others", "ptqd_std_others"):
            torch.testing.assert_close(every[name][..., step], calibrated[name][..., j], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(every["ptqd_bias"][step], calibrated["ptqd_bias"][j], rtol=1e-3, atol=1e-5)
    between = [s for s in range(STEPS) if s not in data.steps]
    for s in between:
        assert all(abs(float(every["ptqd_std"][s] - every["ptqd_std"][c])) > 1e-4 for c in data.steps)


def test_statistics_per_bit_option(tiny):
    """One set of statistics per bit option of the banks, the default (--a-bits) first; more activation bits,
    less residual noise at every step (8 bits against 5). Mutation caught: measuring every option under the
    policy in force (no `set_bit_policy(unet, bits)`) gives the 8-bit row the 5-bit numbers."""
    every = tiny["every"]
    assert every["ptqd_bits"].tolist() == [5, 8]
    assert every["ptqd_k"].shape == (STEPS,) and every["ptqd_bias"].shape == (STEPS, 4)
    assert every["ptqd_std_others"].shape == (1, STEPS) and every["ptqd_bias_others"].shape == (1, STEPS, 4)
    assert (every["ptqd_std_others"][0] < 0.7 * every["ptqd_std"]).all(), (every["ptqd_std"],
                                                                           every["ptqd_std_others"])


def _hooked(unet, stats, step, call, pipe=None):
    handle = apply_ptqd(unet, stats, pipe)
    try:
        set_step(unet, step)
        with torch.no_grad():
            return unet(**call).sample
    finally:
        handle.remove()


def test_correction_uses_the_statistics_of_the_bits_in_force(tiny):
    """The hook corrects with the statistics of the option every layer runs (exactly), mixes them by the share
    of layers at each option under a mixed policy, and applies an old state (one row, calibrated steps only)
    at the nearest step whatever the bits. Mutation caught: always using the default (5-bit) row."""
    pipe, stats = tiny["pipe"], tiny["every"]
    unet = pipe.unet
    step, call = next(iter(tiny["data"].unet_calls(step_index=tiny["data"].steps[-1])))
    rows = {5: (stats["ptqd_k"], stats["ptqd_bias"]), 8: (stats["ptqd_k_others"][0], stats["ptqd_bias_others"][0])}
    stats = {**stats, "ptqd_k": torch.full((STEPS,), 0.2), "ptqd_k_others": torch.full((1, STEPS), 0.05)}
    rows = {5: (stats["ptqd_k"], rows[5][1]), 8: (stats["ptqd_k_others"][0], rows[8][1])}  # k > 0 to tell apart
    layers = list(quant_layers(unet))
    for policy, shares in ((5, {5: 1.0}), (8, {8: 1.0}),
                           ({n: 8 for n in layers[: len(layers) // 4]}, None)):
        set_bit_policy(unet, 5)
        set_bit_policy(unet, policy)
        if shares is None:
            shares = {8: (len(layers) // 4) / len(layers), 5: 1 - (len(layers) // 4) / len(layers)}
        set_step(unet, step)
        with torch.no_grad():
            raw = unet(**call).sample
        k = sum(w * float(rows[b][0][step]) for b, w in shares.items())
        bias = sum(w * rows[b][1][step].double() for b, w in shares.items()).float().reshape(1, -1, 1, 1)
        torch.testing.assert_close(_hooked(unet, stats, step, call), (raw - bias) / (1 + k), rtol=1e-5, atol=1e-6)
    set_bit_policy(unet, 8)
    old = {"ptqd_steps": torch.tensor([0, 3]), "ptqd_k": torch.tensor([0.1, 0.3]),
           "ptqd_bias": torch.stack([torch.zeros(4), torch.full((4,), 0.5)]), "ptqd_std": torch.tensor([1.0, 1.0])}
    set_step(unet, 2)
    with torch.no_grad():
        raw = unet(**call).sample
    torch.testing.assert_close(_hooked(unet, old, 2, call), (raw - 0.5) / 1.3)  # nearest calibrated step: 3
    set_bit_policy(unet, 5)


SAMPLERS = {"ddim": {"eta": 0.8}, "ddpm": {}, "euler-ancestral": {}}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_noise_fusion_gives_the_samplers_own_noise_variance(name):
    """With the UNet's eps = true eps + residual noise of variance v, the sampler's step adds c^2 v to its own
    noise variance s^2; the fused step lowers its noise to s' = sqrt(s^2 - c^2 v), so x_{t-1}'s variance is the
    FP step's s^2 again (Monte Carlo over 65k values, through diffusers' own step), and to 0 where c^2 v > s^2
    (never below). The generators end where the sampler's own step leaves them. Mutations caught: DDIM's c
    without the x0 term, Euler's c = sigma_to - sigma (no ancestral split), DDPM's s from beta_t."""
    pipe = set_scheduler(tiny_pipeline(0), name)
    sched, kwargs = pipe.scheduler, SAMPLERS[name]
    sched.set_timesteps(10)
    fusion = NoiseFusion()
    fusion.install(sched)
    zeros = torch.zeros(1, 4, 128, 128)
    for index in (2, 6):
        t = sched.timesteps[index]
        if name == "euler-ancestral":
            sched._step_index = index  # as after `index` steps
        c, s = noise_terms(sched, t, kwargs.get("eta", 0.0))
        assert s > 0 and c != 0
        for ratio in (0.5, 3.0):  # c^2 v as a multiple of s^2: fused noise reduced, or replaced entirely
            v = ratio * s * s / (c * c)
            results = {}
            for fused in (False, True):
                if name == "euler-ancestral":
                    sched._step_index = index
                sched.scale_model_input(zeros, t)
                eps = torch.randn(zeros.shape, generator=torch.Generator().manual_seed(1)) * v ** 0.5
                gen = torch.Generator().manual_seed(7)
                fusion.variance = v if fused else None
                out = sched.step(eps, t, zeros, generator=gen, **kwargs).prev_sample
                results[fused] = (float(out.double().var()), gen.get_state())
            want_fused = max(s * s - c * c * v, 0.0) + c * c * v
            assert results[False][0] == pytest.approx(s * s + c * c * v, rel=0.03)
            assert results[True][0] == pytest.approx(want_fused, rel=0.03)
            assert torch.equal(results[True][1], results[False][1])
            if ratio < 1:
                assert results[True][0] == pytest.approx(s * s, rel=0.03)  # the sampler's own variance


def test_noise_fusion_leaves_deterministic_sampling_bit_identical(tiny):
    """DDIM with eta = 0 injects no noise: a PTQD state's images are bit-identical with and without the noise
    fusion (and differ with eta = 1, so the comparison can tell); deterministic schedulers are not wrapped.
    Mutation caught: DDIM's s taken without eta (as for eta = 1)."""
    pipe = tiny["pipe"]
    stats = {**tiny["every"], "ptqd_std": torch.full((STEPS,), 2.0)}  # a large residual: fusion would show
    prompts, seeds = load_prompts("builtin", 1), [3]
    images = {}
    for eta in (0.0, 1.0):
        for fuse in (False, True):
            handle = apply_ptqd(pipe.unet, stats, pipe, fuse_noise=fuse)
            images[eta, fuse] = generate(pipe, prompts, seeds, steps=STEPS, guidance=5.0, progress=False, eta=eta)
            handle.remove()
            pipe.scheduler.__dict__.pop("step", None)
    assert np.array_equal(images[0.0, False], images[0.0, True])
    assert not np.array_equal(images[1.0, False], images[1.0, True])
    for name in ("pndm", "euler", "dpm++", "heun"):
        other = set_scheduler(tiny_pipeline(0), name)
        NoiseFusion().install(other.scheduler)
        assert "step" not in other.scheduler.__dict__


def test_a_loaded_ptqd_state_fuses_noise_on_a_stochastic_scheduler(tiny, tmp_path):
    """quantize_pipeline applies the correction and, on a stochastic scheduler, the fusion: also on a scheduler
    swapped in after loading (the hook installs it on the pipeline's scheduler at each call)."""
    save_quantized(tiny["pipe"].unet, tmp_path / "quant", extra_tensors=tiny["every"])
    pipe = quantize_pipeline(set_scheduler(tiny_pipeline(0), "euler-ancestral"), tmp_path / "quant")
    assert type(pipe.scheduler.__dict__.get("step")).__name__ == "_FusedStep"
    set_scheduler(pipe, "ddpm")
    step, call = next(iter(tiny["data"].unet_calls()))
    set_step(pipe.unet, step)
    with torch.no_grad():
        pipe.unet(**call)
    assert type(pipe.scheduler.__dict__.get("step")).__name__ == "_FusedStep"


@pytest.mark.slow
def test_noise_fusion_moves_euler_ancestral_samples_toward_fp(tmp_path):
    """Acceptance: the embedded world at W4A4 (coarse activations: a large residual) under Euler ancestral, 6
    prompts x seeds, paired (each seed's noise is the same in the three runs). PTQD's mean correction alone
    leaves the residual noise on top of the sampler's, so the final latents are rougher than FP's; with the
    noise fusion their high-frequency energy and their per-image std move toward FP's, on average and for
    most seeds. Mutation caught: fusing with the variance before the 1 / (1 + k) scaling has no effect here
    (k = 0); the fusion switched off (`fusion.variance` never set) fails every assertion."""
    steps = 6
    pipe = load_pipeline("embedded", scheduler="euler-ancestral")
    collect(pipe, load_prompts("builtin", 2), tmp_path, steps=steps, cali_st=steps, guidance=5.0, batch_size=2)
    data = CalibrationData(tmp_path, pipe, steps=steps)
    unet = quantize_unet(pipe.unet, QuantConfig(w_bits=4, a_bits=4, n_steps=steps))
    ranges_from_calls(unet, data.unet_calls())
    stats = ptqd_statistics(unet, data, pipe=pipe)
    prompts, seeds = load_prompts("builtin", 6), list(range(100, 106))
    text = encode_prompts(pipe, prompts)

    def final_latents(quantized: bool, fuse: bool | None) -> torch.Tensor:
        set_quant_state(unet, quantized, quantized)
        handle = apply_ptqd(unet, stats, pipe, fuse_noise=fuse) if quantized else None
        gens = noise_generators(seeds)
        try:
            return denoise(pipe, text, initial_latents(pipe, generators=gens), steps, 5.0, generators=gens).double()
        finally:
            if handle is not None:
                handle.remove()
            pipe.scheduler.__dict__.pop("step", None)

    fp, corrected, fused = final_latents(False, None), final_latents(True, False), final_latents(True, True)
    set_quant_state(unet, True, True)

    def roughness(x):  # mean squared difference of neighbouring latent pixels, per image
        return ((x[:, :, 1:] - x[:, :, :-1]) ** 2).mean((1, 2, 3)) + ((x[:, :, :, 1:] - x[:, :, :, :-1]) ** 2).mean(
            (1, 2, 3))

    def spread(x):
        return x.reshape(len(x), -1).std(1)

    for stat in (roughness, spread):
        gap_corrected, gap_fused = (stat(corrected) - stat(fp)).abs(), (stat(fused) - stat(fp)).abs()
        print(f"\n{stat.__name__}: FP {float(stat(fp).mean()):.3f}, PTQD {float(stat(corrected).mean()):.3f}, "
              f"PTQD + fusion {float(stat(fused).mean()):.3f}; mean |gap| to FP {float(gap_corrected.mean()):.3f} "
              f"-> {float(gap_fused.mean()):.3f}, closer for {int((gap_fused < gap_corrected).sum())}/6 seeds")
        assert float(gap_fused.mean()) < 0.8 * float(gap_corrected.mean())
        assert int((gap_fused < gap_corrected).sum()) >= 5
