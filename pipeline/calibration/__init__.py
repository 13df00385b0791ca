"""Calibration methods that fill a quantized UNet's quantizers."""
