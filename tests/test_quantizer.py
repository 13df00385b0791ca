"""The quantizer against an independent integer reference (numpy)."""
import numpy as np
import pytest
import torch

from pipeline.quant.layers import ActQuantBank
from pipeline.quant.quantizer import WeightQuantizer, fake_quantize, lp_search_range, scale_zero_point


def int_reference(x: np.ndarray, lo: float, hi: float, bits: int):
    """Quantize to int, clamp, dequantize: written from the definition, in float64.
    Returns (dequantized, integer codes, scale, zero point)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmax = 2**bits - 1
    scale = max((hi - lo) / qmax, 1e-8)
    zp = np.round(-lo / scale)
    q = np.clip(np.round(x / scale) + zp, 0, qmax).astype(np.int64)
    return (q - zp) * scale, q, scale, zp


def assert_matches_reference(got, x, lo, hi, bits, scale, zp):
    want, codes, ref_scale, ref_zp = int_reference(x, lo, hi, bits)
    assert abs(float(scale) - ref_scale) <= 1e-6 * ref_scale
    assert float(zp) == ref_zp
    got_codes = np.round(got / float(scale) + float(zp)).astype(np.int64)
    assert got_codes.min() >= 0 and got_codes.max() <= 2**bits - 1
    # float32 vs float64 division may flip an exact .5 tie: allow a handful of one-code flips
    diff = np.abs(got_codes - codes)
    assert diff.max() <= 1 and np.mean(diff == 0) >= 0.995
    assert np.abs(got - want)[diff == 0].max(initial=0) <= 1e-5 * max(hi - lo, 1e-8) + 1e-7


CASES = {
    "gaussian": lambda g: torch.randn(4096, generator=g) * 3 + 0.5,
    "constant": lambda g: torch.full((100,), 0.731),
    "all_negative": lambda g: -torch.rand(1000, generator=g) * 5 - 1,
    "zero_range": lambda g: torch.zeros(64),
    "wide": lambda g: torch.randn(2048, generator=g) * 1e3,
}


@pytest.mark.parametrize("bits", range(2, 17))
@pytest.mark.parametrize("case", sorted(CASES))
def test_per_tensor_matches_integer_reference(bits, case):
    x = CASES[case](torch.Generator().manual_seed(bits))
    bank = ActQuantBank([bits])
    bank.observing = True
    bank(x, 0, 0)
    bank.finalize("minmax")
    got = bank(x, 0, 0).detach().double().numpy()
    assert_matches_reference(got, x.double().numpy(), float(x.min()), float(x.max()), bits,
                             bank.scale[0, 0].item(), bank.zero_point[0, 0].item())
    assert len(np.unique(got)) <= 2**bits


def test_distinct_levels_and_error_bound():
    x = torch.randn(10000, generator=torch.Generator().manual_seed(0))
    for bits in (2, 4, 8):
        s, z = scale_zero_point(x.min(), x.max(), bits)
        q = fake_quantize(x, s, z, bits)
        assert len(torch.unique(q)) <= 2**bits
        assert (q - x).abs().max() <= s / 2 + 1e-6  # inside the range: half a step at most


def test_constant_and_zero_are_exact():
    for c in (0.0, 2.5, -3.0):
        x = torch.full((10,), c)
        s, z = scale_zero_point(x.min(), x.max(), 8)
        assert torch.equal(fake_quantize(x, s, z, 8), x) or torch.allclose(fake_quantize(x, s, z, 8), x, atol=1e-6)
    x = torch.tensor([-1.0, 0.0, 3.0])
    s, z = scale_zero_point(x.min(), x.max(), 4)
    assert fake_quantize(x, s, z, 4)[1] == 0.0  # zero exactly representable


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_per_channel_weights_match_reference(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(16, 8, 3, 3, generator=g) * torch.logspace(-3, 1, 16).reshape(16, 1, 1, 1)
    w[3] = 0.25  # a constant channel
    w[5] = -torch.rand(8, 3, 3, generator=g)  # an all-negative channel
    wq = WeightQuantizer(bits, w)
    q = wq(w).detach().double().numpy()
    for c in range(16):
        assert_matches_reference(q[c], w[c].double().numpy(), float(w[c].min()), float(w[c].max()), bits,
                                 wq.scale[c].item(), wq.zero_point[c].item())
    # per-channel scales differ across channels (one per output channel)
    assert WeightQuantizer(bits, w).scale.shape == (16, 1, 1, 1)


def test_32_bits_is_pass_through():
    w = torch.randn(4, 3)
    assert WeightQuantizer(32, w)(w) is w
    bank = ActQuantBank([8, 32])
    x = torch.randn(100)
    assert bank(x, 1, 0) is x


def test_bad_bits_are_refused():
    with pytest.raises(ValueError, match="w_bits=1"):
        WeightQuantizer(1, torch.randn(2, 2))
    with pytest.raises(ValueError, match="w_bits=20"):
        WeightQuantizer(20, torch.randn(2, 2))


@pytest.mark.parametrize("method", ["minmax", "lp"])
@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_weight_grid(method, bits):
    """symmetric=True: per output channel, max |w| sits on code 2^(b-1) - 1 (minmax) or inside it (lp), the zero
    point is 2^(b-1), and the codes q - z are signed: 8-bit weights fit int8 without a zero point. Against the
    definition, computed here in float64."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, 3, 3, generator=g) * torch.linspace(0.1, 2, 6).reshape(-1, 1, 1, 1) + 0.3  # off-centre
    wq = WeightQuantizer(bits, w, method=method, symmetric=True)
    half = 2 ** (bits - 1)
    assert torch.equal(wq.zero_point.reshape(-1), torch.full((6,), float(half)))
    absmax = w.abs().double().reshape(6, -1).amax(1)
    scale = wq.scale.reshape(-1).double()
    if method == "minmax":
        torch.testing.assert_close(scale, absmax / (half - 1), rtol=1e-6, atol=0)
    else:
        assert (scale <= absmax / (half - 1) * (1 + 1e-6)).all()
    codes = wq.codes(w)
    assert codes.min() >= -half and codes.max() <= half - 1 and codes.min() < 0 < codes.max()
    q = np.clip(np.round(w.double().numpy() / scale.numpy().reshape(-1, 1, 1, 1)), -half, half - 1)
    np.testing.assert_array_equal(codes.numpy(), q)
    assert torch.equal(wq(w), codes * wq.scale)
    asym = WeightQuantizer(bits, w, method=method)
    assert not torch.equal(asym.zero_point, wq.zero_point)  # the default grid is the asymmetric one


