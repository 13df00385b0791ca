"""Calibration: data collection, AdaRound/BRECQ reconstruction, resume, PTQD, PCR."""
import json

import pytest
import torch

from data.prompts import load_prompts
from pipeline.calibration import qdiff as qdiff_mod
from pipeline.calibration.blocks import reconstruction_units, unit_layers
from pipeline.calibration.data import CalibrationData, cali_step_indices, collect
from pipeline.calibration.naive import ranges_from_calls
from pipeline.calibration.pcr import apply_relaxing, calibrate_progressive, relaxed_steps
from pipeline.calibration.ptqd import apply_ptqd, ptqd_statistics
from pipeline.calibration.qdiff import calibrate_qdiff
from pipeline.models import tiny_pipeline
from pipeline.quant import (
    QuantConfig,
    act_banks,
    get_bit_policy,
    quant_layers,
    quantize_unet,
    set_quant_state,
    set_step,
)
from pipeline.quant.state import quantizer_state

STEPS = 6


@pytest.fixture(scope="module")
def cali_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cali")
    collect(tiny_pipeline(0), load_prompts("builtin", 6), path, steps=STEPS, cali_st=3, guidance=5.0, batch_size=3)
    return path


def qcfg(**kw):
    base = dict(w_bits=4, a_bits=8, n_steps=STEPS, weight_rounding="adaround", weight_init="lp", act_init="lp")
    return QuantConfig(**{**base, **kw})


def test_collection_layout_and_refusals(cali_dir):
    assert cali_step_indices(STEPS, 3) == [0, 2, 5]
    meta = json.loads((cali_dir / "meta.json").read_text())
    assert meta["cali_steps"] == [0, 2, 5] and meta["n_shards"] == 2
    data = CalibrationData(cali_dir, tiny_pipeline(0), steps=STEPS)
    calls = list(data.unet_calls())
    assert len(calls) == 2 * 3
    step, call = calls[0]
    x, emb = call["sample"], call["encoder_hidden_states"]
    assert x.shape == (6, 4, 16, 16) and emb.shape == (6, 77, 64)  # CFG: both branches
    assert torch.equal(x[:3], x[3:])
    with pytest.raises(ValueError, match="weights_sha256"):
        CalibrationData(cali_dir, tiny_pipeline(1), steps=STEPS)
    with pytest.raises(ValueError, match="steps: data 6 vs now 8"):
        CalibrationData(cali_dir, tiny_pipeline(0), steps=8)
    with pytest.raises(ValueError, match="resolution"):
        CalibrationData(cali_dir, tiny_pipeline(0), steps=STEPS, resolution=64)


def test_collection_matches_the_pipeline_trajectory(cali_dir):
    """The recorded x_t of the first step is the seeded initial noise the sampler starts from."""
    from pipeline.sampling import initial_latents

    data = CalibrationData(cali_dir)
    i, x, t, text = next(data.batches(step_index=0))
    assert torch.equal(x, initial_latents(tiny_pipeline(0), [0, 1, 2]))


@pytest.mark.slow
def test_adaround_beats_round_to_nearest_per_block(cali_dir):
    """Held-out block MSE at 4-bit weights: AdaRound vs round-to-nearest (the
    same quantizer before learning). Fewer iterations than the 20k default,
    hence the larger learning rate."""
    from pipeline.calibration.qdiff import reconstruct_unit

    pipe = tiny_pipeline(0)
    quantize_unet(pipe.unet, qcfg(a_bits=32, a_bit_options=[32]))
    units = reconstruction_units(pipe.unet)
    data = CalibrationData(cali_dir)
    gains = []
    for name in ["down_blocks.0.resnets.0", "down_blocks.0.attentions.0.transformer_blocks.0"]:
        m = reconstruct_unit(pipe.unet, name, units[name], data, iters_w=200, iters_a=0, w_lr=1e-2)
        gains.append(1 - m["mse_adaround"] / m["mse_rtn"])
    assert min(gains) >= 0.3, gains


