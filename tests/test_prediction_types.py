"""Prediction types (eps, v, x0): the conversion to eps matches diffusers' own samplers, and PTQD, Q2B's
distortion and the calibration metrics each live in the space docs/calibration.md#prediction-types states,
on a tiny seeded SD 2.x-style v-prediction model (DDIM, as SD 2.x ships)."""
import inspect
import json
import shutil

import diffusers
import pytest
import torch
from diffusers import DDIMScheduler
from test_schedulers import BASE, FAMILIES, PROMPTS  # the SD 2.x family the scheduler tests build

from pipeline.calibration.analysis import eps_relative_error, reference_outputs
from pipeline.calibration.data import CalibrationData, collect
from pipeline.calibration.naive import ranges_from_calls
from pipeline.calibration.ptqd import apply_ptqd, ptqd_statistics
from pipeline.calibration.qdiff import capture_unit_io
from pipeline.models import quantize_pipeline, tiny_pipeline
from pipeline.prediction import PREDICTION_TYPES, prediction_space
from pipeline.qlip.train import guided_eps, item_distortion, item_text, reference_distortion, training_items
from pipeline.quant import QuantConfig, quantize_unet, save_quantized, set_quant_state, set_step

STEPS = 3
GUIDANCE = 5.0


def sd2_pipe():
    pipe = tiny_pipeline(0)
    pipe.scheduler = DDIMScheduler.from_config(FAMILIES["sd2-v"].config)
    return pipe


# (scheduler, its options): alpha-indexed (integer timesteps) and sigma-indexed ones, with float timesteps
# (Euler's interpolated schedule) or rounded ones (DPM-Solver with Karras sigmas, where alphas_cumprod[t] is
# not what the scheduler uses)
SAMPLERS = [("DDIMScheduler", {}), ("DDPMScheduler", {}), ("LCMScheduler", {}), ("EulerDiscreteScheduler", {}),
            ("EulerDiscreteScheduler", {"use_karras_sigmas": True}), ("HeunDiscreteScheduler", {}),
            ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True})]
CASES = [(c, o, p) for c, o in SAMPLERS for p in ("v_prediction", "sample")] + [
    ("EulerAncestralDiscreteScheduler", {}, "v_prediction")]  # it does not implement "sample"


@pytest.mark.parametrize("cls,opts,ptype", CASES, ids=[f"{c}-{p}{'-karras' if o else ''}" for c, o, p in CASES])
def test_conversion_gives_the_samplers_own_step(cls, opts, ptype):
    """Stepping a `ptype` scheduler on random outputs and an eps scheduler on those outputs converted to eps
    (at the scaled UNet input) gives the same trajectory, every step; from_eps inverts to_eps."""
    make = getattr(diffusers, cls)
    own, eps_sched = make(**BASE, prediction_type=ptype, **opts), make(**BASE, prediction_type="epsilon", **opts)
    own.set_timesteps(5)
    eps_sched.set_timesteps(5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g) * own.init_noise_sigma
    x_eps = x.clone()
    takes_generator = "generator" in inspect.signature(own.step).parameters  # the stochastic ones: same noise
    for k, t in enumerate(own.timesteps):
        x_in = own.scale_model_input(x, t)
        eps_sched.scale_model_input(x_eps, t)
        out = torch.randn(2, 4, 8, 8, generator=g)
        space = prediction_space(own)
        eps = space.to_eps(out, x_in, t)
        torch.testing.assert_close(space.from_eps(eps, x_in, t), out, rtol=1e-4, atol=1e-5)
        noise = lambda: {"generator": torch.Generator().manual_seed(k)} if takes_generator else {}  # noqa: E731
        x = own.step(out, t, x, **noise()).prev_sample
        x_eps = eps_sched.step(eps, t, x_eps, **noise()).prev_sample
        torch.testing.assert_close(x_eps, x, rtol=1e-4, atol=1e-4 * float(x.abs().max()))