def test_lp_search_beats_minmax_on_heavy_tails():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=g), torch.tensor([40.0, -35.0])])
    for bits in (4, 6):
        s0, z0 = scale_zero_point(x.min(), x.max(), bits)
        lo, hi = lp_search_range(x, bits)
        s1, z1 = scale_zero_point(lo, hi, bits)
        err0 = (fake_quantize(x, s0, z0, bits) - x).abs().pow(2.4).mean()
        err1 = (fake_quantize(x, s1, z1, bits) - x).abs().pow(2.4).mean()
        assert err1 < err0 * 0.8
        assert hi < x.max()


def test_straight_through_gradient():
    x = torch.randn(50, requires_grad=True)
    s, z = scale_zero_point(torch.tensor(-3.0), torch.tensor(3.0), 8)
    fake_quantize(x, s, z, 8).sum().backward()
    inside = (x.abs() < 2.9).float()
    assert torch.allclose(x.grad * inside, inside)


def test_the_lp_sample_represents_every_observed_call_equally():
    """After 100 calls, the kept sample holds about 1% from each call and no repeated position (mutation
    caught: the earlier keep-a-random-quarter compaction with a generator reseeded from the sample count
    kept 96% from the last 8 calls and drew the same positions again and again)."""
    bank = ActQuantBank([8], n_slots=1, samples=1000)
    bank.observing = True
    for c in range(100):
        bank(torch.arange(5000, dtype=torch.float32) + 10_000 * c, 0, 0)  # call c: values 10000c + position
    sample = bank._obs[0]["sample"][0]
    calls, positions = (sample // 10_000).long(), (sample % 10_000).long()
    share_last_8 = float((calls >= 92).float().mean())
    assert len(sample) == 1000 and share_last_8 < 0.16, share_last_8  # uniform: 8%
    assert torch.bincount(calls, minlength=100).max() <= 25  # no call dominates (uniform: ~10 each)
    assert len(torch.unique(sample)) >= 900 and len(torch.unique(positions)) >= 900


@pytest.mark.parametrize("rounding", ["nearest", "adaround"])
def test_split_weight_halves_get_their_own_ranges(rounding):
    """A layer reading cat([h, skip]) quantizes the two weight halves on their own per-channel grids (as
    Q-Diffusion's split QuantModule does), so a small-valued half is not crushed by a large one (mutation
    caught: one grid over the whole weight, as before, makes the small half's error ~100x larger)."""
    from pipeline.quant.quantizer import WeightQuantizer

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 12, 1, 1, generator=g)
    w[:, 5:] *= 100.0  # the skip half's weights are 100x the head's
    split = WeightQuantizer(4, w, rounding=rounding, split=5)
    whole = WeightQuantizer(4, w, rounding=rounding)
    head, skip = w[:, :5].contiguous(), w[:, 5:].contiguous()
    assert torch.equal(split(w)[:, :5], WeightQuantizer(4, head, rounding=rounding)(head))  # each half = its own
    assert torch.equal(split(w)[:, 5:], WeightQuantizer(4, skip, rounding=rounding)(skip))
    err_split = (split(w) - w)[:, :5].pow(2).mean()
    err_whole = (whole(w) - w)[:, :5].pow(2).mean()
    assert err_whole > 100 * err_split
    if rounding == "adaround":  # the learned mask spans both halves, on each half's grid
        alpha = split.start_learning_rounding(w)
        assert alpha.shape == w.shape
        split.finish_learning_rounding()
        assert torch.equal(split(w)[:, 5:], WeightQuantizer(4, skip, rounding=rounding)(skip))



