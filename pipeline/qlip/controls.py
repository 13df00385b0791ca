"""Static controls for QLIP at equal bits: bit tables that do not read the prompt.

QLIP's claim is that reading the text pays. Its controls spend the same FAB without reading it:
- uniform: every (layer, step) at one option (W4A8 and so on);
- random: each (layer, step) at a random option, the table drawn once (by seed) and then adjusted to the
  target FAB; it says what an allocation that knows nothing is worth at that budget;
- text-blind Q2B (`sources.TextBlind`): Q2B's own training with q constant, a learned static table.

The first two are made here and saved as ordinary quantized states (the stored policy is what runs), so the
evaluate stage takes them as --quant-states beside QLIP."""
from __future__ import annotations

from typing import Sequence

import torch

from pipeline.metrics.cost import weighted_fab

CONTROLS = ("uniform", "random")


def uniform_table(n_layers: int, n_steps: int, bits: int, options: Sequence[int]) -> torch.Tensor:
    if bits not in options:
        raise ValueError(f"--bits {bits} is not a calibrated option of the state; choose from {list(options)}")
    return torch.full((n_layers, n_steps), int(bits), dtype=torch.int16)


def random_table(fab_w: torch.Tensor, n_steps: int, options: Sequence[int], target: float,
                 seed: int = 0) -> torch.Tensor:
    """A [n_layers, n_steps] table of random options whose FAB is the closest to `target` this walk reaches.

    Each cell starts at an option drawn uniformly; then randomly chosen cells move one option down (FAB above
    the target) or up (below) until the FAB crosses the target, and the side of the crossing nearer to it is
    kept. A cell's weight in FAB is its layer's input size, so the FAB reached is within half the largest
    layer's share of one option step."""
    opts = sorted(int(b) for b in options)
    if not opts[0] <= target <= opts[-1]:
        raise ValueError(f"--target-fab {target} is outside the options' range [{opts[0]}, {opts[-1]}]")
    g = torch.Generator().manual_seed(int(seed))
    n_layers = len(fab_w)
    index = torch.randint(0, len(opts), (n_layers, n_steps), generator=g)
    values = torch.tensor(opts, dtype=torch.float64)

    def fab_of(idx):
        return float(weighted_fab(values[idx], fab_w))

    current = fab_of(index)
    down = current > target
    while True:
        movable = (index > 0) if down else (index < len(opts) - 1)
        cells = movable.flatten().nonzero().flatten()
        if len(cells) == 0:
            break
        cell = int(cells[torch.randint(0, len(cells), (1,), generator=g)])
        trial = index.clone()
        trial.view(-1)[cell] += -1 if down else 1
        after = fab_of(trial)
        if (after <= target) if down else (after >= target):  # crossed: keep the nearer side
            if abs(after - target) < abs(current - target):
                index = trial
            break
        index, current = trial, after
    return values[index].to(torch.int16)