def test_sigma_samplers_use_the_sigma_of_the_call_not_alphas_cumprod():
    """With Karras sigmas the timesteps are rounded: alpha_bar = 1 / (1 + sigma^2) of the step differs from
    alphas_cumprod at the rounded timestep, and only the former reproduces the sampler (test above)."""
    s = diffusers.DPMSolverMultistepScheduler(**BASE, prediction_type="v_prediction", use_karras_sigmas=True)
    s.set_timesteps(5)
    space = prediction_space(s)
    gaps = [abs(space.alpha_bar(t) - float(s.alphas_cumprod[int(t)])) for t in s.timesteps]
    assert max(gaps) > 5e-4
    assert space.alpha_bar(s.timesteps[2]) == pytest.approx(float(1 / (1 + s.sigmas[2] ** 2)))
    out, x = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)  # one timestep per row, as some callers pass
    rows = space.to_eps(out, x, s.timesteps[1:3])
    torch.testing.assert_close(rows[1:], space.to_eps(out[1:], x[1:], s.timesteps[2]))
    torch.testing.assert_close(space.from_eps(rows, x, s.timesteps[1:3]), out, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="timestep 3.0 is not in the schedule"):
        space.alpha_bar(3)
    with pytest.raises(ValueError, match="no schedule yet; call set_timesteps"):
        prediction_space(diffusers.EulerDiscreteScheduler(**BASE))


@pytest.fixture(scope="module")
def v_data(tmp_path_factory):
    """Calibration data of the v-prediction model at every step (PTQD and Q2B read the same folder)."""
    path = tmp_path_factory.mktemp("vcali")
    collect(sd2_pipe(), PROMPTS, path, steps=STEPS, cali_st=STEPS, guidance=GUIDANCE, batch_size=2)
    return CalibrationData(path)


def _naive(data, config):
    """Min-max calibration of the tiny UNet on `data` (quantized, activations on)."""
    unet = ranges_from_calls(quantize_unet(tiny_pipeline(0).unet, config), data.unet_calls())
    set_quant_state(unet, True, True)
    return unet


def _by_hand_eps(v, x, t):
    """eps = sqrt(a) v + sqrt(1 - a) x_t with a = alphas_cumprod[t] of SD 2.x's DDIM (integer timesteps)."""
    a = FAMILIES["sd2-v"].alphas_cumprod[int(t)].double()
    return (a.sqrt() * v.double() + (1 - a).sqrt() * x.double()).float()


def _outputs(unet, data, quant: bool):
    set_quant_state(unet, quant, quant)
    out = []
    with torch.no_grad():
        for step, call in data.unet_calls():
            set_step(unet, step)
            out.append((step, call, unet(**call).sample))
    set_quant_state(unet, True, True)
    return out


@pytest.fixture(scope="module")
def v_quant(v_data):
    """The tiny v model at W3A6 (min-max), its PTQD statistics and its FP and quantized raw outputs (v)."""
    unet = _naive(v_data, QuantConfig(w_bits=3, a_bits=6, n_steps=STEPS))
    return {"unet": unet, "stats": ptqd_statistics(unet, v_data), "fp": _outputs(unet, v_data, False),
            "q": _outputs(unet, v_data, True)}


def test_data_records_the_prediction_space(v_data):
    meta = v_data.meta["prediction"]
    assert meta["prediction_type"] == "v_prediction" and meta["timesteps"] == v_data.meta["signature"]["timesteps"]
    sched = FAMILIES["sd2-v"]
    assert meta["alpha_bar"] == pytest.approx([float(sched.alphas_cumprod[int(t)]) for t in meta["timesteps"]])


def _eps_error(pairs) -> float:
    """||eps - eps_fp|| / ||eps_fp|| over (v, v_fp, call) triples, converted by hand."""
    num = den = 0.0
    for v, v_fp, call in pairs:
        x_t, t = call["sample"], call["timestep"]
        e, e_fp = _by_hand_eps(v, x_t, t), _by_hand_eps(v_fp, x_t, t)
        num, den = num + float((e - e_fp).pow(2).sum()), den + float(e_fp.pow(2).sum())
    return (num / den) ** 0.5


