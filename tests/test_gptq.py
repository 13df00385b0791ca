"""The GPTQ start of AdaRound (--adaround-init gptq): the closed-form rounding against a by-hand solution,
its error against nearest rounding, and AdaRound from it against AdaRound from the FP weights."""
import pytest
import torch
from torch import nn

from data.prompts import load_prompts
from pipeline.calibration.blocks import reconstruction_units
from pipeline.calibration.data import CalibrationData, collect
from pipeline.calibration.gptq import check_adaround_init, gptq_round, gptq_starts
from pipeline.calibration.qdiff import reconstruct_unit
from pipeline.calibration.reconstruction import fit_rounding, held_out_mse
from pipeline.models import tiny_pipeline
from pipeline.quant import QuantConfig, quantize_unet
from pipeline.quant.layers import QuantContext, QuantLayer
from pipeline.quant.quantizer import WeightQuantizer

STEPS = 6


def by_hand(weight, scale, zp, n_bits, H, damp=0.01):
    """OBQ's greedy order, solved directly: each column (largest diag(H) first) is rounded to floor or ceil of
    the original w / s, and the columns not yet rounded take the least-squares optimum given the rounded ones,
    w_R = w0_R - H_RR^-1 H_RP (q_P - w0_P), re-solved from scratch at every column (no Cholesky updates)."""
    w0 = weight.double()
    s, z = scale.double().reshape(-1, 1), zp.double().reshape(-1, 1)
    Hd = H.double() + damp * torch.diag(H).double().mean() * torch.eye(H.shape[0], dtype=torch.float64)
    order = torch.argsort(torch.diag(H), descending=True).tolist()
    floor = torch.floor(w0 / s)
    q = torch.zeros_like(w0)
    start = torch.zeros_like(w0)
    w = w0.clone()
    done = []
    for j in order:
        start[:, j] = w[:, j]
        q_int = torch.clamp(torch.round(w[:, j:j + 1] / s), floor[:, j:j + 1], floor[:, j:j + 1] + 1)
        q[:, j:j + 1] = (torch.clamp(q_int + z, 0, 2**n_bits - 1) - z) * s
        done.append(j)
        rest = [i for i in range(w0.shape[1]) if i not in done]
        if rest:
            delta = q[:, done] - w0[:, done]
            w[:, rest] = w0[:, rest] - delta @ torch.linalg.solve(Hd[rest][:, rest], Hd[rest][:, done]).T
    return start


def test_gptq_round_matches_the_least_squares_solution_column_by_column():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 7, generator=g)
    x = torch.randn(40, 7, generator=g) @ torch.randn(7, 7, generator=g)  # correlated inputs
    H = x.T @ x / len(x)
    wq = WeightQuantizer(3, weight, rounding="adaround")
    got = gptq_round(weight, wq.scale, wq.zero_point, 3, H, block=3)  # blocks of 3: the lazy updates cross blocks
    want = by_hand(weight, wq.scale, wq.zero_point, 3, H)
    assert torch.allclose(got.double(), want, atol=1e-5), (got.double() - want).abs().max()


def layer_unit(seed=0, n_bits=3):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
    mix = torch.randn(8, 8, generator=g)

    def items(n, s):
        gen = torch.Generator().manual_seed(s)
        out = []
        for _ in range(n):
            x = torch.einsum("bchw,cd->bdhw", torch.randn(4, 8, 6, 6, generator=gen), mix)  # correlated channels
            with torch.no_grad():
                out.append({"args": (x,), "kwargs": {}, "out": conv(x), "step": 0})
        return out

    ctx = QuantContext()
    layer = QuantLayer(conv, QuantConfig(w_bits=n_bits, a_bits=32, weight_rounding="adaround"), ctx)
    layer.quant_act = False
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer, ctx, items(8, 1), items(4, 2)


def test_gptq_start_lowers_the_held_out_error_of_nearest_rounding():
    layer, ctx, train, held = layer_unit()
    rtn = held_out_mse(layer, ctx, held)
    start = gptq_starts(layer, ctx, train)[layer]
    layer.w_quant.start_learning_rounding(layer.weight, start=start)
    with torch.no_grad():  # the soft start is GPTQ's compensated weight, clipped to [floor, ceil]
        soft = layer.w_quant(layer.weight)
    layer.w_quant.finish_learning_rounding()
    hard = held_out_mse(layer, ctx, held)
    assert hard < 0.7 * rtn, (hard, rtn)
    s, z = layer.w_quant.scale, layer.w_quant.zero_point
    lo = (torch.clamp(torch.floor(layer.weight / s) + z, 0, 7) - z) * s
    hi = (torch.clamp(torch.floor(layer.weight / s) + 1 + z, 0, 7) - z) * s
    assert torch.allclose(soft, torch.minimum(torch.maximum(start, lo), hi), atol=1e-5)


