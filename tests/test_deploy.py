"""Real low-bit inference (pipeline/deploy): the export is bit-exact, the int8 kernels' integer accumulators match
the reference backend's, the zero-point guard holds, and a whole deployed UNet agrees with the fake-quant one."""
import copy
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from pipeline.deploy import (
    attach,
    check_backend,
    check_weight_zero_point,
    export_unet,
    load_unet,
    make_backend,
    pack_layer,
    pack_nibbles,
    to_real,
    unpack_nibbles,
)
from pipeline.deploy.backends import GPUBackend, gpu_missing, onednn_bf16_missing, onednn_missing, onednn_prepack
from pipeline.deploy.codes import uint8_codes
from pipeline.deploy.layer import RealQuantLayer
from pipeline.deploy.qlip import load_qlip
from pipeline.deploy.timing import psnr_per_image
from pipeline.fit import main
from pipeline.models import EMBEDDED_DIR, load_pipeline, tiny_pipeline
from pipeline.qlip.pipeline import QLIPPipeline
from pipeline.qlip.q2b import Q2BModule, relative_link, save_q2b
from pipeline.qlip.t2q import T2QModule, load_text_tower, save_t2q
from pipeline.quant import (
    QuantAttnProcessor,
    QuantConfig,
    QuantContext,
    QuantLayer,
    act_banks,
    observing,
    quant_layers,
    quantize_unet,
    save_quantized,
    set_bit_policy,
)
from pipeline.sampling import generate

needs_onednn = pytest.mark.skipif(onednn_missing() is not None, reason=f"{onednn_missing()}")
needs_gpu = pytest.mark.skipif(gpu_missing() is not None, reason=f"--backend gpu: {gpu_missing()}")
needs_bf16 = pytest.mark.skipif(onednn_bf16_missing() is not None, reason=f"bf16 runtime: {onednn_bf16_missing()}")
STEPS = 2


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), 500, torch.randn(2, 16, 64, generator=g)


@pytest.fixture(scope="module")
def fp_unet():
    return load_pipeline("embedded").unet


def _calibrate(fp_unet, options):
    """The embedded world's UNet at W4, activation `options` (8 in force), calibrated on random inputs at every
    step slot."""
    unet = copy.deepcopy(fp_unet)
    quantize_unet(unet, QuantConfig(w_bits=4, a_bits=8, a_bit_options=options, n_steps=STEPS, time_aware=True))
    with observing(unet), torch.no_grad():
        for step in range(STEPS):
            unet.quant_context.step = step
            unet(*_inputs(step))
    for bank in act_banks(unet).values():
        bank.finalize("minmax")
    return unet


@pytest.fixture(scope="module")
def calibrated(fp_unet):
    return _calibrate(fp_unet, [4, 8, 16])


@pytest.fixture(scope="module")
def exported(calibrated, tmp_path_factory):
    folder = tmp_path_factory.mktemp("deploy") / "deploy"
    export_unet(copy.deepcopy(calibrated), folder)
    return folder


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


# -- packing ------------------------------------------------------------------
def test_nibbles_round_trip_odd_count():
    q = torch.randint(0, 16, (3, 5, 3))  # 45 values: the last byte carries one
    packed = pack_nibbles(q)
    assert packed.dtype == torch.uint8 and packed.numel() == 23
    assert torch.equal(unpack_nibbles(packed, q.shape), q.to(torch.uint8))
    assert int(packed[0]) == int(q.reshape(-1)[0]) | int(q.reshape(-1)[1]) << 4  # low nibble first


@pytest.mark.parametrize("w_bits,rounding", [(4, "nearest"), (8, "nearest"), (4, "adaround"), (8, "adaround")])
def test_export_is_bit_exact(fp_unet, w_bits, rounding):
    unet = copy.deepcopy(fp_unet)
    quantize_unet(unet, QuantConfig(w_bits=w_bits, a_bits=8, weight_rounding=rounding))
    layers = quant_layers(unet)
    g = torch.Generator().manual_seed(w_bits)
    for layer in layers.values():
        if rounding == "adaround":  # learned decisions: up where nearest would go down, and the other way
            layer.w_quant.round_up = torch.rand(layer.weight.shape, generator=g) < 0.5
    fake = {n: layer.quantized_weight().clone() for n, layer in layers.items()}
    kinds = {(m.kind, tuple(m.weight.shape[2:]), getattr(m, "conv_kwargs", {}).get("stride"), m.split > 0)
             for m in layers.values()}
    assert {("conv", (3, 3), (2, 2), False), ("conv", (1, 1), (1, 1), True), ("conv", (3, 3), (1, 1), False),
            ("linear", (), None, False)} <= kinds  # stride 2, 1x1, split halves, Linear all covered
    to_real(unet)  # in memory (the artifact's round trip: test_w4_artifact_loads_without_fp_weights)
    real = quant_layers(unet)
    assert list(real) == list(fake) and all(isinstance(m, RealQuantLayer) for m in real.values())
    for name, w in fake.items():
        assert torch.equal(real[name].dequantized_weight(), w), name
        stored = real[name].qweight0
        assert stored.dtype == (torch.uint8 if w_bits == 4 else torch.int8)
    split = real["up_blocks.0.resnets.0.conv_shortcut"]
    assert len(split.parts) == 2 and split.parts[0][:2] == (0, 128)  # each half its own grid