def _hooked_error(unet, stats, fp, pipe):
    handle = apply_ptqd(unet, stats, pipe)
    pairs = []
    for step, call, v_fp in fp:
        set_step(unet, step)
        with torch.no_grad():
            pairs.append((unet(**call).sample, v_fp, call))
    handle.remove()
    return _eps_error(pairs), pairs


def test_eps_models_are_left_bit_identical():
    """On an eps model every conversion returns its input itself (the embedded world's figures do not move)."""
    sched = tiny_pipeline(0).scheduler
    sched.set_timesteps(STEPS)
    space, out, x = prediction_space(sched), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert space.identity and space.to_eps(out, x, sched.timesteps[0]) is out
    assert space.from_eps(out, x, sched.timesteps[0]) is out


def test_data_from_before_the_space_was_recorded(v_data, tmp_path):
    """Without `prediction` in meta.json the space is refused unless the pipeline is given; collecting into
    the folder again (nothing to redo) records it."""
    folder = tmp_path / "old"
    shutil.copytree(v_data.path, folder)
    meta = json.loads((folder / "meta.json").read_text())
    del meta["prediction"]
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="records no prediction type.*CalibrationData\\(path, pipe\\)"):
        CalibrationData(folder).space
    assert CalibrationData(folder, sd2_pipe()).space.to_meta() == v_data.space.to_meta()
    collect(sd2_pipe(), PROMPTS, folder, steps=STEPS, cali_st=STEPS, guidance=GUIDANCE, batch_size=2)
    assert CalibrationData(folder).space.to_meta() == v_data.space.to_meta()