def _unet_error(unet, data):
    num = den = 0.0
    for step, call in data.unet_calls():
        set_step(unet, step)
        with torch.no_grad():
            set_quant_state(unet, False, False)
            ref = unet(**call).sample
            set_quant_state(unet, True, True)
            out = unet(**call).sample
        num += float((out - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
    return (num / den) ** 0.5


def _naive(config, data):
    """Min-max calibration of a fresh tiny UNet on the calibration data."""
    return ranges_from_calls(quantize_unet(tiny_pipeline(0).unet, config), data.unet_calls())


def test_qdiff_lowers_whole_unet_error_against_naive_and_adaround_carries_part_of_it(cali_dir, tmp_path):
    """Q-Diffusion beats naive PTQ, and AdaRound is part of why: the same recipe with round-to-nearest
    weights (iters_w=0, the same L_p ranges and LSQ) is worse (mutation caught: AdaRound that learns
    nothing, e.g. no optimizer step on the rounding, leaves the two equal)."""
    data = CalibrationData(cali_dir)
    naive = _naive(QuantConfig(w_bits=4, a_bits=8, n_steps=STEPS), data)
    errors = {}
    for iters_w in (0, 30):
        q = tiny_pipeline(0).unet
        quantize_unet(q, qcfg())
        calibrate_qdiff(q, data, tmp_path / f"p{iters_w}", iters_w=iters_w, iters_a=10, w_lr=1e-2)
        errors[iters_w] = _unet_error(q, data)
    e_naive = _unet_error(naive, data)
    assert errors[30] < e_naive and errors[30] < errors[0], (e_naive, errors)


def test_time_aware_lsq_trains_each_calibrated_step_and_shares_it_with_the_nearest_steps(cali_dir, tmp_path,
                                                                                        monkeypatch):
    """--time-aware without --progressive, data at steps [0, 2, 5] of 6: LSQ phases exist for those three
    slots only, and each step without data takes its nearest calibrated step's quantizer (mutation caught:
    a phase for a slot without data used to draw other steps' items, training their quantizers instead)."""
    from pipeline.calibration import reconstruction

    phases = []
    real_fit = qdiff_mod.fit_unit
    monkeypatch.setattr(qdiff_mod, "fit_unit", lambda u, c, items, ph, *a, **k: phases.append(ph) or
                        real_fit(u, c, items, ph, *a, **k))
    unet = tiny_pipeline(0).unet
    quantize_unet(unet, qcfg(time_aware=True))
    calibrate_qdiff(unet, CalibrationData(cali_dir), tmp_path / "p", iters_w=2, iters_a=6, recon_inputs="fp")
    act_slots = {p.slot for ph in phases for p in ph if p.kind == "act"}
    assert act_slots == {0, 2, 5}
    for bank in act_banks(unet).values():
        if bank.n_slots > 1:
            for slot, nearest in {1: 0, 3: 2, 4: 5}.items():
                assert torch.equal(bank.scale[:, slot], bank.scale[:, nearest]), slot
    with pytest.raises(ValueError, match="no calibration item addresses time slot 1"):
        list(reconstruction.PhaseSampler([{"step": 0}], [reconstruction.Phase("act", 2, k=0, slot=1)],
                                         lambda s: s))


def test_resume_after_interruption_gives_the_same_state(cali_dir, tmp_path, monkeypatch):
    """FP inputs' single pass (the quantized inputs' two passes resume in the test after next)."""
    data = CalibrationData(cali_dir)
    kw = dict(iters_w=4, iters_a=2, seed=3, recon_inputs="fp")
    full = tiny_pipeline(0).unet
    quantize_unet(full, qcfg())
    calibrate_qdiff(full, data, tmp_path / "full", **kw)

    real = qdiff_mod.reconstruct_unit
    calls = []

    def counting(unet, name, *a, **k):
        calls.append(name)
        if kill_at is not None and len(calls) == kill_at:
            raise KeyboardInterrupt("simulated kill")
        return real(unet, name, *a, **k)

    monkeypatch.setattr(qdiff_mod, "reconstruct_unit", counting)
    kill_at = 7
    part = tiny_pipeline(0).unet
    quantize_unet(part, qcfg())
    with pytest.raises(KeyboardInterrupt):
        calibrate_qdiff(part, data, tmp_path / "resumed", **kw)
    done = json.loads((tmp_path / "resumed" / "progress.json").read_text())["done"]
    assert len(done) == 6
    calls.clear()
    kill_at = None
    resumed = tiny_pipeline(0).unet  # a fresh process: nothing in memory
    quantize_unet(resumed, qcfg())
    calibrate_qdiff(resumed, data, tmp_path / "resumed", **kw)
    n_units = len(reconstruction_units(resumed))
    assert len(calls) == n_units - 6 and not set(calls) & set(done)  # nothing recomputed
    a, b = quantizer_state(full), quantizer_state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k


def test_progress_of_other_settings_is_refused(cali_dir, tmp_path):
    data = CalibrationData(cali_dir)
    u = tiny_pipeline(0).unet
    quantize_unet(u, qcfg())
    calibrate_qdiff(u, data, tmp_path / "p", iters_w=2, iters_a=0, recon_inputs="fp")  # the mode is not the point
    v = tiny_pipeline(0).unet
    quantize_unet(v, qcfg(w_bits=3))
    with pytest.raises(FileExistsError, match="progress of other settings.*quant_config"):
        calibrate_qdiff(v, data, tmp_path / "p", iters_w=2, iters_a=0, recon_inputs="fp")


def test_non_finite_loss_names_block_and_step(cali_dir, tmp_path):
    data = CalibrationData(cali_dir)
    u = tiny_pipeline(0).unet
    quantize_unet(u, qcfg())
    first = next(iter(reconstruction_units(u)))
    with torch.no_grad():
        unit_layers(u.get_submodule(first))[0].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=f"{first} at step 0"):
        calibrate_qdiff(u, data, tmp_path / "p", iters_w=5, iters_a=0)


def test_ptqd_fits_the_guided_eps_and_corrects_the_guided_eps(cali_dir):
    """PTQD's k_t is the least-squares slope of the guided quantization error on the guided FP eps (checked
    against the closed form on the guided outputs), and the per-branch hook corrects the guided eps to
    (eps_g - b) / (1 + k). Mutation caught: fitting each CFG branch separately gives another slope."""
    data = CalibrationData(cali_dir)
    u = _naive(QuantConfig(w_bits=3, a_bits=6, n_steps=STEPS), data)
    stats = ptqd_statistics(u, data)
    assert stats["ptqd_k"].shape == (3,) and stats["ptqd_bias"].shape == (3, 4)
    assert torch.equal(stats["ptqd_k"], stats["ptqd_k_raw"].clamp(min=0))
    w = float(data.meta["signature"]["guidance"])
    step, call = next(iter(data.unet_calls()))
    with torch.no_grad():
        set_step(u, step)
        set_quant_state(u, False, False)
        fp = u(**call).sample.chunk(2)
        set_quant_state(u, True, True)
        q = u(**call).sample.chunk(2)
    calls_at = [c for s, c in data.unet_calls() if s == step]
    e_g, d_g, d_branch, e_branch = [], [], [], []
    with torch.no_grad():
        for c in calls_at:
            set_quant_state(u, False, False)
            f = u(**c).sample
            set_quant_state(u, True, True)
            qq = u(**c).sample
            (fu, fc), (qu, qc) = f.chunk(2), qq.chunk(2)
            e_g.append(fu + w * (fc - fu))
            d_g.append(qu + w * (qc - qu) - e_g[-1])
            e_branch.append(f)
            d_branch.append(qq - f)
    e_g, d_g = torch.cat(e_g).double(), torch.cat(d_g).double()
    k_guided = float((d_g * e_g).sum() / (e_g * e_g).sum())
    e_b, d_b = torch.cat(e_branch).double(), torch.cat(d_branch).double()
    k_branch = float((d_b * e_b).sum() / (e_b * e_b).sum())
    j = stats["ptqd_steps"].tolist().index(step)
    assert float(stats["ptqd_k_raw"][j]) == pytest.approx(k_guided, rel=1e-5)
    assert abs(k_branch - k_guided) > 1e-4 * max(1.0, abs(k_guided))  # the test tells the two fits apart
    handle = apply_ptqd(u, stats)
    with torch.no_grad():
        set_step(u, step)
        cu, cc = u(**call).sample.chunk(2)
    handle.remove()
    k, b = float(stats["ptqd_k"][j]), stats["ptqd_bias"][j].reshape(1, -1, 1, 1)
    want = (q[0] + w * (q[1] - q[0]) - b) / (1 + k)
    assert torch.allclose(cu + w * (cc - cu), want, atol=1e-5)
    assert fp[0].shape == cu.shape


def test_relaxing_raises_bits_at_the_chosen_end():
    assert relaxed_steps(10, 0.2, "x0") == [8, 9]
    assert relaxed_steps(10, 0.2, "xT") == [0, 1]
    with pytest.raises(ValueError, match="--relax-tau 1.0 must be in"):
        relaxed_steps(10, 1.0)
    u = tiny_pipeline(0).unet
    quantize_unet(u, QuantConfig(w_bits=4, a_bits=8, a_bit_options=[8, 10], n_steps=10))
    apply_relaxing(u, 0.2, 10, "x0")
    table = get_bit_policy(u)
    assert (table[:, 8:] == 10).all() and (table[:, :8] == 8).all()
    with pytest.raises(ValueError, match="--relax-bits 12 has no calibrated quantizer"):
        apply_relaxing(u, 0.2, 12)


def test_progressive_calibrates_each_step_on_quantized_trajectories():
    """One quantizer per step from its own data, at O(1) UNet calls per calibrated step: each batch's
    trajectory advances one step after the step is calibrated (mutation caught: rerunning the trajectory
    from x_T for every step, as `denoise(stop=i)` did, makes 20 calls here instead of 14)."""
    pipe = tiny_pipeline(0)
    quantize_unet(pipe.unet, QuantConfig(w_bits=8, a_bits=8, n_steps=4, time_aware=True))
    with pytest.raises(ValueError, match="time-aware quantizers for 5 steps"):
        calibrate_progressive(pipe, load_prompts("builtin", 2), 5, 5.0)
    calls = []
    pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    calibrate_progressive(pipe, load_prompts("builtin", 4), 4, 5.0, batch_size=2)
    assert len(calls) == 2 * 3 + 2 * 4  # 2 batches: 3 advances (DDIM: one call a step) + 4 observation passes
    banks = act_banks(pipe.unet)
    assert all(b.calibrated.all() for b in banks.values())
    conv_in = quant_layers(pipe.unet)["conv_in"].act.scale.detach()[0]
    assert len(set(conv_in.tolist())) == 4  # one quantizer per step, each from its own data


@pytest.mark.slow
def test_progressive_learns_step_sizes_per_step_and_resumes(tmp_path, monkeypatch):
    """Q-Diffusion + PCR: each step's slot gets range init + LSQ on its own quantized-trajectory
    inputs (the learned step sizes are kept, not reset to min-max); an interrupted run continues with
    the first unfinished step and ends where an uninterrupted run ends."""
    from pipeline.calibration import pcr

    prompts = load_prompts("builtin", 4)

    def fresh():
        pipe = tiny_pipeline(0)
        quantize_unet(pipe.unet, QuantConfig(w_bits=8, a_bits=6, n_steps=3, time_aware=True))
        return pipe

    ranges_only = fresh()
    calibrate_progressive(ranges_only, prompts, 3, 5.0, batch_size=2, partial_dir=tmp_path / "full")
    learned = fresh()
    learned_slots = []
    real_learn = pcr.learn_activations
    monkeypatch.setattr(pcr, "learn_activations",
                        lambda *a, slots, **k: learned_slots.append(tuple(slots)) or real_learn(*a, slots=slots, **k))
    calibrate_progressive(learned, prompts, 3, 5.0, batch_size=2, iters_a=6, a_lr=1e-3)
    assert sorted(set(learned_slots)) == [(0,), (1,), (2,)]
    lsq = quant_layers(learned.unet)["conv_in"].act.scale.detach()[0]
    init = quant_layers(ranges_only.unet)["conv_in"].act.scale.detach()[0]
    assert len(set(lsq.tolist())) == 3 and not torch.allclose(lsq, init, rtol=1e-3)

    real_advance, real_save = pcr.Trajectory.advance, pcr._save_progress

    def interrupt_in_step_1(self, unet):
        if self.step == 1:  # after step 1 was calibrated and saved
            raise KeyboardInterrupt
        return real_advance(self, unet)

    monkeypatch.setattr(pcr.Trajectory, "advance", interrupt_in_step_1)
    with pytest.raises(KeyboardInterrupt):
        calibrate_progressive(fresh(), prompts, 3, 5.0, batch_size=2, partial_dir=tmp_path / "cut")
    assert json.loads((tmp_path / "cut" / "progressive" / "progressive.json").read_text())["done"] == 2
    monkeypatch.setattr(pcr.Trajectory, "advance", real_advance)
    saved = []
    monkeypatch.setattr(pcr, "_save_progress", lambda u, d, done, sig: saved.append(done) or real_save(u, d, done, sig))
    resumed = fresh()
    calibrate_progressive(resumed, prompts, 3, 5.0, batch_size=2, partial_dir=tmp_path / "cut")
    assert saved == [3]  # steps 0 and 1 were not calibrated again
    a, b = quantizer_state(ranges_only.unet), quantizer_state(resumed.unet)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-7), k
    with pytest.raises(FileExistsError, match="iters_a: 0"):
        calibrate_progressive(fresh(), prompts, 3, 5.0, batch_size=2, partial_dir=tmp_path / "cut", iters_a=6)
    with pytest.raises(FileExistsError, match="prompts: "):
        calibrate_progressive(fresh(), prompts[:2], 3, 5.0, batch_size=2, partial_dir=tmp_path / "cut")
    other_start = fresh()
    quant_layers(other_start.unet)["conv_in"].w_quant.scale.data.mul_(1.01)  # e.g. other Q-Diffusion weights
    with pytest.raises(FileExistsError, match="start_state_sha256: "):
        calibrate_progressive(other_start, prompts, 3, 5.0, batch_size=2, partial_dir=tmp_path / "cut")


