"""quantize_unet on the real published architectures (meta device) and the tiny UNet."""
import pytest
import torch
from torch import nn

from pipeline.models import meta_unet, unet_example_inputs
from pipeline.quant import (
    QuantAttnProcessor,
    QuantConfig,
    QuantLayer,
    act_banks,
    get_bit_policy,
    observing,
    quant_layers,
    quantize_unet,
    set_bit_policy,
    set_step,
    skip_concat_splits,
)


@pytest.mark.parametrize("name", ["sd-v1-4", "bk-sdm-tiny", "sdxl-base"])
def test_wraps_every_layer_of_published_unets(name):
    from diffusers.models.attention_processor import Attention

    unet = meta_unet(name)
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in unet.modules())
    n_attn = sum(isinstance(m, Attention) for m in unet.modules())
    ids = {id(m.weight) for m in unet.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    quantize_unet(unet, QuantConfig(w_bits=4, a_bits=8))
    layers = quant_layers(unet)
    assert len(layers) == n_layers  # none missed
    assert sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in unet.modules()) == 0
    assert not any(isinstance(c, QuantLayer) for m in layers.values() for c in m.children())  # none double-wrapped
    assert {id(m.weight) for m in layers.values()} == ids  # same parameters, each wrapped once
    procs = [m.processor for m in unet.modules() if isinstance(m, Attention)]
    assert len(procs) == n_attn > 0 and all(isinstance(p, QuantAttnProcessor) for p in procs)
    # the up path's skip-concatenation shortcuts get split quantizers at the right channel
    splits = skip_concat_splits(unet)
    assert splits and all(layers[n].act_skip is not None for n in splits)
    for n, s in splits.items():
        assert 0 < s < layers[n].in_features
    # and the wrapped model still runs (shapes only, on meta)
    args, kwargs = unet_example_inputs(unet, batch=1, resolution=256 if name != "sdxl-base" else 256)
    with torch.no_grad():
        out = unet(*args, **kwargs).sample
    assert out.shape == args[0].shape


def test_split_points_match_the_concatenation(tiny_pipe):
    """Record the channels of hidden_states entering each up block and each
    resnet, and compare with the static split points."""
    unet = tiny_pipe.unet
    seen, hidden = {}, {}

    def record(store, key):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            store.setdefault(key, x.shape[1])
        return hook

    for i, block in enumerate(unet.up_blocks):
        block.register_forward_pre_hook(record(hidden, i), with_kwargs=True)
        for j, r in enumerate(block.resnets):
            r.register_forward_pre_hook(record(seen, f"up_blocks.{i}.resnets.{j}.conv_shortcut"), with_kwargs=True)
    with torch.no_grad():
        unet(torch.randn(1, 4, 16, 16), 10, torch.randn(1, 77, 64))
    splits = skip_concat_splits(unet)
    assert splits
    for k, s in splits.items():
        i, j = int(k.split(".")[1]), int(k.split(".")[3])
        if j == 0:
            assert s == hidden[i]
        assert 0 < s < seen[k]


def _calibrated(pipe, w_bits, a_bits, seed=0, **cfg):
    unet = pipe.unet
    g = torch.Generator().manual_seed(seed)
    quantize_unet(unet, QuantConfig(w_bits=w_bits, a_bits=a_bits, **cfg))
    with observing(unet), torch.no_grad():
        for _ in range(4):
            unet(torch.randn(4, 4, 16, 16, generator=g), torch.tensor([500] * 4), torch.randn(4, 77, 64, generator=g))
    for b in act_banks(unet).values():
        b.finalize()
    return unet


def _rel_err(unet, ref_in, ref_out):
    with torch.no_grad():
        out = unet(*ref_in).sample
    return float((out - ref_out).norm() / ref_out.norm())


@pytest.fixture(scope="module")
def fp_reference():
    from pipeline.models import tiny_pipeline

    g = torch.Generator().manual_seed(123)
    ins = (torch.randn(4, 4, 16, 16, generator=g), torch.tensor([500] * 4), torch.randn(4, 77, 64, generator=g))
    with torch.no_grad():
        out = tiny_pipeline(0).unet(*ins).sample
    return ins, out