def test_ptqd_regresses_and_corrects_in_eps_space(v_data, v_quant):
    """PTQD's statistics on a v model equal the eps-space least squares of the guided eps by hand (and differ
    from the raw v-space ones the code used to compute); the correction lowers the eps-space error to FP; and the
    hook's output is the corrected eps mapped back to v (checked with k > 0, where it differs from a v-space
    division)."""
    unet, stats, fp, q = v_quant["unet"], v_quant["stats"], v_quant["fp"], v_quant["q"]
    assert PREDICTION_TYPES[int(stats["ptqd_space"])] == "v_prediction"
    old = {"ptqd_steps": stats["ptqd_steps"], "ptqd_k": [], "ptqd_bias": []}  # raw-output statistics
    w = float(v_data.meta["signature"]["guidance"])

    def guided(eps):  # PTQD fits the guided eps of each [uncond; cond] call
        u, c = eps.chunk(2)
        return u + w * (c - u)

    for j, s in enumerate(v_data.steps):
        e = torch.cat([guided(_by_hand_eps(o, a["sample"], a["timestep"])) for st, a, o in fp if st == s]).double()
        d = torch.cat([guided(_by_hand_eps(o, a["sample"], a["timestep"])) for st, a, o in q if st == s]).double() - e
        k_raw = float(torch.linalg.lstsq(e.reshape(-1, 1), d.reshape(-1, 1)).solution)
        r = d - max(k_raw, 0.0) * e
        assert float(stats["ptqd_k_raw"][j]) == pytest.approx(k_raw, rel=1e-4, abs=1e-6)
        torch.testing.assert_close(stats["ptqd_bias"][j].double(), r.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-6)
        r = r - r.mean(dim=(0, 2, 3)).reshape(1, -1, 1, 1)
        assert float(stats["ptqd_std"][j]) == pytest.approx(float(r.std()), rel=1e-4)
        v_fp = torch.cat([guided(o) for st, a, o in fp if st == s]).double()
        v_d = torch.cat([guided(o) for st, a, o in q if st == s]).double() - v_fp
        k_v = max(0.0, float((v_d * v_fp).sum() / (v_fp * v_fp).sum()))
        old["ptqd_k"].append(k_v)
        old["ptqd_bias"].append((v_d - k_v * v_fp).mean(dim=(0, 2, 3)).float())
    old = {"ptqd_steps": old["ptqd_steps"], "ptqd_k": torch.tensor(old["ptqd_k"]),
           "ptqd_bias": torch.stack(old["ptqd_bias"])}
    gap = (old["ptqd_bias"] - stats["ptqd_bias"]).norm(dim=1) / stats["ptqd_bias"].norm(dim=1)
    assert float(gap.max()) > 0.2  # at high noise eps-space bias = sqrt(a) x v-space bias: the space matters

    pipe = sd2_pipe()
    pipe.scheduler.set_timesteps(STEPS)
    before = _eps_error([(v_q, v_fp, a) for (_, a, v_fp), (_, _, v_q) in zip(fp, q)])
    after, _ = _hooked_error(unet, stats, fp, pipe)
    assert after < before, (before, after)
    # this UNet's slopes are negative, so k = 0: a bias-only correction is the same in either space (the
    # conversion is affine in the output), and the old v-space correction lands on the same error
    assert (stats["ptqd_k"] == 0).all()
    after_old, _ = _hooked_error(unet, old, fp, pipe)  # no ptqd_space: applied to the raw output, as before
    assert after_old == pytest.approx(after, rel=1e-4)
    print(f"\nPTQD on SD 2.x-v (W3A6 naive): eps-space relative error {before:.4f} uncorrected, "
          f"{after:.4f} corrected; k_raw = {[round(float(k), 4) for k in stats['ptqd_k_raw']]}")
    # with k > 0 the spaces part: the hook divides the eps, not the v, by 1 + k
    stats = {**stats, "ptqd_k": torch.full_like(stats["ptqd_k"], 0.3)}
    _, pairs = _hooked_error(unet, stats, fp, pipe)
    for (v_c, _, call), (step, _, v_q) in zip(pairs, q):
        bias = stats["ptqd_bias"][v_data.steps.index(step)].reshape(1, -1, 1, 1)
        want = (_by_hand_eps(v_q, call["sample"], call["timestep"]) - bias) / 1.3
        torch.testing.assert_close(_by_hand_eps(v_c, call["sample"], call["timestep"]), want, rtol=1e-4, atol=1e-5)
    v_space = [(v_q - o_b) / 1.3 for (_, _, v_q), o_b in zip(q, [old["ptqd_bias"][v_data.steps.index(st)]
                                                                 .reshape(1, -1, 1, 1) for st, _, _ in q])]
    assert max(float((v_c - v_old).abs().max()) for (v_c, _, _), v_old in zip(pairs, v_space)) > 1e-2


def test_q2b_distortion_is_measured_in_eps_space(v_data, v_quant):
    """Q2B's targets are the FP guided eps, and D = ||eps_q - eps_fp||^2 / ||eps_fp||^2 of the guided eps,
    converted by hand from the guided v; the reference distortion averages the same D."""
    unet = v_quant["unet"]
    set_quant_state(unet, False, False)  # the FP targets
    items = training_items(unet, v_data, torch.linspace(0, 1, v_data.meta["n_prompts"]))
    assert len(items) == STEPS
    for it in items:
        v = guided_eps(unet, it["x"], it["t"], item_text(it), GUIDANCE)  # raw: the guided v
        torch.testing.assert_close(it["eps_fp"], _by_hand_eps(v, it["x"], it["t"]), rtol=1e-5, atol=1e-6)
    set_quant_state(unet, True, True)
    ds = []
    for it in items:
        set_step(unet, it["step"])
        with torch.no_grad():
            eps_q = _by_hand_eps(guided_eps(unet, it["x"], it["t"], item_text(it), GUIDANCE), it["x"],
                                 it["t"])
            d = (eps_q - it["eps_fp"]).pow(2).flatten(1).sum(1) / it["eps_fp"].pow(2).flatten(1).sum(1)
            torch.testing.assert_close(item_distortion(unet, it, GUIDANCE), d, rtol=1e-4, atol=1e-7)
        ds.append(d)
    assert reference_distortion(unet, items, 6, GUIDANCE, n=len(items)) == pytest.approx(
        float(torch.cat(ds).mean()), rel=1e-4)