def test_reconstruction_inputs_come_from_the_quantized_upstream_and_targets_from_fp(cali_dir):
    """Q-Diffusion's asym capture: the unit's inputs are what the UNet feeds it with the units before it
    quantized, its targets the FP unit's outputs on FP inputs (mutation caught: capturing both from one FP
    pass makes the inputs equal the FP ones)."""
    from pipeline.calibration.blocks import UnitProbe, set_units_quantized
    from pipeline.calibration.qdiff import capture_unit_io

    data = CalibrationData(cali_dir)
    unet = tiny_pipeline(0).unet
    quantize_unet(unet, qcfg(w_bits=3))
    units = list(reconstruction_units(unet).values())
    upstream, unit = units[:3], units[3]
    fp_items = capture_unit_io(unet, unit, data)
    q_items = capture_unit_io(unet, unit, data, upstream=upstream)
    step, call = next(iter(data.unet_calls()))
    set_step(unet, step)
    set_quant_state(unet, False, False)
    set_units_quantized(upstream)
    with torch.no_grad():
        want = UnitProbe(unit)(lambda: unet(**call), inputs_only=True)["args"][0]
    assert torch.equal(q_items[0]["args"][0], want)
    assert not torch.allclose(q_items[0]["args"][0], fp_items[0]["args"][0])
    for a, b in zip(fp_items, q_items):
        assert torch.equal(a["out"], b["out"]) and a["step"] == b["step"]