def test_error_grows_as_bits_drop(fp_reference):
    from pipeline.models import tiny_pipeline

    ins, ref = fp_reference
    w_err = [_rel_err(_calibrated(tiny_pipeline(0), w, 16), ins, ref) for w in (16, 8, 6, 4, 3)]
    a_err = [_rel_err(_calibrated(tiny_pipeline(0), 16, a), ins, ref) for a in (16, 8, 6, 4)]
    assert all(x < y for x, y in zip(w_err, w_err[1:])), w_err
    assert all(x < y for x, y in zip(a_err, a_err[1:])), a_err
    assert w_err[0] < 1e-2 and a_err[0] < 1e-2  # clipping of inputs outside the calibrated range only
    w8a8 = _rel_err(_calibrated(tiny_pipeline(0), 8, 8), ins, ref)
    assert w8a8 < 0.04, w8a8  # ~3.5%: the per-tensor noise floor, see the next test


def test_w8a8_error_is_the_per_layer_noise_floor_and_mixed_a16_gets_under_2_percent(fp_reference):
    """W8A8 with every activation per-tensor at 8 bits sits at ~3.4% on this UNet, and that is the sum of
    independent rounding noise: the root-sum-square of what each layer's 8-bit quantizer adds alone predicts it.
    Keeping the most sensitive layers' activations at 16 bits (ranked on calibration inputs) reaches < 2% on
    held-out inputs at a modest FAB."""
    from pipeline.metrics.cost import fab, layer_stats
    from pipeline.models import tiny_pipeline
    from pipeline.quant import activation_sensitivity, layers_to_keep_high

    held, ref_held = fp_reference
    g = torch.Generator().manual_seed(7)
    cal = (torch.randn(4, 4, 16, 16, generator=g), torch.tensor([500] * 4), torch.randn(4, 77, 64, generator=g))
    with torch.no_grad():
        ref_cal = tiny_pipeline(0).unet(*cal).sample
    unet = _calibrated(tiny_pipeline(0), 8, 8, a_bit_options=[8, 16])
    assert _rel_err(unet, held, ref_held) < 0.04

    def cal_error():
        return _rel_err(unet, cal, ref_cal)

    all8 = cal_error()
    set_bit_policy(unet, 16)
    floor = cal_error()  # weights at 8 bits only
    sens = activation_sensitivity(unet, cal_error, low=8, high=16)
    assert (get_bit_policy(unet) == 16).all()  # the policy in force is restored
    added = {n: max(e * e - floor * floor, 0.0) for n, e in sens.items()}
    rss = (floor ** 2 + sum(added.values())) ** 0.5
    assert abs(all8 - rss) / rss < 0.1, (all8, rss)  # independent noise: no interaction between quantizers
    assert max(added.values()) < 0.25 * sum(added.values())  # no single broken layer: the floor is spread out

    high = layers_to_keep_high(sens, floor, 0.018)
    ranked = sorted(added, key=added.get, reverse=True)
    assert high == ranked[:len(high)] and floor ** 2 + sum(added[n] for n in ranked[len(high):]) < 0.018 ** 2
    assert floor ** 2 + sum(added[n] for n in ranked[len(high) - 1:]) >= 0.018 ** 2  # the fewest
    set_bit_policy(unet, 8)
    set_bit_policy(unet, {n: 16 for n in high})
    mixed = _rel_err(unet, held, ref_held)
    cost = fab(layer_stats(unet), get_bit_policy(unet), list(sens))["fab"]
    assert mixed < 0.02, (len(high), mixed)
    assert len(high) <= 0.3 * len(ranked) and cost < 11.5, (len(high), cost)


def test_bit_policy_changes_exactly_what_it_names(tiny_pipe):
    unet = tiny_pipe.unet
    quantize_unet(unet, QuantConfig(w_bits=8, a_bits=8, a_bit_options=[8, 16, 32], n_steps=5))
    names = list(quant_layers(unet))
    before = get_bit_policy(unet).clone()
    assert before.shape == (len(names), 5) and (before == 8).all()
    set_bit_policy(unet, {names[3]: [8, 16, 32, 16, 8], names[7]: 32})
    after = get_bit_policy(unet)
    changed = (after != before).nonzero().tolist()
    assert changed == [[3, 1], [3, 2], [3, 3], [7, 0], [7, 1], [7, 2], [7, 3], [7, 4]]
    # the layer really runs the chosen quantizer at each step
    layer = quant_layers(unet)[names[3]]
    for step, bits in enumerate([8, 16, 32, 16, 8]):
        set_step(unet, step)
        assert layer.act_bits() == bits
    table = torch.full((len(names), 5), 16)
    set_bit_policy(unet, table)
    assert (get_bit_policy(unet) == 16).all()


