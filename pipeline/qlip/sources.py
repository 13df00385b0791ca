"""Quality sources for Q2B: anything with `predict(prompts) -> [N] tensor` and
`memory_bytes()`. T2Q is the paper's; prompt length and image complexity are
the selection-criteria ablation (Table S3); text-blind is the direct ablation of text-awareness."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from data.images import image_complexity
from pipeline.models import load_pipeline
from pipeline.qlip.t2q import load_t2q
from pipeline.sampling import generate

CRITERIA = ("t2q", "length", "complexity", "text-blind")


class PromptLength:
    """q = number of CLIP tokens of the prompt (Table S3's prompt-length criterion)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def predict(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(prompts), truncation=True, max_length=self.tokenizer.model_max_length)["input_ids"]
        return torch.tensor([len(i) - 2 for i in ids], dtype=torch.float32)  # without BOS / EOS

    def memory_bytes(self) -> int:
        return 0


class TextBlind:
    """q = 0 for every prompt: Q2B trained on it learns one static per-(layer, step) table under the same
    loss, budget and schedule as QLIP, so QLIP against it isolates what reading the text adds."""

    def predict(self, prompts: Sequence[str]) -> torch.Tensor:
        return torch.zeros(len(prompts))

    def memory_bytes(self) -> int:
        return 0


class ImageComplexity:
    """q = mean gradient magnitude of the FP image (seed 0): Table S3's image
    complexity, measured rather than predicted from text (an oracle of the
    paper's T2C, so the ablation favours this criterion). Costs one FP
    generation per prompt: an ablation, not a deployment path."""

    def __init__(self, fp_pipe, steps: int, guidance: float):
        self.pipe, self.steps, self.guidance = fp_pipe, steps, guidance

    def predict(self, prompts: Sequence[str]) -> torch.Tensor:
        images = generate(self.pipe, list(prompts), [0] * len(prompts), steps=self.steps, guidance=self.guidance,
                          progress=False)
        return image_complexity(images)

    def memory_bytes(self) -> int:
        return 0


def quality_source(criterion: str, model: str, pipe=None, t2q: str | None = None, steps: int = 20,
                   guidance: float = 5.0, load: dict | None = None):
    """The quality predictor of a criterion. `pipe` (FP) is borrowed for its
    tokenizer / images when given; `t2q` is the T2Q folder for criterion t2q."""
    if criterion == "t2q":
        if not t2q:
            raise ValueError("criterion 't2q' needs a T2Q folder (--t2q runs/x/t2q, written by `pipeline.fit t2q`)")
        if not Path(t2q).is_dir():
            raise FileNotFoundError(f"T2Q folder {t2q} does not exist; train it with `python -m pipeline.fit t2q`")

        return load_t2q(t2q, model=model)

    if criterion == "length":
        return PromptLength((pipe or load_pipeline(model, **(load or {}))).tokenizer)
    if criterion == "complexity":
        return ImageComplexity(pipe or load_pipeline(model, **(load or {})), steps, guidance)
    if criterion == "text-blind":
        return TextBlind()
    raise ValueError(f"unknown quality criterion {criterion!r}; choose one of {CRITERIA}")
