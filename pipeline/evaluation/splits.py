"""Prompt splits (QDiffBench: in-domain and prompt-generalization), their
images (prompt x seed), and the fixed global batches every method shares.

Image i of a split uses prompt i // images_per_prompt and seed `seed + i`,
for the FP model and for every quantized model alike. The evaluate seed
offsets the noise seeds only: the prompts are drawn with `prompt_seed`
(default PROMPT_SEED, whatever the evaluate seed), so that runs with different
seeds score the same prompts and their results can be paired and pooled. Batches are cut once,
globally; under DDP whole batches are dealt to processes
(UnrepeatedDistributedSampler, no padding), so a batch holds the same images
on one process or many and a per-batch bit policy is the same either way."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch.utils.data import Dataset

from data.prompts import DEFAULT_FRACTIONS, draw_prompts

PROMPT_SEED = 0  # the prompt draw of every evaluation (it picks the world's captions; hashed sources ignore it)


@dataclass
class Split:
    name: str
    source: str  # a prompt source (data/prompt_sources.py SYNTAX)
    prompts: list[str]
    images_per_prompt: int = 1
    seed: int = 0
    draw: dict | None = None  # how the prompts were drawn (data.prompts.PromptDraw.describe)
    prompt_seed: int = PROMPT_SEED  # the seed the prompts were drawn with (never the noise seed)
    n_images: int = field(init=False)

    def __post_init__(self):
        if self.images_per_prompt < 1:
            raise ValueError(f"images_per_prompt={self.images_per_prompt} must be >= 1")
        if not self.prompts:
            raise ValueError(f"split {self.name!r} ({self.source}) has no prompts")
        self.n_images = len(self.prompts) * self.images_per_prompt

    def image(self, i: int) -> tuple[str, int]:
        return self.prompts[i // self.images_per_prompt], self.seed + i


def load_split(name: str, spec: str, n: int | None, images_per_prompt: int, seed: int,
               fractions=DEFAULT_FRACTIONS, prompt_seed: int = PROMPT_SEED) -> Split:
    """Split `name` from prompt source `spec`: its test split (the prompts calibration, Q2B training
    and Q2B validation never see; 'world:SPLIT' names the world's scene split instead). `seed` offsets
    the images' noise seeds; the prompts depend on `prompt_seed` only."""
    draw = draw_prompts(spec, "test", n, fractions, seed=prompt_seed)
    if n is not None and len(draw.prompts) < n:
        print(f"note: split {name!r} ({spec}) has only {len(draw.prompts)} distinct prompts (asked for {n})")
    return Split(name, spec, draw.prompts, images_per_prompt, seed, {**draw.describe(), "prompt_seed": prompt_seed},
                 prompt_seed)


def global_batches(splits: list[Split], batch_size: int) -> list[dict]:
    """Every split's images cut into batches of `batch_size` (a batch never
    mixes splits). Each batch: split, indices, prompts, seeds."""
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be >= 1")
    batches = []
    for s in splits:
        for start in range(0, s.n_images, batch_size):
            idx = list(range(start, min(start + batch_size, s.n_images)))
            prompts, seeds = zip(*(s.image(i) for i in idx))
            batches.append({"split": s.name, "indices": idx, "prompts": list(prompts), "seeds": list(seeds)})
    return batches


class BatchDataset(Dataset):
    """Items are whole batches (use DataLoader(batch_size=None))."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.batches[i]


def identity(x):
    return x
