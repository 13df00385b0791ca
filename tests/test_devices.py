"""Every stage computes on the device the Trainer options name (pipeline.engine.stage_device).

A CPU-only machine has no second device to compute on, so `Elsewhere` simulates one: the loader
hands the stage a pipeline whose every weight is tagged as living on another device (as if
loaded onto another GPU). A real transfer (`.to(cpu)`, `.cpu()`, `copy_`) yields an untagged
copy; any other op that reads a tagged tensor is computation on the wrong device and is
recorded. A stage passes when it moved every part (text encoder, VAE, UNet, quantizers, caches,
side models) to its device before computing with it."""
from __future__ import annotations

import collections
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import pipeline.api as api  # every stage module loaded, so the loader patch reaches them all
import pipeline.models as models
from pipeline.engine import device_for, fp_autocast, fp_pass_dtype, make_trainer, stage_device

# ops that read no values (metadata, views, grad-mode switches): no computation on any device
METADATA = {"__get__", "__set__", "size", "dim", "numel", "nelement", "is_floating_point", "is_complex",
            "element_size", "data_ptr", "untyped_storage", "_has_compatible_shallow_copy_type", "requires_grad_",
            "is_contiguous", "__len__", "stride", "storage_offset", "_is_view", "detach", "view", "reshape",
            "_parse_to", "_set_grad_enabled", "is_inference", "__hash__", "_version", "get_device",
            "__reduce_ex__", "__deepcopy__", "_make_subclass"}


def _key(t: torch.Tensor):
    return t.untyped_storage().data_ptr() if t.numel() else None


class Elsewhere(TorchFunctionMode):
    """Tensors put `away` live on a simulated second device; ops that compute with them are recorded."""

    def __init__(self):
        super().__init__()
        self.away: dict[int, torch.Tensor] = {}  # storage address -> an alias keeping it alive (no reuse)
        self.violations: collections.Counter = collections.Counter()

    def put_away(self, pipe) -> None:
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                for t in [*module.parameters(), *module.buffers()]:
                    if t.numel():  # a detached alias holds the storage even after `param.data = ...`
                        self.away[_key(t)] = t.detach()

    def _is_away(self, t) -> bool:
        return torch.is_tensor(t) and t.numel() > 0 and _key(t) in self.away

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in METADATA or not any(self._is_away(t) for t in tree_flatten((args, kwargs))[0]):
            return func(*args, **kwargs)
        if name in ("to", "cpu"):
            device = torch._C._nn._parse_to(*args[1:], **kwargs)[0] if name == "to" else torch.device("cpu")
            out = func(*args, **kwargs)
            if device is None:  # a dtype change stays on the other device
                self.away[_key(out)] = out
                return out
            return out.clone() if out is args[0] else out  # the transfer: a copy on the CPU
        if name == "copy_":  # cross-device copies are allowed
            return func(*args, **kwargs)
        self.violations[name] += 1
        return func(*args, **kwargs)


@pytest.fixture()
def elsewhere(monkeypatch):
    """Every loader of the pipeline modules returns a pipeline `Elsewhere` considers on another device."""
    audit = Elsewhere()
    real = models.load_pipeline

    def load_away(*args, **kwargs):
        pipe = real(*args, **kwargs)
        audit.put_away(pipe)
        return pipe

    for mod in list(sys.modules.values()):
        if (getattr(mod, "__name__", "") or "").startswith("pipeline") and getattr(mod, "load_pipeline", None) is real:
            monkeypatch.setattr(mod, "load_pipeline", load_away)
    return audit


def _audited(audit: Elsewhere, fn, *args, **kwargs):
    with audit:
        out = fn(*args, **kwargs)
    assert not audit.violations, f"ops computed on a device other than the stage's: {dict(audit.violations)}"
    return out


def test_elsewhere_catches_a_part_left_behind(tiny_pipe):
    """The check itself: a text encoder left on the other device is caught, a moved one is not."""
    from pipeline.sampling import encode_prompts

    audit = Elsewhere()
    audit.put_away(tiny_pipe)
    with audit:
        tiny_pipe.unet.to("cpu")
        tiny_pipe.vae.to("cpu")
        encode_prompts(tiny_pipe, ["a red circle"])
    assert audit.violations  # the text encoder computed where it was loaded
    audit.violations.clear()
    with audit:
        tiny_pipe.to("cpu")
        cond = encode_prompts(tiny_pipe, ["a red circle"]).cond
    assert not audit.violations
    ref = encode_prompts(models.tiny_pipeline(0), ["a red circle"]).cond
    assert torch.equal(cond, ref)  # the copies hold the same values


@pytest.mark.parametrize("opts, local_rank, n_cuda, want", [
    ({}, 0, 0, "cpu"),
    ({"accelerator": "auto"}, 0, 2, "cuda:0"),
    ({"accelerator": "cpu", "devices": 2}, 1, 2, "cpu"),
    ({"accelerator": "gpu"}, 0, 1, "cuda:0"),
    ({"accelerator": "gpu", "devices": 2}, 1, 2, "cuda:1"),
    ({"accelerator": "cuda", "devices": [2, 3]}, 1, 4, "cuda:3"),
    ({"accelerator": "gpu", "devices": "1,3"}, 0, 4, "cuda:1"),
    ({"accelerator": "gpu", "devices": "auto"}, 3, 4, "cuda:3"),
    ({"accelerator": "gpu", "devices": -1}, 2, 4, "cuda:2"),
])
def test_stage_device_maps_the_trainer_options(opts, local_rank, n_cuda, want):
    assert device_for(opts.get("accelerator"), opts.get("devices"), local_rank, n_cuda) == torch.device(want)