def test_relaxed_steps_run_at_their_bits_during_progressive_calibration(tmp_path, monkeypatch):
    """PCR's relaxing is in force before progressive calibration, so the calibration trajectories run the
    relaxed steps at the relaxed bits, as sampling will (mutation caught: applying the relaxing after
    `calibrate_progressive`, as the recipe did, records 8 bits at the relaxed step too)."""
    from pipeline.calibration import pcr
    from pipeline.calibration.recipe import calibrate_pipeline

    seen = {}
    real = pcr.calibrate_progressive

    def record_calls(pipe, *a, **k):  # every UNet call of the progressive stage, with the bits then in force
        def hook(unet, args):
            step = unet.quant_context.step
            seen.setdefault(step, set()).update(get_bit_policy(unet)[:, step].tolist())
        handle = pipe.unet.register_forward_pre_hook(hook)
        try:
            return real(pipe, *a, **k)
        finally:
            handle.remove()

    monkeypatch.setattr("pipeline.calibration.recipe.calibrate_progressive", record_calls)
    pipe = tiny_pipeline(0)
    cfg = QuantConfig(w_bits=8, a_bits=8, a_bit_options=(8, 16), n_steps=3, time_aware=True)
    _, metrics = calibrate_pipeline(
        pipe, cfg, "naive", load_prompts("builtin", 2), steps=3, guidance=5.0, batch_size=2, seed=0, cali_st=3,
        iters_w=0, iters_a=0, progressive=True, relax_tau=0.34, relax_bits=16, relax_end="x0",
        cali_dir=tmp_path / "cali", partial_dir=tmp_path / "partial", trainer=None, signature={"model": "tiny"})
    assert metrics["relaxed_steps"] == [2]
    assert seen[0] == {8} and seen[1] == {8}
    assert seen[2] == {16}