def test_export_of_per_layer_weight_bits_is_bit_exact(fp_unet, tmp_path):
    """A MixDQ state (weight options 2/4/8, one per layer): each layer exports the option in force, bit for bit,
    and the deployed UNet reports the same per-layer weight bits."""
    from pipeline.quant.policy import set_weight_bits

    unet = copy.deepcopy(fp_unet)
    quantize_unet(unet, QuantConfig(w_bits=4, w_bit_options=[2, 4, 8], a_bits=8))
    names = list(quant_layers(unet))
    policy = {n: (2, 4, 8)[i % 3] for i, n in enumerate(names)}
    set_weight_bits(unet, policy)
    fake = {n: m.quantized_weight().clone() for n, m in quant_layers(unet).items()}
    folder = tmp_path / "deploy"
    export_unet(unet, folder)
    real = quant_layers(load_unet(folder, "reference"))
    assert {n: m.w_bits for n, m in real.items()} == policy
    for name, w in fake.items():
        assert torch.equal(real[name].dequantized_weight(), w), name


def test_w4_artifact_loads_without_fp_weights(fp_unet, calibrated, exported):
    fp_bytes = sum(p.numel() * 4 for p in fp_unet.parameters())
    size = (exported / "unet.safetensors").stat().st_size
    # 4 bits is 0.125 of fp32; biases, norms, per-channel grids and the activation tables add the rest
    assert size / fp_bytes < 0.15, size / fp_bytes
    meta = json.loads((exported / "deploy.json").read_text())
    assert meta["format"] == "qlip-deploy/1"
    deployed = load_unet(exported, "reference")
    assert not any(t.is_meta for t in list(deployed.parameters()) + list(deployed.buffers()))
    for name, layer in quant_layers(deployed).items():
        assert torch.equal(layer.dequantized_weight(), quant_layers(calibrated)[name].quantized_weight()), name


# -- integer accumulators -----------------------------------------------------
def _integer_layer(module: nn.Module, w_bits: int, w_zero: torch.Tensor, x_zero: float, x_scale: float):
    """A QuantLayer with weight scale 1 (its codes are the weight's integers) and one activation quantizer."""
    layer = QuantLayer(module, QuantConfig(w_bits=w_bits, a_bits=8), QuantContext())
    wq = layer.w_quant
    wq.scale = torch.ones_like(wq.scale)
    wq.zero_point = w_zero.reshape(wq.zero_point.shape).float()
    layer.act.scale.data.fill_(x_scale)
    layer.act.zero_point.fill_(x_zero)
    return layer


def _unfold_accumulator(layer, codes_x, codes_w):
    """sum (q_x - z_x)(q_w - z_w) in int64, through unfold + matmul (not a convolution)."""
    if layer.kind == "linear":
        return codes_x.long() @ codes_w.long().T
    kw = layer.conv_kwargs
    cols = torch.nn.functional.unfold(codes_x.double(), codes_w.shape[2:], dilation=kw["dilation"],
                                      padding=kw["padding"], stride=kw["stride"]).long()
    out = codes_w.reshape(codes_w.shape[0], -1).long() @ cols
    h = (codes_x.shape[2] + 2 * kw["padding"][0] - codes_w.shape[2]) // kw["stride"][0] + 1
    return out.reshape(codes_x.shape[0], codes_w.shape[0], h, -1)


@needs_onednn
@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("x_zero", [0, 255, 97])
@pytest.mark.parametrize("module", ["conv3x3s2", "conv1x1", "linear"])
def test_accumulators_match_reference(w_bits, x_zero, module):
    torch.manual_seed(w_bits + x_zero)
    m = {"conv3x3s2": lambda: nn.Conv2d(24, 16, 3, stride=2, padding=1), "conv1x1": lambda: nn.Conv2d(24, 16, 1),
         "linear": lambda: nn.Linear(24, 16)}[module]()
    qmax = 2**w_bits - 1
    w_zero = torch.randint(0, qmax + 1, (16,)).float()
    w_zero[0], w_zero[1] = 0, qmax  # the grid's two ends
    with torch.no_grad():  # integers beyond the grid too: the quantizer clamps them
        m.weight.copy_(torch.randint(-qmax - 4, qmax + 5, m.weight.shape).float())
    layer = _integer_layer(m, w_bits, w_zero, x_zero, x_scale=0.5)
    shape = (2, 24, 9, 9) if module != "linear" else (2, 5, 24)
    # codes: ties x / s = n + 0.5 (half to even), and values far outside [0, 255] - z (clamped)
    x = (torch.randint(-400, 400, shape) + 0.5 * torch.randint(0, 2, shape)) * 0.5
    codes = layer.act.codes(x, 0, 0)
    ties = (x / 0.5) % 1 == 0.5
    assert torch.equal(codes[ties], torch.round(x[ties] / 0.5).clamp(-x_zero, 255 - x_zero))
    assert codes.min() == -x_zero and codes.max() == 255 - x_zero  # both clamps reached
    assert torch.equal(codes * 0.5, layer.act(x, 0, 0))  # the fake quantizer's own values
    real = RealQuantLayer(layer, pack_layer(layer))
    want = _unfold_accumulator(layer, codes, real.part(0).codes())
    for name in ("reference", "onednn"):
        backend = make_backend(name)
        backend.prepare(real)
        xq = (codes + x_zero).to(torch.uint8)
        acc = backend.part_call(real, 0, xq, 1.0, x_zero, None)  # unit scales: the accumulator itself
        assert torch.equal(acc.double(), want.double()), name