@pytest.fixture(scope="module")
def cali_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cali_gptq")
    collect(tiny_pipeline(0), load_prompts("builtin", 6), path, steps=STEPS, cali_st=3, guidance=5.0, batch_size=3)
    return path


def test_adaround_from_the_gptq_start_is_at_least_as_good_at_few_iterations(cali_dir):
    """Held-out block error after the same 30 AdaRound iterations at 4 bits, from the GPTQ start and from
    AdaRound's own (the FP weights), on a ResnetBlock2D and a BasicTransformerBlock of a tiny seeded UNet.

    Meant to break on: compensating with the wrong sign in `gptq_round` (`wb[:, j:] += ...`, `w[:, i1:] += ...`;
    checked to fail the two layer tests above), or `fit_rounding` ignoring the starts (`start=None`: the GPTQ
    run is then AdaRound from the FP weights, which ends above the plain run here; checked to fail)."""
    data = CalibrationData(cali_dir)
    rows = {}
    for init in ("fp", "gptq"):
        pipe = tiny_pipeline(0)
        quantize_unet(pipe.unet, QuantConfig(w_bits=4, a_bits=32, a_bit_options=[32], n_steps=STEPS,
                                             weight_rounding="adaround"))
        units = reconstruction_units(pipe.unet)
        for name in ["down_blocks.0.resnets.0", "down_blocks.0.attentions.0.transformer_blocks.0"]:
            m = reconstruct_unit(pipe.unet, name, units[name], data, iters_w=30, iters_a=0, adaround_init=init)
            rows[init, name] = (m["mse_rtn"], m["mse_adaround"])
    for name in ["down_blocks.0.resnets.0", "down_blocks.0.attentions.0.transformer_blocks.0"]:
        rtn, fp = rows["fp", name]
        assert rows["gptq", name][0] == pytest.approx(rtn)  # the same unit, the same grid
        gptq = rows["gptq", name][1]
        assert gptq <= fp and gptq < 0.8 * rtn, (name, rtn, fp, gptq)


def test_select_keeps_the_start_where_adaround_ends_worse():
    """A destructive schedule (lr 1) ends far above the GPTQ start on the items not fitted on: with `select`
    the start's decisions are put back (error exactly the start's); without, AdaRound's end stays.
    Breaks (checked): not restoring `round_up` after a kept start."""
    layer, ctx, train, held = layer_unit()
    start = gptq_starts(layer, ctx, train)[layer]
    layer.w_quant.start_learning_rounding(layer.weight, start=start)
    layer.w_quant.finish_learning_rounding()
    start_error = held_out_mse(layer, ctx, held)
    trainer = {"enable_progress_bar": False}
    ended = fit_rounding(layer, ctx, train, 20, 1.0, trainer, 0, "layer", init="gptq")
    end_error = held_out_mse(layer, ctx, held)
    assert not ended.kept_start and end_error > 1.1 * start_error, (start_error, end_error)
    kept = fit_rounding(layer, ctx, train, 20, 1.0, trainer, 0, "layer", init="gptq", select=held)
    assert kept.kept_start, (start_error, end_error, held_out_mse(layer, ctx, held))
    assert held_out_mse(layer, ctx, held) == pytest.approx(start_error, rel=1e-6)


def test_bad_adaround_init_is_refused_early():
    with pytest.raises(ValueError, match=r"--adaround-init 'obq': use one of \('fp', 'gptq'\)"):
        check_adaround_init("obq")
    layer, ctx, train, _ = layer_unit()
    with pytest.raises(ValueError, match="--adaround-init 'obq'"):
        fit_rounding(layer, ctx, train, 5, 1e-3, {}, 0, "layer", init="obq")


def test_calibrate_stage_refuses_a_bad_adaround_init_before_loading(tmp_path):
    from pipeline.api import CalibrateConfig, calibrate

    with pytest.raises(ValueError, match="--adaround-init 'obq'"):
        calibrate(CalibrateConfig(method="qdiff", adaround_init="obq", run_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run" / "quant").exists()
