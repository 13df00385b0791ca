"""QLIP pipeline: text-aware quantization of text-to-image diffusion UNets."""

__version__ = "0.1.0"
