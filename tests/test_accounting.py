"""BitOPs / FAB accounting against PCR Table 1 and hand computations."""
import pytest
from torch import nn

from pipeline.metrics.cost import bitops, fab, layer_stats, model_size_bytes
from pipeline.models import meta_unet, tiny_pipeline
from pipeline.quant import QuantConfig, get_bit_policy, quant_layers, quantize_unet, set_bit_policy


@pytest.fixture(scope="module")
def sd14_stats():
    return layer_stats(meta_unet("sd-v1-4"), batch=2, resolution=512)


@pytest.mark.parametrize("w,a,paper", [(32, 32, 693.0), (8, 8, 43.31), (4, 8, 21.66)])
def test_pcr_table1_sd14(sd14_stats, w, a, paper):
    got = bitops(sd14_stats, w, a) / 1e12
    assert abs(got - paper) / paper < 0.005, got


def test_macs_match_hand_formula():
    unet = tiny_pipeline(0).unet
    stats = layer_stats(unet, batch=2, resolution=128)  # 16x16 latents
    # conv_in: 4 -> 32, 3x3, output 2x32x16x16
    assert stats["conv_in"].macs == 2 * 32 * 16 * 16 * 4 * 9
    assert stats["conv_in"].in_numel == 2 * 4 * 16 * 16
    lin = unet.time_embedding.linear_1
    assert stats["time_embedding.linear_1"].macs == 2 * lin.in_features * lin.out_features
    assert len(stats) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in unet.modules())


def test_fab_weighting_and_policy():
    unet = tiny_pipeline(0).unet
    stats = layer_stats(unet)
    quantize_unet(unet, QuantConfig(w_bits=4, a_bits=16, a_bit_options=[8, 16], n_steps=4))
    names = list(quant_layers(unet))
    assert fab(stats, get_bit_policy(unet), names) == {"fab": 16.0, "fab_unweighted": 16.0}
    # conv_in at 8 bits for half the steps: weighted by its input size
    set_bit_policy(unet, {"conv_in": [8, 8, 16, 16]})
    f = fab(stats, get_bit_policy(unet), names)
    total = sum(stats[n].in_numel for n in names)
    want = 16 - 4 * stats["conv_in"].in_numel / total
    assert abs(f["fab"] - want) < 1e-9
    assert abs(f["fab_unweighted"] - (16 - 4 / len(names))) < 1e-9


def test_size_shrinks_with_weight_bits():
    fp = model_size_bytes(tiny_pipeline(0).unet)
    q = tiny_pipeline(0).unet
    quantize_unet(q, QuantConfig(w_bits=4, a_bits=8))
    n_w = sum(m.weight.numel() for m in quant_layers(q).values())
    assert model_size_bytes(q) < fp
    assert fp - model_size_bytes(q) == pytest.approx(n_w * (4 - 0.5), rel=0.02)