def test_bit_choice_reaches_the_forward(tiny_pipe, fp_reference):
    unet = _calibrated(tiny_pipe, 32, 8, a_bit_options=[4, 8, 32], softmax_bits=32)
    ins, ref = fp_reference
    errs = {}
    for b in (4, 8, 32):
        set_bit_policy(unet, b)
        errs[b] = _rel_err(unet, ins, ref)
    assert errs[32] < 1e-6 < errs[8] < errs[4]


def test_fused_and_explicit_attention_agree(fp_reference):
    """Softmax at 32 bits runs the fused kernel, at 16 the explicit matrix: the same attention up to
    16-bit rounding of the probabilities, and both beside diffusers' own FP processor."""
    from pipeline.models import tiny_pipeline
    from pipeline.quant.attention import QuantAttnProcessor

    ins, ref = fp_reference
    errs = {}
    for sm in (32, 16):
        unet = _calibrated(tiny_pipeline(0), 32, 32, softmax_bits=sm)
        procs = [m for m in unet.modules() if isinstance(m, QuantAttnProcessor)]
        assert procs and all(p.softmax_quantized() == (sm < 32) for p in procs)
        errs[sm] = _rel_err(unet, ins, ref)
    assert errs[32] < 1e-6 and 0 < errs[16] < 1e-3, errs


def test_chunked_gridded_attention_matches_the_whole_matrix(fp_reference, monkeypatch):
    """At inference the 16-bit-softmax attention is built a block of query rows at a time: a W8A8 UNet's output
    matches building the whole matrix (to BLAS's last-bit rounding, which 8-bit grids can amplify into a rare
    flipped code)."""
    from pipeline.models import tiny_pipeline
    from pipeline.quant import attention

    ins, _ = fp_reference
    unet = _calibrated(tiny_pipeline(0), 8, 8, softmax_bits=16)
    outs = {}
    for elements in (1 << 30, 300):  # whole; 4 query rows per block (tiny-random: 64 tokens)
        monkeypatch.setattr(attention, "CHUNK_ELEMENTS", elements)
        with torch.no_grad():
            outs[elements] = unet(*ins).sample
    rel = float((outs[300] - outs[1 << 30]).norm() / outs[1 << 30].norm())
    assert rel < 1e-4, rel


def test_bad_policies_and_options_are_refused(tiny_pipe):
    unet = tiny_pipe.unet
    with pytest.raises(ValueError, match="a_bits=7 is not one of"):
        QuantConfig(a_bits=7, a_bit_options=[8, 16])
    with pytest.raises(ValueError, match="w_bits=1"):
        QuantConfig(w_bits=1)
    with pytest.raises(ValueError, match="a_bit_options entry=64"):
        QuantConfig(a_bit_options=[8, 64])
    with pytest.raises(TypeError, match="GroupNorm"):
        quantize_unet(unet, QuantConfig(), only=["conv_norm_out"])
    quantize_unet(unet, QuantConfig(a_bits=8, a_bit_options=[8, 16], n_steps=4))
    with pytest.raises(ValueError, match=r"does not fit: expected \[\d+ layers, 4 steps\]"):
        set_bit_policy(unet, torch.full((3, 4), 8))
    with pytest.raises(ValueError, match="32 bits is not a calibrated option"):
        set_bit_policy(unet, 32)
    table = torch.full((len(quant_layers(unet)), 4), 16)
    table[2, 3] = 12
    with pytest.raises(ValueError, match=f"{list(quant_layers(unet))[2]}: 12 bits is not a calibrated option"):
        set_bit_policy(unet, table)
    with pytest.raises(ValueError, match="needs 4 entries"):
        set_bit_policy(unet, {"conv_in": [8, 16]})
    with pytest.raises(ValueError, match="not quantized"):
        set_bit_policy(unet, {"nope": 8})