@needs_onednn
def test_weight_zero_point_guard():
    check_weight_zero_point(torch.zeros(4, dtype=torch.long), "conv")
    with pytest.raises(ValueError, match="zero point 3 in output channel 2 would be ignored"):
        check_weight_zero_point(torch.tensor([0, 0, 3, 0]), "conv")
    layer = RealQuantLayer(_integer_layer(nn.Linear(8, 4), 4, torch.zeros(4), 0, 1.0), [])
    with pytest.raises(ValueError, match="would be ignored by the oneDNN int8 kernel"):
        onednn_prepack(layer, torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), torch.tensor([0, 1, 0, 0]))
    # and the kernel would indeed ignore it: the same output with zero point 0 and 5
    layer8 = RealQuantLayer(_integer_layer(nn.Linear(8, 4), 8, torch.full((4,), 128.0), 0, 1.0), [])
    x = torch.randint(0, 255, (3, 8), dtype=torch.uint8)
    w = torch.randint(-100, 100, (4, 8), dtype=torch.int8)
    packed = onednn_prepack(layer8, w, torch.ones(4), torch.zeros(4, dtype=torch.long))
    outs = [torch.ops.onednn.qlinear_pointwise(x, 1.0, 0, packed, torch.ones(4), torch.full((4,), z), None, 1.0, 0,
                                               torch.float32, "none", [], "") for z in (0, 5)]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("x_zero", [0, 97, 255])
def test_gpu_backend_linear_matches_reference(w_bits, x_zero):
    """The GPU backend's int8 Linear (signed kernel input q_x - 128, the activation and 8-bit weight zero-point
    corrections), run eagerly: torchao's int_matmul falls back to an int32 matmul off CUDA, so the arithmetic is
    checked wherever torchao is installed; it equals the reference backend's exact result."""
    pytest.importorskip("torchao", reason="the GPU backend's kernel is torchao's int_matmul (pip install torchao)")
    torch.manual_seed(w_bits + x_zero)
    layer = QuantLayer(nn.Linear(24, 16), QuantConfig(w_bits=w_bits, a_bits=8), QuantContext())
    layer.act.scale.data.fill_(0.5)
    layer.act.zero_point.fill_(x_zero)
    real = RealQuantLayer(layer, pack_layer(layer))
    codes = layer.act.codes(torch.randn(2, 5, 24) * 40, 0, 0)
    outs = []
    for backend in (make_backend("reference"), GPUBackend(compile=False)):
        backend.prepare(real)
        outs.append(backend.part_call(real, 0, (codes + x_zero).to(torch.uint8), 0.5, x_zero, real.bias))
    assert outs[1].shape == (2, 5, 16) and torch.allclose(outs[0], outs[1], rtol=0, atol=1e-4)


@needs_gpu
def test_gpu_backend_unet_on_cuda(calibrated, exported):
    """On CUDA (torch.compile): Linear layers on the int8 kernel, convs weight-only; one UNet call per step
    against the reference backend on the CPU."""
    real = load_unet(exported, "gpu", device="cuda")
    ref = load_unet(exported, "reference")
    assert all(real_layer.backend.runs_integer(real_layer) == (real_layer.kind == "linear")
               for real_layer in quant_layers(real).values())
    with torch.no_grad():
        for step in range(STEPS):
            real.quant_context.step = ref.quant_context.step = step
            x, t, c = _inputs(20 + step)
            want = ref(x, t, c).sample
            got = real(x.cuda(), t, c.cuda()).sample.cpu()
            assert _rel(got, want) < 2e-2, step  # rounding flips only (docs/deploy.md)


# -- the whole UNet -----------------------------------------------------------
def _qlip_table(unet, options=(4, 8, 16)):
    g = torch.Generator().manual_seed(0)
    return torch.tensor(options)[torch.randint(0, len(options), (len(quant_layers(unet)), STEPS), generator=g)]


