"""Quantized state: safetensors + JSON, bit-exact round trip, tied to its model."""
import json

import pytest
import torch

from pipeline.models import tiny_pipeline
from pipeline.quant import (
    QuantConfig,
    act_banks,
    get_bit_policy,
    load_quantized,
    observing,
    quant_layers,
    quantize_unet,
    save_quantized,
    set_bit_policy,
)


def _calibrate(unet, **cfg):
    quantize_unet(unet, QuantConfig(**cfg))
    g = torch.Generator().manual_seed(0)
    with observing(unet), torch.no_grad():
        for step in range(cfg.get("n_steps", 1)):
            unet.quant_context.step = step
            unet(torch.randn(2, 4, 16, 16, generator=g), 500, torch.randn(2, 77, 64, generator=g))
    for b in act_banks(unet).values():
        b.finalize("lp")
    return unet


def test_round_trip_is_bit_exact(tmp_path):
    cfg = dict(w_bits=4, a_bits=8, a_bit_options=[8, 16, 32], n_steps=3, time_aware=True, weight_init="lp",
               bos_aware=True)
    unet = _calibrate(tiny_pipeline(0).unet, **cfg)
    names = list(quant_layers(unet))
    set_bit_policy(unet, {names[0]: [8, 16, 32], names[5]: 16})
    save_quantized(unet, tmp_path / "q", extra={"method": "test"}, extra_tensors={"k_t": torch.arange(3.0)})
    assert {p.name for p in (tmp_path / "q").iterdir()} == {"quant_state.safetensors", "quant_config.json"}
    assert json.loads((tmp_path / "q" / "quant_config.json").read_text())["extra"]["method"] == "test"

    loaded, meta, extra = load_quantized(tiny_pipeline(0).unet, tmp_path / "q")
    assert torch.equal(extra["k_t"], torch.arange(3.0))
    assert torch.equal(get_bit_policy(loaded), get_bit_policy(unet))
    a, b = unet.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x = (torch.randn(2, 4, 16, 16), 500, torch.randn(2, 77, 64))
    for step in range(3):
        unet.quant_context.step = loaded.quant_context.step = step
        with torch.no_grad():
            assert torch.equal(unet(*x).sample, loaded(*x).sample)


def test_state_of_another_model_is_refused(tmp_path):
    unet = _calibrate(tiny_pipeline(0).unet, w_bits=8, a_bits=8)
    save_quantized(unet, tmp_path / "q")
    with pytest.raises(ValueError, match="calibrated on other weights"):
        load_quantized(tiny_pipeline(seed=1).unet, tmp_path / "q")
    from diffusers import UNet2DConditionModel

    from pipeline.models import TINY_UNET_CONFIG

    other = UNet2DConditionModel(**dict(TINY_UNET_CONFIG, block_out_channels=(32, 32)))
    with pytest.raises(ValueError, match="another UNet architecture.*block_out_channels"):
        load_quantized(other, tmp_path / "q")


def test_missing_state_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="quant_config.json is missing"):
        load_quantized(tiny_pipeline(0).unet, tmp_path)