def test_reconstruction_targets_are_the_raw_output_and_the_error_metric_states_its_space(v_data, v_quant):
    """BRECQ's last unit (conv_out) is fitted to the UNet's raw output, v here (no reweighting,
    docs/calibration.md#prediction-types); eps_relative_error measures eps when given the space, the raw
    output otherwise."""
    unet, fp = v_quant["unet"], v_quant["fp"]
    items = capture_unit_io(unet, unet.conv_out, v_data)
    assert len(items) == len(fp)
    for it, (_, _, v) in zip(items, fp):
        torch.testing.assert_close(it["out"], v)
    set_quant_state(unet, True, True)
    calls = [(s, a) for s, a, _ in fp]
    set_quant_state(unet, False, False)
    refs = reference_outputs(unet, calls)
    set_quant_state(unet, True, True)
    num = den = num_v = den_v = 0.0
    for (s, a), ref in zip(calls, refs):
        set_step(unet, s)
        with torch.no_grad():
            out = unet(**a).sample
        x_t, t = a["sample"], a["timestep"]
        e, e_ref = _by_hand_eps(out, x_t, t), _by_hand_eps(ref, x_t, t)
        num, den = num + float((e - e_ref).pow(2).sum()), den + float(e_ref.pow(2).sum())
        num_v, den_v = num_v + float((out - ref).pow(2).sum()), den_v + float(ref.pow(2).sum())
    assert eps_relative_error(unet, calls, refs, v_data.space) == pytest.approx((num / den) ** 0.5, rel=1e-4)
    assert eps_relative_error(unet, calls, refs) == pytest.approx((num_v / den_v) ** 0.5, rel=1e-4)


def test_unsupported_prediction_types_are_refused_early(tmp_path):
    pipe = tiny_pipeline(0)
    pipe.scheduler = DDIMScheduler(**BASE, prediction_type="flow")
    with pytest.raises(ValueError, match=r"prediction_type 'flow'.*supported: epsilon, v_prediction, sample"):
        collect(pipe, PROMPTS, tmp_path / "c", steps=2, cali_st=2)
    assert not list((tmp_path / "c").glob("*.safetensors"))  # refused before any work
    flow = diffusers.FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler has prediction_type None"):
        prediction_space(flow)


def test_ptqd_state_loads_with_the_pipelines_scheduler_and_refuses_another_type(v_data, v_quant, tmp_path):
    """A saved v-model PTQD state: quantize_pipeline hooks it through the pipeline's scheduler (eps-space
    correction, as by hand); without a pipeline, or under an eps scheduler, it is refused."""
    stats, (step, call, v_q) = v_quant["stats"], v_quant["q"][0]
    state = save_quantized(v_quant["unet"], tmp_path / "state", extra_tensors=stats)
    pipe = quantize_pipeline(sd2_pipe(), state)
    pipe.scheduler.set_timesteps(STEPS)
    set_step(pipe.unet, step)
    with torch.no_grad():
        v_c = pipe.unet(**call).sample
    j = v_data.steps.index(step)
    want = (_by_hand_eps(v_q, call["sample"], call["timestep"]) - stats["ptqd_bias"][j].reshape(1, -1, 1, 1)) / (
        1 + float(stats["ptqd_k"][j]))
    torch.testing.assert_close(_by_hand_eps(v_c, call["sample"], call["timestep"]), want, rtol=1e-4, atol=1e-5)
    unet = tiny_pipeline(0).unet
    with pytest.raises(ValueError, match="calibrated on a 'v_prediction' model: pass the pipeline"):
        apply_ptqd(unet, stats)
    with pytest.raises(ValueError, match="'v_prediction' model but the pipeline's scheduler predicts 'epsilon'"):
        apply_ptqd(unet, stats, tiny_pipeline(0))