@needs_onednn
@pytest.mark.parametrize("policy", ["a8", "qlip"])
def test_whole_unet_every_layer_every_step(calibrated, exported, policy):
    """Every quantized layer of the deployed UNet, on the very input the fake-quant layer saw, at every step:
    relative error <= 1e-5 (uniform A8, and a per-(layer, step) table over 4/8/16 bits)."""
    fake = copy.deepcopy(calibrated)
    real = load_unet(exported, "onednn")
    if policy == "qlip":  # set at run time on both: the deployed UNet routes each (layer, step) call by it
        set_bit_policy(fake, _qlip_table(fake))
        set_bit_policy(real, _qlip_table(real))
    real_layers = quant_layers(real)
    seen, routes = [], {"integer": 0, "float": 0}
    worst = 0.0

    def check(name):
        def hook(layer, args, out):
            nonlocal worst
            r = real_layers[name]
            real.quant_context.step = fake.quant_context.step
            integer = r.bit_options[r.bit_index()] <= 8
            routes["integer" if integer else "float"] += 1
            with torch.no_grad():
                worst = max(worst, _rel(r(args[0].clone()), out))
            seen.append(name)
        return hook

    for name, layer in quant_layers(fake).items():
        layer.register_forward_hook(check(name))
    with torch.no_grad():
        for step in range(STEPS):
            fake.quant_context.step = step
            fake(*_inputs(10 + step))
    assert len(seen) == STEPS * len(real_layers)
    assert worst <= 1e-5, worst
    assert routes["integer"] > 0 and (routes["float"] > 0) == (policy == "qlip")