def test_time_aware_banks_use_the_step(tiny_pipe):
    unet = tiny_pipe.unet
    quantize_unet(unet, QuantConfig(w_bits=8, a_bits=8, n_steps=3, time_aware=True))
    layer = quant_layers(unet)["conv_in"]
    assert layer.act.scale.shape == (1, 3)
    with observing(unet), torch.no_grad():
        for step, amp in enumerate((1.0, 4.0, 16.0)):
            set_step(unet, step)
            unet(torch.randn(2, 4, 16, 16) * amp, 100, torch.randn(2, 77, 64))
    for b in act_banks(unet).values():
        b.finalize()
    s = layer.act.scale[0].detach()
    assert s[0] < s[1] < s[2]  # each step calibrated on its own data


def test_bos_aware_keeps_bos_kv_in_full_precision(tiny_pipe):
    from diffusers.models.attention_processor import Attention

    enc = torch.randn(2, 77, 64)
    enc[:, 0] *= 50  # the BOS outlier
    keys = {}
    for bos_aware in (False, True):
        from pipeline.models import tiny_pipeline
        u = tiny_pipeline(0).unet
        quantize_unet(u, QuantConfig(w_bits=8, a_bits=4, bos_aware=bos_aware))
        a = next(m for n, m in u.named_modules() if isinstance(m, Attention) and n.endswith("attn2"))
        cap = {}

        def record(module, inputs, output):
            cap.setdefault("k_in", inputs[0].shape[1])

        a.to_k.register_forward_hook(record)
        with observing(u), torch.no_grad():
            u(torch.randn(2, 4, 16, 16), 10, enc)
        for b in act_banks(u).values():
            b.finalize()
        keys[bos_aware] = (cap["k_in"], a.to_k.act.scale.detach().clone())
        # the K/V the attention uses, quantized: BOS's row is the full-precision projection (mutation caught:
        # quantizing BOS's K or V, or giving it quantized weights, changes that row), the rest is not
        proc = a.processor
        with torch.no_grad():
            for proj, bank in ((a.to_k, proc.k), (a.to_v, proc.v)):
                got = proc._project_kv(a, proj, bank, enc, cross=True)
                fp = torch.nn.functional.linear(enc, proj.weight, proj.bias)
                assert torch.allclose(got[:, 0], fp[:, 0], rtol=1e-5, atol=1e-5) == bos_aware
                assert not torch.allclose(got[:, 1:], fp[:, 1:])
    assert keys[False][0] == 77 and keys[True][0] == 76  # the quantized path no longer sees BOS
    assert keys[True][1].max() < keys[False][1].max() / 5  # so its input range is not blown up by the outlier


def test_bit_mixture_is_the_per_sample_policy_with_gradients(tiny_pipe, fp_reference):
    """One-hot mixture weights reproduce, sample by sample, the hard policy they
    name (q/k/v follow their projection), and every option gets a gradient."""
    from pipeline.quant import bit_mixture

    unet = _calibrated(tiny_pipe, 8, 8, a_bit_options=[4, 8, 32])
    for p in unet.parameters():
        p.requires_grad_(False)
    (x, t, emb), _ = fp_reference
    x, t, emb = x[:2], t[:2], emb[:2]
    L = len(quant_layers(unet))
    w = torch.zeros(L, 2, 2)
    w[:, 0, 0] = 1  # sample 0 at 4 bits, sample 1 at 32 (options [4, 32] of the bank [4, 8, 32])
    w[:, 1, 1] = 1
    w.requires_grad_(True)
    with bit_mixture(unet, w, [4, 32]):
        mixed = unet(x, t, emb).sample
    assert all(layer.mixture is None for layer in quant_layers(unet).values())  # cleared on exit
    with torch.no_grad():
        for i, bits in enumerate((4, 32)):
            set_bit_policy(unet, bits)
            alone = unet(x[i:i + 1], t[i:i + 1], emb[i:i + 1]).sample
            assert torch.allclose(mixed[i:i + 1], alone, atol=1e-5), bits
    mixed.pow(2).mean().backward()
    assert w.grad[:, :, 0].abs().sum() > 0 and w.grad[:, :, 1].abs().sum() > 0
    with pytest.raises(ValueError, match="no calibrated quantizer"):
        with bit_mixture(unet, w, [4, 16]):
            pass
    with pytest.raises(ValueError, match="samples was set"), bit_mixture(unet, w.detach(), [4, 32]):
        unet(x[:1], t[:1], emb[:1])
