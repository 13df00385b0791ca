"""The FP reference of one process: for every image it generated, the prompt,
seed, image and Inception features, so that each quantized method is compared
with the FP image of the same prompt and seed without re-running the FP model
or its Inception pass."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


class PromptMismatchError(ValueError):
    pass


@dataclass
class ReferenceBatch:
    images: torch.Tensor  # uint8 [N, 3, H, W]
    features: dict  # tap -> [N, D]


class FPReference:
    def __init__(self):
        self._items: dict[tuple[str, int], tuple[str, int, torch.Tensor, dict]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def put(self, split: str, indices: Sequence[int], prompts: Sequence[str], seeds: Sequence[int],
            images: torch.Tensor, features: dict) -> None:
        for j, i in enumerate(indices):
            self._items[(split, int(i))] = (prompts[j], int(seeds[j]), images[j].cpu(),
                                            {k: v[j].cpu() for k, v in features.items()})

    def items_of(self, split: str) -> list[tuple[int, tuple]]:
        """(index, (prompt, seed, image, features)) of `split`, by index."""
        return sorted((k[1], v) for k, v in self._items.items() if k[0] == split)

    def get(self, split: str, indices: Sequence[int], prompts: Sequence[str], seeds: Sequence[int],
            label: str = "the evaluated model") -> ReferenceBatch:
        """The FP images/features of these images; refuses a prompt or seed that
        differs from the FP one (the comparison would be meaningless)."""
        if not (len(indices) == len(prompts) == len(seeds)):
            raise PromptMismatchError(f"{label}: {len(indices)} images, {len(prompts)} prompts, {len(seeds)} seeds")
        rows = []
        for i, p, s in zip(indices, prompts, seeds):
            item = self._items.get((split, int(i)))
            if item is None:
                raise PromptMismatchError(
                    f"{label}: image {i} of split {split!r} has no FP reference image (the FP model generated "
                    f"{sum(1 for k in self._items if k[0] == split)} images of that split here); FP and "
                    f"quantized models must be evaluated on the same prompt list")
            fp_prompt, fp_seed = item[0], item[1]
            if fp_prompt != p or fp_seed != int(s):
                raise PromptMismatchError(
                    f"{label}: image {i} of split {split!r} was generated for prompt {p!r} with seed {s}, but the "
                    f"FP reference image {i} for prompt {fp_prompt!r} with seed {fp_seed}; FP and quantized models "
                    f"must use identical prompt lists and seeds")
            rows.append(item)
        images = torch.stack([r[2] for r in rows])
        features = {k: torch.stack([r[3][k] for r in rows]) for k in rows[0][3]}
        return ReferenceBatch(images, features)