def test_dropped_fine_grids_run_the_float_kernel_on_the_raw_input(exported):
    """fine_grids="drop": a call routed to 16 bits runs the dequantized weight on the input as is (no 16-bit
    grid), while "keep" grids it like the fake-quant layer; 8-bit calls are untouched; a bad value is refused."""
    units = {mode: load_unet(exported, "reference", fine_grids=mode) for mode in ("keep", "drop")}
    for unet in units.values():
        set_bit_policy(unet, 16)
    name, keep = next((n, m) for n, m in quant_layers(units["keep"]).items() if m.kind == "linear" and m.quant_act)
    drop = quant_layers(units["drop"])[name]
    x = torch.randn(2, 5, keep.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = F.linear(x, drop.dequantized_weight(), drop.bias)
        assert torch.equal(drop(x.clone()), raw)
        assert not torch.equal(keep(x.clone()), raw)
        set_bit_policy(units["keep"], 8)
        set_bit_policy(units["drop"], 8)
        assert torch.equal(keep(x.clone()), drop(x.clone()))
    with pytest.raises(ValueError, match="fine_grids='fast'"):
        load_unet(exported, "reference", fine_grids="fast")


@needs_onednn
def test_sampled_images_real_vs_fake(calibrated, exported):
    """Sampling end to end: the deployed UNet's images against the fake-quant ones, per image."""
    pipe = load_pipeline("embedded")
    pipe.unet = copy.deepcopy(calibrated)
    prompts = ["a red circle", "a blue star"]
    fake = generate(pipe, prompts, steps=STEPS, progress=False)
    real = generate(attach(pipe, exported, "onednn"), prompts, steps=STEPS, progress=False)
    psnr = psnr_per_image(fake, real)
    assert psnr.min() >= 45, psnr
    # fine_grids="drop" leaves out the 16-bit softmax grid: every processor takes SDPA, and the images move
    # away from the fake-quant ones (flipped 8-bit codes) but stay close (docs/deploy.md)
    fused_pipe = attach(pipe, exported, "onednn", fine_grids="drop")
    procs = [p for p in fused_pipe.unet.attn_processors.values() if isinstance(p, QuantAttnProcessor)]
    assert procs and not any(p.softmax_quantized() for p in procs)
    fused = psnr_per_image(fake, generate(fused_pipe, prompts, steps=STEPS, progress=False))
    assert 25 <= fused.min() and fused.max() < 45, fused


@needs_onednn
def test_symmetric_w8_runs_without_the_zero_point_correction(fp_unet, tmp_path):
    """QuantConfig(weight_symmetric=True) W8: every layer's int8 weight is its codes q - 128 (zero point 0), no
    correction is prepared, and each layer agrees with its fake-quant twin (<= 1e-5) on the same input; the
    asymmetric W8 of the same UNet needs the correction. The flag is in the state's JSON only when set."""
    config = QuantConfig(w_bits=8, a_bits=8, weight_symmetric=True)
    assert config.to_dict()["weight_symmetric"] is True
    assert "weight_symmetric" not in QuantConfig(w_bits=8, a_bits=8).to_dict()
    assert QuantConfig.from_dict(QuantConfig(w_bits=8, a_bits=8).to_dict()).weight_symmetric is False
    corrected = {}
    for symmetric in (True, False):
        fake = quantize_unet(copy.deepcopy(fp_unet), QuantConfig(w_bits=8, a_bits=8, weight_symmetric=symmetric))
        with observing(fake), torch.no_grad():
            fake(*_inputs(0))
        for bank in act_banks(fake).values():
            bank.finalize("minmax")
        export_unet(copy.deepcopy(fake), tmp_path / str(symmetric))
        real = load_unet(tmp_path / str(symmetric), "onednn")
        layers = quant_layers(real)
        corrected[symmetric] = sum(k[3] is not None for m in layers.values() for k in m.kernels)
        if not symmetric:
            continue
        assert json.loads((tmp_path / "True" / "deploy.json").read_text())["quant_config"]["weight_symmetric"]
        errors = {}

        def check(name):
            def hook(layer, args, out):
                with torch.no_grad():
                    errors[name] = _rel(layers[name](args[0].clone()), out)
            return hook

        for name, layer in quant_layers(fake).items():
            layer.register_forward_hook(check(name))
        with torch.no_grad():
            fake(*_inputs(1))
        assert len(errors) == len(layers) and max(errors.values()) <= 1e-5, max(errors.values())
    assert corrected[True] == 0 and corrected[False] > 0, corrected


# -- the bf16 runtime -------------------------------------------------------------
@needs_bf16
def test_bf16_runtime_layers(exported):
    """load_unet(dtype="bf16"): the quantizers stay as exported (fp32 grids, the integer weights); a <= 8-bit call
    runs the int8 kernel on codes taken from the bf16 input cast up (not re-rounded in bf16) and writes bf16; a
    16-bit call is a bf16 GEMM on the raw input; the UNet takes and gives back fp32."""
    real32, real16 = load_unet(exported, "onednn"), load_unet(exported, "onednn", dtype="bf16")
    assert real16.dtype == torch.float32 and real16.conv_in.bias.dtype == torch.bfloat16
    for (name, a), b in zip(real32.named_buffers(), real16.buffers()):
        if name.rsplit(".", 1)[-1].startswith(("qweight", "w_zero", "w_scale", "scale", "zero_point")):
            assert b.dtype == a.dtype and torch.equal(a, b), name
    for a, b in zip(act_banks(real32).values(), act_banks(real16).values()):
        assert b.scale.dtype == torch.float32 and torch.equal(a.scale, b.scale)
    calls = []
    backend = next(m for m in real16.modules() if isinstance(m, RealQuantLayer)).backend
    part_call = backend.part_call
    backend.part_call = lambda *a: calls.append(a[-1]) or part_call(*a)
    g = torch.Generator().manual_seed(0)
    checked = 0
    for name, r16 in quant_layers(real16).items():
        if not (r16.quant_act and r16.parts and r16.kind == "conv" and not r16.split):
            continue
        r32 = quant_layers(real32)[name]
        x = (torch.randn(2, r16.in_features, 8, 8, generator=g) * 2).bfloat16()
        with torch.no_grad():
            calls.clear()
            y16 = r16(x.clone())
            assert calls == [torch.bfloat16] and y16.dtype == torch.bfloat16
            y32 = r32(x.float())  # the same codes: the fp32 runtime on the bf16 input's exact values
            torch.testing.assert_close(y16.float(), y32, rtol=2**-7, atol=2**-7 * float(y32.abs().max()))
            set_bit_policy(real16, 16)
            y = r16(x.clone())
            assert torch.equal(y, F.conv2d(x, r16.dequantized_weight().bfloat16(), r16.bias, **r16.conv_kwargs))
            # channels-last, as the int8 kernels write: a mixed policy keeps one layout (layer.py, float_call)
            assert y.is_contiguous(memory_format=torch.channels_last) and y16.is_contiguous(
                memory_format=torch.channels_last)
            assert r16.quantized_weight().is_contiguous(memory_format=torch.channels_last)
            set_bit_policy(real16, 8)
        checked += 1
    assert checked >= 3
    with torch.no_grad():
        out = real16(*_inputs(0)).sample
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_bf16_runtime_input_codes(exported):
    """The bf16 runtime's quantize pass (codes.py) gives exactly the fp32 path's codes of the same values (the bf16
    input cast up): the fake quantizer's rounding, not a bf16 one; in any layout (contiguous, channels-last, a split
    layer's channel slice, a Linear's 3-D input). The layer's output rounding to bf16 is coarser than a code (2^-9
    of the output), so the codes are checked here, not the outputs."""
    layer = next(m for m in quant_layers(load_unet(exported, "reference")).values() if m.quant_act and m.kind == "conv")
    bank, k = layer.act, layer.bit_options.index(8)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 32, 9, 9, generator=g) * 3).bfloat16()
    for view in (x, x.contiguous(memory_format=torch.channels_last), x[:, 5:21],
                 x.contiguous(memory_format=torch.channels_last)[:, 5:21], x.reshape(2, 81, 32)):
        q16, q32 = uint8_codes(bank, view, k, 1), uint8_codes(bank, view.float(), k, 1)
        assert q16.dtype == torch.uint8 and q16.shape == view.shape and torch.equal(q16, q32)
        assert q32.unique().numel() > 50  # values across the grid, not a clamped block