@pytest.mark.slow
def test_quantized_inputs_follow_the_order_the_unet_runs_its_units(cali_dir, tmp_path, monkeypatch):
    """A diffusers UNet registers up_blocks before mid_block, and a block's attentions before the resnets that
    run first: each unit's quantized upstream must be the units a UNet call runs before it (mutation caught:
    the module order of `reconstruction_units`, which fits the up blocks on an FP mid block)."""
    unet = tiny_pipeline(0).unet
    quantize_unet(unet, qcfg(w_bits=4, a_bits=8))
    seen = {}

    def record(unet_, name, unit, data, *a, upstream=None, weights=True, acts=True, **k):
        seen.setdefault(name, {id(u) for u in upstream or []})
        return {"seconds": 0.0}

    monkeypatch.setattr(qdiff_mod, "reconstruct_unit", record)
    calibrate_qdiff(unet, CalibrationData(cali_dir), tmp_path / "p", iters_w=1, iters_a=1, recon_inputs="quantized")
    units = reconstruction_units(unet)
    order = []
    hooks = [u.register_forward_pre_hook(lambda m, a, n=n: order.append(n) if n not in order else None)
             for n, u in units.items()]
    step, call = next(iter(CalibrationData(cali_dir).unet_calls()))
    set_quant_state(unet, False, False)
    with torch.no_grad():
        unet(**call)
    for h in hooks:
        h.remove()
    assert order.index("mid_block.resnets.0") < order.index("up_blocks.0.resnets.0")
    for name in order:
        assert seen[name] == {id(units[n]) for n in order[: order.index(name)]}, name