def test_cached_weights_follow_new_decisions_even_at_a_reused_address():
    """A frozen layer caches its fake-quantized weight until the weight or its quantizer changes. New AdaRound
    decisions are a new tensor, which the allocator may place where freed ones were (in CI it did: fit_rounding's
    end was handed the start's cached weight). Here the new tensor is made over the very same memory, with the
    same version, so only the tensor itself tells them apart."""
    from torch import nn

    from pipeline.quant import QuantConfig
    from pipeline.quant.layers import QuantContext, QuantLayer

    torch.manual_seed(0)
    layer = QuantLayer(nn.Linear(16, 8), QuantConfig(w_bits=4, a_bits=32, weight_rounding="adaround"), QuantContext())
    wq = layer.w_quant
    memory = np.zeros(wq.round_up.shape, dtype=bool)
    rng = np.random.default_rng(1)
    for _ in range(3):
        memory[...] = rng.random(memory.shape) < 0.5
        wq.round_up = torch.from_numpy(memory)  # the same address and version 0 each time
        with torch.no_grad():
            assert torch.equal(layer.quantized_weight(), wq(layer.weight))
    with torch.no_grad():  # an in-place change and a swapped weight are seen too
        wq.round_up.logical_not_()
        assert torch.equal(layer.quantized_weight(), wq(layer.weight))
        layer.weight.data = layer.weight.data * 2
        assert torch.equal(layer.quantized_weight(), wq(layer.weight))


def test_cached_activation_grids_follow_new_scales_even_at_a_reused_address():
    bank = ActQuantBank([4], n_slots=1)
    memory = np.zeros(tuple(bank.scale.shape), dtype=np.float32)
    for scale in [0.5, 0.25, 2.0]:
        memory[...] = scale
        bank.scale = torch.nn.Parameter(torch.from_numpy(memory))  # the same address and version 0 each time
        assert bank._inference_params()[0][0][0] == scale
