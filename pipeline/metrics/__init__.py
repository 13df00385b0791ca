"""Evaluation metrics as torchmetrics Metrics (states sync across processes):
FID/sFID with the standard FID Inception, CLIP score, PSNR/SSIM/LPIPS to FP,
FAB, BitOPs and timing. See docs/evaluation.md."""
from pipeline.metrics.cost import FAB, BitOPs
from pipeline.metrics.fidelity import FidelityToFP
from pipeline.metrics.frechet import FrechetDistance, TooFewImagesError, check_enough_images, min_images
from pipeline.metrics.timing import Timing

__all__ = ["FAB", "BitOPs", "FidelityToFP", "FrechetDistance", "Timing", "TooFewImagesError",
           "check_enough_images", "min_images"]