def test_quantized_inputs_run_weights_then_activations_as_q_diffusion_does(cali_dir, tmp_path, monkeypatch):
    """With --recon-inputs quantized, every unit's AdaRound runs first, on inputs from upstream weights
    quantized and activations off; then every unit's activations (Q-Diffusion's txt2img.py order). So the
    learned weights do not depend on the activation bits, and a run interrupted in the activation pass
    resumes to the uninterrupted state (mutation caught: one pass fitting each unit's weights and then its
    activations, as before, makes the W3A4 and W3A8 weights differ)."""
    data = CalibrationData(cali_dir)
    kw = dict(iters_w=3, iters_a=2, w_lr=1e-2, recon_inputs="quantized")

    def run(a_bits, folder, **extra):
        unet = tiny_pipeline(0).unet
        quantize_unet(unet, qcfg(w_bits=3, a_bits=a_bits))
        metrics = calibrate_qdiff(unet, data, tmp_path / folder, **{**kw, **extra})
        return unet, metrics

    a4, metrics = run(4, "a4")
    a8, _ = run(8, "a8", iters_a=0)  # only its weights are compared: the activation pass without LSQ
    w4 = {k: v for k, v in quantizer_state(a4).items() if ".w_quant." in k}
    w8 = {k: v for k, v in quantizer_state(a8).items() if ".w_quant." in k}
    assert w4.keys() == w8.keys() and all(torch.equal(w4[k], w8[k]) for k in w4)
    assert any("mse_adaround" in m and "mse_act_lsq" in m and m["seconds"] > m["seconds_weights"]
               for m in metrics.values())

    real = qdiff_mod.reconstruct_unit
    calls = []

    def interrupt_in_act_pass(*a, weights, acts, **k):
        calls.append(weights)
        if not weights and calls.count(False) == 3:
            raise KeyboardInterrupt
        return real(*a, weights=weights, acts=acts, **k)

    monkeypatch.setattr(qdiff_mod, "reconstruct_unit", interrupt_in_act_pass)
    cut = tiny_pipeline(0).unet
    quantize_unet(cut, qcfg(w_bits=3, a_bits=4))
    with pytest.raises(KeyboardInterrupt):
        calibrate_qdiff(cut, data, tmp_path / "cut", **kw)
    monkeypatch.setattr(qdiff_mod, "reconstruct_unit", real)
    resumed = tiny_pipeline(0).unet
    quantize_unet(resumed, qcfg(w_bits=3, a_bits=4))
    calibrate_qdiff(resumed, data, tmp_path / "cut", **kw)
    a, b = quantizer_state(a4), quantizer_state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_learn_adaround_weights_returns_every_weight_option(monkeypatch):
    """The shared weight phase hands over every weight option's learned quantizer, not only the default one's:
    a second UNet wrapped alike, given the tensors, computes what the first does at every option; one wrapped
    without the options is refused by name. The reconstruction itself (AdaRound per option: tests/test_mixdq.py
    test_adaround_learns_every_weight_option) is replaced by a stand-in that moves every option's rounding, so
    that what is checked here is what the function returns."""
    from pipeline.calibration.qdiff import learn_adaround_weights
    from pipeline.quant import set_weight_bits
    from pipeline.quant.quantizer import WeightQuantizer
    from pipeline.quant.state import assign_quantizer_tensors

    def learned_rounding(unet, data, partial_dir, iters_w, iters_a, **kw):
        for m in unet.modules():
            if isinstance(m, WeightQuantizer):
                m.round_up = ~m.round_up  # every option's rounding moves off the fresh one's
        return {"unit": {"seconds": 0.0}}

    monkeypatch.setattr(qdiff_mod, "calibrate_qdiff", learned_rounding)
    cfg = qcfg(w_bit_options=[2, 4, 8], a_bits=32, a_bit_options=[32], weight_init="minmax")  # L_p: slow, not the point
    learned = quantize_unet(tiny_pipeline(0).unet, cfg)
    tensors, units = learn_adaround_weights(learned, None, "unused", iters_w=1)
    assert units == {"unit": {"seconds": 0.0}} and all(".w_quant." in k or ".w_options." in k for k in tensors)
    for bits in ("2", "8"):  # the default (4) is w_quant; the others are w_options.<bits>
        assert any(f".w_options.{bits}.round_up" in k for k in tensors), bits
    fresh = quantize_unet(tiny_pipeline(0).unet, cfg)
    g = torch.Generator().manual_seed(0)
    call = (torch.randn(2, 4, 16, 16, generator=g), 500, torch.randn(2, 77, 64, generator=g))

    def outputs(unet):
        set_quant_state(unet, weight=True, act=False)
        out = {}
        for b in (2, 4, 8):
            set_weight_bits(unet, b)
            with torch.no_grad():
                out[b] = unet(*call).sample
        return out

    want = outputs(learned)
    assert not torch.equal(outputs(fresh)[2], want[2])  # the fresh UNet rounds otherwise
    assign_quantizer_tensors(fresh, tensors)
    got = outputs(fresh)
    for b in (2, 4, 8):
        assert torch.equal(got[b], want[b]), b
    with pytest.raises(ValueError, match="do not exist in this UNet.*--w-bit-options"):
        assign_quantizer_tensors(quantize_unet(tiny_pipeline(0).unet, qcfg(a_bits=32, a_bit_options=[32],
                                                                            weight_init="minmax")), tensors)