@needs_bf16
def test_bf16_runtime_samples_near_the_fake_quant_model(calibrated, exported):
    """Sampling end to end in the bf16 runtime: every <= 8-bit call on the int8 kernel, and images whose PSNR to
    the FP model's is within 4 dB of the fake-quant model's (measured: 2.5-3.0 dB lower, from bf16's 8
    significant bits moving activations across 8-bit code boundaries; the FP model in bf16 itself is 39-50 dB from
    fp32). Bad dtype options are refused, naming the fix."""
    prompts = ["a red circle", "a blue star"]
    pipe = load_pipeline("embedded")
    ref = generate(pipe, prompts, steps=STEPS, progress=False)
    pipe.unet = copy.deepcopy(calibrated)
    fake = psnr_per_image(ref, generate(pipe, prompts, steps=STEPS, progress=False))
    real = attach(pipe, exported, "onednn", dtype="bf16")
    routes = []
    for layer in quant_layers(real.unet).values():
        layer.register_forward_hook(lambda m, a, out: routes.append((a[0].dtype, out.dtype)))
    bf16 = psnr_per_image(ref, generate(real, prompts, steps=STEPS, progress=False))
    assert routes and set(routes) == {(torch.bfloat16, torch.bfloat16)}
    assert (bf16 >= fake - 4).all() and (bf16 < 100).all(), (bf16, fake)
    with pytest.raises(ValueError, match="fine_grids='drop'"):
        load_unet(exported, "onednn", fine_grids="keep", dtype="bf16")
    with pytest.raises(ValueError, match="dtype='fp16'"):
        load_unet(exported, "onednn", dtype="fp16")


def test_bf16_runtime_is_refused_where_the_int8_kernels_cannot_write_bf16(exported, monkeypatch):
    """On a CPU where oneDNN's int8 kernels do not write bf16 (onednn_bf16_missing probes it once), the bf16
    runtime is refused before anything loads, naming the reason and the fix; fp32 still loads."""
    import pipeline.deploy.artifact as artifact

    monkeypatch.setattr(artifact, "onednn_bf16_missing", lambda: "no bf16 on this CPU (probe)")
    with pytest.raises(ValueError, match=r"no bf16 on this CPU \(probe\); use dtype='fp32'"):
        load_unet(exported, "onednn", dtype="bf16")
    load_unet(exported, "reference", dtype="bf16")  # the reference backend needs no kernel
    load_unet(exported, "reference")


# -- text-aware generation from the artifact -----------------------------------
QLIP_PROMPTS = ["a red circle", "a large striped blue star on the left", "two small green squares",
                "a yellow triangle above a purple circle, photo"]


@pytest.fixture(scope="module")
def q2b_run(fp_unet, tmp_path_factory):
    """A run directory with a state calibrated for options 8/16/32 (QLIP's, as the demo uses), a T2Q (random
    head) and a Q2B whose gates split these prompts: per layer, some prompts on the low side {8, 16}, others on
    the high side {16, 32}. Returns it and the prompts in increasing predicted quality (batches of two then get
    different tables). With 4-bit options in the table, per-layer agreement holds (<= 1e-5) but the images drift
    to ~30 dB: a rounding flip at 4 bits is a 16x larger step (docs/deploy.md, whole-UNet agreement)."""
    run = tmp_path_factory.mktemp("qlip_run")
    calibrated = _calibrate(fp_unet, [8, 16, 32])
    save_quantized(calibrated, run / "quant")
    torch.manual_seed(0)
    t2q = T2QModule(load_text_tower("embedded"))
    save_t2q(t2q, run / "t2q")
    q, order = t2q.predict(QLIP_PROMPTS).sort()
    layers = list(quant_layers(calibrated))
    q2b = Q2BModule(layers, STEPS, [8, 16, 32], q_mean=float(q[1:3].mean()), q_std=float(q.std()))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        q2b.gate_bias.copy_(torch.randn(len(layers), generator=g))
        q2b.low.copy_(torch.randn(q2b.low.shape, generator=g))
        q2b.high.copy_(torch.randn(q2b.high.shape, generator=g))
    save_q2b(q2b, run / "q2b", {"model": "embedded", "quant_state": relative_link(run / "quant", run / "q2b"),
                                "criterion": "t2q", "t2q": relative_link(run / "t2q", run / "q2b"),
                                "steps": STEPS, "guidance": 5.0})
    return run, [QLIP_PROMPTS[i] for i in order]


