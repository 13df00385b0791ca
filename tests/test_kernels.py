"""The fused quantize pass (pipeline/quant/kernels.py) against the eager one it replaces: the same values, bit for
bit, on every bf16 value and on fp32 ties, clamps and non-finite inputs; the fallbacks where it does not apply."""
import warnings

import pytest
import torch

from pipeline.deploy.codes import uint8_codes
from pipeline.quant import ActQuantBank, kernels

pytestmark = pytest.mark.skipif(kernels.unavailable() is not None, reason=f"fused kernel: {kernels.unavailable()}")

# (scale, zero point, bits): a tie-exact scale, irregular ones, and zero points at both ends of the 8-bit range
GRIDS = [(0.25, 128, 8), (0.0371, 131, 8), (3.7e-3, 0, 8), (1.9, 255, 8), (0.113, 8, 4), (5e-4, 0, 4)]


def eager_fake(x, s, lo, hi):
    """ActQuantBank's eager pass (`codes` then * s), written out: fp32 division, round half to even, clamp."""
    q = torch.div(x, torch.tensor([s], dtype=torch.float32)) if x.dtype == torch.bfloat16 else torch.div(x, s)
    return q.round_().clamp_(lo, hi).mul_(s).to(x.dtype)


def eager_codes(x, s, lo, hi):
    q = torch.div(x, torch.tensor([s], dtype=torch.float32)) if x.dtype == torch.bfloat16 else torch.div(x, s)
    return q.round_().clamp_(lo, hi).add_(-lo).to(torch.uint8)


def same_bits(a, b):
    """Equal values, NaN where NaN (a NaN's payload aside); -0.0 and 0.0 count as equal, as in the models."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan])


def every_bf16() -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def fp32_cases(s: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    k = torch.arange(-400, 400, dtype=torch.float32)
    ties = (k + 0.5) * s  # exact halves of the grid (where s allows) and their float neighbours
    return torch.cat([torch.randn(200_000, generator=g) * 300 * s, ties, torch.nextafter(ties, ties + 1),
                      torch.nextafter(ties, ties - 1), k * s,
                      torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3e38, -3e38, float("inf"), float("-inf"), float("nan")])])


@pytest.mark.parametrize("s,z,bits", GRIDS)
def test_every_bf16_value(s, z, bits):
    x = every_bf16()
    lo, hi = float(-z), float(2**bits - 1 - z)
    assert same_bits(kernels.fake_quantize(x, s, lo, hi), eager_fake(x, s, lo, hi))
    finite = x[torch.isfinite(x)]
    assert torch.equal(kernels.uint8_codes(finite, s, lo, hi), eager_codes(finite, s, lo, hi))


@pytest.mark.parametrize("s,z,bits", GRIDS)
def test_fp32_ties_clamps_and_non_finite(s, z, bits):
    x = fp32_cases(s)
    lo, hi = float(-z), float(2**bits - 1 - z)
    assert same_bits(kernels.fake_quantize(x, s, lo, hi), eager_fake(x, s, lo, hi))
    finite = x[~torch.isnan(x)]
    codes = kernels.uint8_codes(finite, s, lo, hi)
    assert torch.equal(codes, eager_codes(finite, s, lo, hi))
    assert codes.min() == 0 and codes.max() == 2**bits - 1  # both clamps are exercised


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layouts_and_in_place(dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 64, 9, 7, generator=g) * 3).to(dtype)
    s, lo, hi = 0.0371, -131.0, 124.0
    # any dense layout, laid out as the input (a permuted 3-D view too); a strided view's fake quant is left to the
    # eager pass, its codes come from its dense copy (a channel slice of a split layer's channels-last input)
    assert kernels.fake_quantize(x[:, :, 0], s, lo, hi) is None
    for t in (x[:, 8:40], x.to(memory_format=torch.channels_last)[:, 8:40], x[:, :, ::2]):
        assert torch.equal(kernels.uint8_codes(t, s, lo, hi), eager_codes(t, s, lo, hi))
    assert kernels.uint8_codes(x.to(memory_format=torch.channels_last)[:, 8:40], s, lo, hi).is_contiguous(
        memory_format=torch.channels_last)
    for t in (x, x.to(memory_format=torch.channels_last), x.reshape(2, 64, 63).transpose(1, 2)):
        out = kernels.fake_quantize(t, s, lo, hi)
        assert out.stride() == t.stride() and same_bits(out, eager_fake(t, s, lo, hi))
        assert torch.equal(kernels.uint8_codes(t, s, lo, hi), eager_codes(t, s, lo, hi))
    y = x.clone()
    assert kernels.fake_quantize(y, s, lo, hi, inplace=True).data_ptr() == y.data_ptr()
    assert same_bits(y, eager_fake(x, s, lo, hi))


def test_what_it_leaves_to_the_eager_pass():
    x = torch.randn(4, 6)
    for t in (x.half(), x.double(), x.requires_grad_()):
        assert kernels.fake_quantize(t, 0.1, -8.0, 7.0) is None and kernels.uint8_codes(t, 0.1, -8.0, 7.0) is None
    with torch.no_grad():  # outside autograd a leaf that requires grad is plain data
        assert kernels.fake_quantize(x, 0.1, -8.0, 7.0) is not None


def test_the_bank_and_deploy_give_the_same_values_with_and_without_it(monkeypatch):
    """ActQuantBank's inference pass and deploy's uint8 codes, fused against eager, on a calibrated bank, including
    a strided view (which the fused pass hands back to the eager one)."""
    bank = ActQuantBank([4, 8], n_slots=2)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 8, 8, generator=g) * 2 + 0.5
    bank.observing = True
    bank(x, 0, 0), bank(x * 0.5, 0, 1)
    bank.observing = False
    bank.finalize("minmax")
    inputs = [x, x.bfloat16(), x.to(memory_format=torch.channels_last), x[:, 3:11]]
    calls = [(k, slot) for k in (0, 1) for slot in (0, 1)]
    with torch.no_grad():
        fused = [(bank(t, k, s), uint8_codes(bank, t, k, s)) for t in inputs for k, s in calls]
        monkeypatch.setenv("QLIP_FUSED_KERNELS", "0")
        eager = [(bank(t, k, s), uint8_codes(bank, t, k, s)) for t in inputs for k, s in calls]
    for (a, ca), (b, cb) in zip(fused, eager):
        assert a.dtype == b.dtype and torch.equal(a, b) and torch.equal(ca, cb)


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension as ext

    def broken(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(ext, "load_inline", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels._built.__wrapped__() is None
    assert len(caught) == 1 and "Ninja is required" in str(caught[0].message)
    assert "pip install ninja" in str(caught[0].message)
    monkeypatch.setenv("QLIP_FUSED_KERNELS", "0")  # read per call: a benchmark times both in one process
    assert kernels.fake_quantize(torch.ones(3), 0.1, -8.0, 7.0) is None
    assert "QLIP_FUSED_KERNELS=0" in kernels.unavailable()
