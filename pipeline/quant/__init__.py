"""Quantization core: `quantize_unet(unet, QuantConfig(...))`, bit policies, state I/O."""
from pipeline.quant.attention import QuantAttnProcessor
from pipeline.quant.config import QuantConfig
from pipeline.quant.layers import ActQuantBank, QuantContext, QuantLayer
from pipeline.quant.policy import (
    act_banks,
    activation_sensitivity,
    bit_mixture,
    call_steps,
    first_calls,
    get_bit_policy,
    get_weight_bits,
    layers_to_keep_high,
    observing,
    quant_layers,
    set_bit_policy,
    set_quant_state,
    set_schedule,
    set_step,
    set_weight_bits,
)
from pipeline.quant.quantizer import SUPPORTED_BITS, WeightQuantizer, check_bits, fake_quantize
from pipeline.quant.state import load_quantized, save_quantized
from pipeline.quant.wrap import quantize_unet, skip_concat_splits

__all__ = [
    "ActQuantBank", "QuantAttnProcessor", "QuantConfig", "QuantContext", "QuantLayer", "SUPPORTED_BITS",
    "WeightQuantizer", "act_banks", "activation_sensitivity", "bit_mixture", "call_steps", "check_bits", "first_calls",
    "fake_quantize", "get_bit_policy", "get_weight_bits", "layers_to_keep_high", "load_quantized", "observing",
    "quant_layers", "quantize_unet", "save_quantized", "set_bit_policy", "set_quant_state", "set_schedule", "set_step",
    "set_weight_bits", "skip_concat_splits",
]