@needs_onednn
def test_text_aware_artifact_matches_qlip_pipeline(q2b_run):
    """export --q2b stores Q2B and the T2Q head; the loaded artifact picks the same per-batch tables as the
    fake-quant QLIPPipeline, routes every (layer, step) call by them, and its images agree."""
    q2b_run, prompts = q2b_run
    out = main(["export", "--q2b", str(q2b_run / "q2b"), "--run-dir", str(q2b_run)])
    meta = json.loads((out / "deploy.json").read_text())
    assert meta["qlip"]["criterion"] == "t2q" and meta["qlip"]["q2b"]["bit_options"] == [8, 16, 32]
    fake = QLIPPipeline.from_pretrained(q2b_run / "q2b")
    real = load_qlip(out, load_pipeline("embedded"), backend="onednn")
    assert real.shares_text_encoder  # T2Q reads the pooled output of the text pass generation makes anyway

    layers = quant_layers(real.pipe.unet)
    names = {m: n for n, m in layers.items()}
    index = {n: i for i, n in enumerate(real.q2b.layers)}
    calls = []  # (layer, step, whether it ran on the integer kernel)
    backend = next(iter(layers.values())).backend  # one backend object serves every layer of a UNet
    kernel, backend.n = backend.part_call, 0

    def counted(*args):
        backend.n += 1
        return kernel(*args)
    backend.part_call = counted
    for layer in layers.values():
        def before(m, args):
            m._n0 = backend.n

        def after(m, args, out_):
            calls.append((names[m], m.ctx.step, backend.n > m._n0))
        layer.register_forward_pre_hook(before)
        layer.register_forward_hook(after)

    a = fake(prompts, batch_size=2, progress=False)
    b = real(prompts, batch_size=2, progress=False, on_batch=lambda i, r: calls.append(("batch", i, None)))
    assert len(a.batches) == len(b.batches) == 2
    assert torch.allclose(a.quality, b.quality)
    for x, y in zip(a.batches, b.batches):
        assert torch.equal(x["policy"], y["policy"]) and x["fab"] == y["fab"]
    policies = torch.stack([x["policy"] for x in b.batches])
    assert len(set(policies.reshape(-1).tolist())) == 3  # 8, 16 and 32 bits all chosen
    assert not torch.equal(policies[0], policies[1])  # the two batches' texts give different tables
    batch, routed = -1, 0
    for name, step, integer in calls:
        if name == "batch":
            batch = step
            continue
        assert integer == (int(policies[batch, index[name], step]) <= 8), (batch, name, step)
        routed += 1
    assert routed == 2 * STEPS * len(layers)  # every call of both batches seen
    psnr = psnr_per_image(a.images, b.images)
    # rounding flips (docs/deploy.md, whole-UNet agreement) set the spread: measured 43-54 dB here, the exact
    # reference backend 45-54 dB, static A8 on these prompts 41-73 dB; 16-bit calls run at 8 bits: 39-42 dB
    assert psnr.min() >= 40 and np.median(psnr) >= 45, psnr

    # the generate stage on the same artifact: the same tables per batch and the same images as load_qlip's
    (q2b_run / "prompts.txt").write_text("\n".join(prompts) + "\n")
    stage = main(["generate", "--deployed", str(out), "--prompts", str(q2b_run / "prompts.txt"), "--n", "4",
                  "--batch-size", "2", "--steps", str(STEPS), "--guidance", "5", "--run-dir", str(q2b_run / "gen")])
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["prompts"] == prompts
    again = load_qlip(out, load_pipeline("embedded"), backend="onednn")(prompts, manifest["seeds"], batch_size=2,
                                                                       progress=False)
    tables = load_file(str(stage / "bits.safetensors"))["policies"]
    assert torch.equal(tables, torch.stack([x["policy"] for x in again.batches]))
    assert np.array_equal(_stage_images(stage), again.images)



def _stage_images(out) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(f)) for f in sorted((out / "images").glob("*.png"))])