@pytest.mark.parametrize("opts, message", [
    ({"accelerator": "gpu"}, "no CUDA device"),
    ({"accelerator": "tpu"}, "'tpu'"),
    ({"accelerator": "gpu", "devices": [0, 5]}, "[5] do not exist"),
    ({"accelerator": "gpu", "devices": 0}, "positive count"),
])
def test_stage_device_names_bad_options(opts, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        device_for(opts.get("accelerator"), opts.get("devices"), 0, 0 if "devices" not in opts else 2)


@pytest.mark.parametrize("opts", [{}, {"accelerator": "cpu"}, {"accelerator": "cpu", "devices": 1}])
def test_stage_device_is_where_the_trainer_puts_its_module(opts):
    assert stage_device(opts) == make_trainer(opts).strategy.root_device


def test_precision_gives_the_fp_passes_their_autocast():
    assert fp_pass_dtype({}) is None and fp_pass_dtype({"precision": "32-true"}) is None
    assert fp_pass_dtype({"precision": "bf16-mixed"}) is torch.bfloat16
    assert fp_pass_dtype({"precision": "16-mixed"}) is torch.float16
    with pytest.raises(ValueError, match="'64-true'.*bf16-mixed"):
        fp_pass_dtype({"precision": "64-true"})
    lin = torch.nn.Linear(4, 4)
    with fp_autocast({"precision": "bf16-mixed"}, torch.device("cpu")):
        assert lin(torch.ones(1, 4)).dtype == torch.bfloat16
    with fp_autocast({}, torch.device("cpu")):
        assert lin(torch.ones(1, 4)).dtype == torch.float32


def test_fake_quantization_stays_fp32_under_autocast(tiny_pipe):
    """bf16-mixed: the FP layers run in bf16, the quantized layer's math in fp32 (same output as without)."""
    from pipeline.quant import QuantConfig, quantize_unet

    unet = quantize_unet(tiny_pipe.unet, QuantConfig(w_bits=8, a_bits=8))
    layer = unet.conv_in
    layer.act.observing = True
    x = torch.randn(2, 4, 8, 8)
    layer(x)
    layer.act.observing = False
    layer.act.finalize("minmax")
    want = layer(x)
    with fp_autocast({"precision": "bf16-mixed"}, torch.device("cpu")):
        got = layer(x.bfloat16())
    assert got.dtype == torch.float32
    assert torch.allclose(got, layer(x.bfloat16().float()))
    assert (got - want).abs().max() < 0.05 * want.abs().max()


COMMON = {"model": "tiny-random", "prompts": "builtin", "seed": 0}
TRAINER = {"enable_progress_bar": False}


def test_calibrate_all_methods_compute_on_the_stage_device(elsewhere, tmp_path):
    """naive + PCR progressive (on a GPU, the step after naive's Trainer once met CPU token ids), then
    ptqd = qdiff's calibration data, unit captures and range init + PTQD's statistics. (0 iterations
    keep it short: the Lightning fits place their module themselves.)"""
    small = dict(COMMON, cali_n=2, batch_size=2, steps=2)
    naive = api.CalibrateConfig(**small, method="naive", progressive=True, run_dir=str(tmp_path / "n"))
    _audited(elsewhere, api.calibrate, naive, TRAINER)
    ptqd = api.CalibrateConfig(**small, method="ptqd", cali_st=2, iters_w=0, iters_a=0, run_dir=str(tmp_path / "p"))
    _audited(elsewhere, api.calibrate, ptqd, TRAINER)
    assert (tmp_path / "p" / "quant" / "quant_state.safetensors").is_file()


def test_q2b_generate_and_evaluate_compute_on_the_stage_device(elsewhere, tmp_path):
    run, state = str(tmp_path), str(tmp_path / "quant")
    api.calibrate(api.CalibrateConfig(**COMMON, method="naive", w_bits=8, a_bits=16, a_bit_options="8,16", cali_n=2,
                                      batch_size=2, steps=2, run_dir=run), TRAINER)
    q2b = api.Q2BConfig(**COMMON, quant_state=state, criterion="length", n=2, val_n=2, batch_size=2, resolution=16,
                        epochs=1, target_fab=12.0, run_dir=run)
    _audited(elsewhere, api.q2b, q2b, TRAINER)
    small = dict(COMMON, n=2, steps=2, batch_size=2, run_dir=run)
    _audited(elsewhere, api.generate, api.GenerateConfig(**small, name="fp"))
    _audited(elsewhere, api.generate, api.GenerateConfig(**small, q2b=str(tmp_path / "q2b"), name="qlip"))
    evaluate = api.EvaluateConfig(model="tiny-random", n=2, steps=2, batch_size=2, run_dir=run, quant_states=[state],
                                  in_domain="builtin", fid=False, sfid=False, clip="none", lpips=False)
    _audited(elsewhere, api.evaluate, evaluate, TRAINER)
    assert (tmp_path / "qlip" / "bits.json").is_file() and (tmp_path / "evaluate" / "results.json").is_file()