@needs_onednn
def test_generate_stage_on_a_deployed_artifact(calibrated, exported, tmp_path):
    """`generate --deployed`: the CLI's images are the Python API's (attach + sample), pixel for pixel, for the
    same prompts and seeds; the bf16 runtime too; the manifest names the runtime and its time per image."""
    out = main(["generate", "--deployed", str(exported), "--run-dir", str(tmp_path / "a"), "--n", "2",
                "--steps", str(STEPS), "--batch-size", "2"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runtime"]["backend"] == "onednn" and manifest["runtime"]["seconds_per_image"] > 0
    prompts, seeds, guidance = manifest["prompts"], manifest["seeds"], manifest["sampling"]["guidance"]
    pipe = load_pipeline("embedded")
    want = generate(attach(pipe, exported, "onednn"), prompts, seeds, steps=STEPS, guidance=guidance, progress=False)
    assert np.array_equal(_stage_images(out), want)
    # no FP UNet weights are read: a model folder without them gives the same images
    folder = tmp_path / "model"
    shutil.copytree(EMBEDDED_DIR, folder)
    for f in (folder / "unet").glob("*.safetensors"):
        f.unlink()
    out = main(["generate", "--deployed", str(exported), "--model", str(folder), "--run-dir", str(tmp_path / "c"),
                "--n", "2", "--steps", str(STEPS), "--batch-size", "2"])
    assert np.array_equal(_stage_images(out), want)
    with pytest.raises(ValueError, match="no weights in .*unet"):  # which every other stage needs
        main(["generate", "--model", str(folder), "--run-dir", str(tmp_path / "d"), "--n", "2"])
    if onednn_bf16_missing() is None:
        out = main(["generate", "--deployed", str(exported), "--run-dir", str(tmp_path / "b"), "--n", "2",
                    "--steps", str(STEPS), "--batch-size", "2", "--runtime", "bf16"])
        want = generate(attach(pipe, exported, "onednn", dtype="bf16"), prompts, seeds, steps=STEPS,
                        guidance=guidance, progress=False)
        assert np.array_equal(_stage_images(out), want)


def test_generate_stage_refuses_bad_deployed_flags(exported, calibrated, tmp_path, monkeypatch):
    base = ["generate", "--deployed", str(exported), "--run-dir", str(tmp_path / "r"), "--steps", str(STEPS)]
    save_quantized(copy.deepcopy(calibrated), tmp_path / "quant")
    with pytest.raises(ValueError, match="holds its own quantized UNet .* leave out --quant-state"):
        main(base + ["--quant-state", str(tmp_path / "quant")])
    with pytest.raises(ValueError, match="--runtime 'fp16': choose one of fp32, bf16"):
        main(base + ["--runtime", "fp16"])
    with pytest.raises(ValueError, match="--trainer.precision 'bf16-mixed' with --deployed: .* --runtime bf16"):
        main(base + ["--trainer.precision", "bf16-mixed"])
    with pytest.raises(ValueError, match="--backend 'int4' is not known"):
        main(base + ["--backend", "int4"])
    import pipeline.deploy.artifact as artifact

    with monkeypatch.context() as m:  # a CPU whose int8 kernels cannot write bf16 (the probe of load_unet)
        m.setattr(artifact, "onednn_bf16_missing", lambda: "no bf16 on this CPU (probe)")
        with pytest.raises(ValueError, match=r"--runtime 'bf16' with --backend onednn: no bf16 on this CPU \(probe\); "
                                             r"use --runtime 'fp32'"):
            main(base + ["--runtime", "bf16"])
    with pytest.raises(FileNotFoundError, match="--deployed .*nowhere: no such folder; .*run the export stage"):
        main(["generate", "--deployed", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()  # every refusal before anything was written


def test_text_aware_export_refusals(q2b_run, exported, tmp_path):
    q2b_run, _ = q2b_run
    other = tmp_path / "other"
    shutil.copytree(q2b_run / "quant", other)
    meta = json.loads((other / "quant_config.json").read_text())
    meta["sha256"] = {"quant_state.safetensors": "0" * 64}  # another state, as far as export can tell
    (other / "quant_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="was trained on the state .* not on --quant-state"):
        main(["export", "--q2b", str(q2b_run / "q2b"), "--quant-state", str(other), "--run-dir", str(tmp_path / "r")])
    with pytest.raises(ValueError, match="holds no Q2B tables .* --q2b"):
        load_qlip(exported, load_pipeline("embedded"), backend="reference")


# -- bad input ----------------------------------------------------------------
def test_corrupted_artifact_is_refused(tmp_path, exported):
    shutil.copytree(exported, tmp_path / "deploy")
    f = tmp_path / "deploy" / "unet.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        load_unet(tmp_path / "deploy", "reference")


def test_artifact_of_another_architecture_is_refused(exported):
    with pytest.raises(ValueError, match="belongs to another UNet architecture .*block_out_channels"):
        attach(tiny_pipeline(0), exported, "reference")


def test_export_stage_and_unavailable_kernels(tmp_path, fp_unet):
    unet = quantize_unet(copy.deepcopy(fp_unet), QuantConfig(w_bits=8, a_bits=8, bos_aware=True))
    save_quantized(unet, tmp_path / "bos")
    with pytest.raises(ValueError, match="BOS-aware K/V .* no full-precision weights"):
        main(["export", "--quant-state", str(tmp_path / "bos"), "--run-dir", str(tmp_path / "r0")])
    assert not (tmp_path / "r0" / "deploy").exists()  # refused before anything was written
    unet.quant_config.bos_aware = False
    save_quantized(unet, tmp_path / "q")
    if gpu_missing():  # no CUDA or no torchao here: refused before anything loads, naming what is missing
        with pytest.raises(ValueError, match="--backend gpu .* not on this machine: (no CUDA device|torchao is not)"):
            main(["export", "--quant-state", str(tmp_path / "q"), "--run-dir", str(tmp_path / "r1"),
                  "--backend", "gpu"])
        assert not (tmp_path / "r1" / "deploy").exists()
    out = main(["export", "--quant-state", str(tmp_path / "q"), "--run-dir", str(tmp_path / "r1")])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "export" and 0.25 < manifest["metrics"]["size_ratio"] < 0.3  # 8 of 32 bits
    with pytest.raises(ValueError, match="12-bit weights .* no integer kernel"):
        check_backend("onednn", QuantConfig(w_bits=12, a_bits=8))
