"""MixDQ's bit allocation (Sec. 3.3, App. A): an integer program per layer group choosing one candidate
bit-width per layer to maximize the summed sensitivity score under an average-bit budget weighted by each
layer's size (weight elements for weights, input-activation elements for activations, i.e. FAB); plus the
baselines it is compared with.

Scores are "higher is better" (SSIM, SQNR in dB). Before solving, each layer's scores are made non-decreasing
in the bits (a measured 8-bit score a hair below the 4-bit one is noise) and scaled to integers with a tie
break of one unit per bit step, so that more bits always score strictly higher: an optimal allocation then
leaves no layer that could be raised within the budget."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Mapping, Sequence

import numpy as np

ALLOCATORS = ("ilp", "sorting", "sqnr-only", "random", "uniform")
SQNR_SCALES = ("db", "power")  # what the programs sum of each layer's SQNR (sqnr_scores)
SCALE = 10**6  # integer resolution of the normalized scores


class BudgetError(ValueError):
    """A budget outside what the candidate bits can reach."""


class Infeasible(BudgetError):
    """No allocation meets this budget (e.g. a group split that leaves one group below its lowest bits)."""


@dataclass
class Problem:
    """One integer program: `scores[i, k]` of layer i at `bits[k]` (higher is better), `sizes[i]` its weight."""

    names: list[str]
    bits: list[int]
    scores: np.ndarray
    sizes: np.ndarray

    def __post_init__(self):
        self.bits = [int(b) for b in self.bits]
        if self.bits != sorted(set(self.bits)):
            raise ValueError(f"candidate bits {self.bits} must be distinct and ascending")
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(len(self.names), len(self.bits))
        self.sizes = np.asarray(self.sizes, dtype=np.int64).reshape(len(self.names))
        if not np.isfinite(self.scores).all():
            raise ValueError("scores must be finite (read_sensitivity refuses NaN/inf records)")

    def cost(self, choice: Sequence[int]) -> int:
        """Summed size x bits of an allocation (indices into `bits`)."""
        return int(sum(int(self.sizes[i]) * self.bits[k] for i, k in enumerate(choice)))

    def capacity(self, budget: float) -> int:
        """The largest summed size x bits whose size-weighted average is <= budget (exact: no float rounding)."""
        return math.floor(Fraction(repr(float(budget))) * int(self.sizes.sum()))

    def average(self, choice: Sequence[int]) -> float:
        return self.cost(choice) / max(int(self.sizes.sum()), 1)

    def objective(self, choice: Sequence[int]) -> float:
        return float(sum(self.scores[i, k] for i, k in enumerate(choice)))


def integer_scores(scores: np.ndarray) -> np.ndarray:
    """Non-decreasing in the bits, normalized to [0, SCALE] over the whole problem, + k for bit index k."""
    mono = np.maximum.accumulate(np.asarray(scores, dtype=np.float64), axis=1)
    lo, hi = float(mono.min()), float(mono.max())
    norm = (mono - lo) / (hi - lo) if hi > lo else np.zeros_like(mono)
    return np.round(norm * SCALE).astype(np.int64) + np.arange(mono.shape[1], dtype=np.int64)


def check_budget(budget: float, bits: Sequence[int], what: str = "--w-budget") -> None:
    lo, hi = min(bits), max(bits)
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and lo <= budget <= hi):
        raise BudgetError(f"{what} {budget} is outside the candidate range [{lo}, {hi}] of bits {list(bits)}; "
                          f"choose a budget within it")


SOLVERS = ("scip", "cp-sat")


def solve_ilp(problem: Problem, budget: float, time_limit: float = 10.0, solver: str = "scip",
              workers: int = 2) -> dict:
    """The integer program: one-hot x[i, k], sum_k x[i, k] = 1, sum size_i bits_k x[i, k] <= capacity(budget),
    maximize sum integer_scores[i, k] x[i, k] (costs and gains relative to each layer's lowest bits: smaller
    coefficients, the same program). OR-tools' SCIP (default; its LP bound makes this multiple-choice knapsack
    fast: 794 layers solve to a zero gap in about a second) or CP-SAT (slower to prove optimality at SDXL
    size). A result stopped by `time_limit` is then raised greedily while the budget allows, so the
    no-layer-raisable property holds either way. Returns {"choice": [k per layer], "status", "seconds"}."""
    if solver not in SOLVERS:
        raise ValueError(f"--solver {solver!r}: use one of {SOLVERS}")
    n, kk = len(problem.names), len(problem.bits)
    if n == 0:
        return {"choice": [], "status": "OPTIMAL", "seconds": 0.0}
    cap = problem.capacity(budget)
    lowest = int(problem.sizes.sum()) * problem.bits[0]
    if lowest > cap:
        raise Infeasible(f"budget {budget} is below the lowest candidate ({problem.bits[0]} bits) for {n} layers")
    ints = integer_scores(problem.scores)
    gain = [[int(ints[i, k] - ints[i, 0]) for k in range(kk)] for i in range(n)]
    extra = [[int(problem.sizes[i]) * (problem.bits[k] - problem.bits[0]) for k in range(kk)] for i in range(n)]
    t0 = time.time()
    if solver == "scip":
        from ortools.linear_solver import pywraplp  # lazy: OR-tools loads native solvers; only allocation needs them

        mip = pywraplp.Solver.CreateSolver("SCIP")
        x = [[mip.BoolVar(f"x{i}_{k}") for k in range(kk)] for i in range(n)]
        for i in range(n):
            mip.Add(sum(x[i]) == 1)
        mip.Add(sum(extra[i][k] * x[i][k] for i in range(n) for k in range(1, kk)) <= cap - lowest)
        mip.Maximize(sum(gain[i][k] * x[i][k] for i in range(n) for k in range(1, kk)))
        mip.SetTimeLimit(int(time_limit * 1000))
        params = pywraplp.MPSolverParameters()
        params.SetDoubleParam(params.RELATIVE_MIP_GAP, 0.0)  # the optimum, not SCIP's default 1e-4 gap
        code = mip.Solve(params)
        names = {pywraplp.Solver.OPTIMAL: "OPTIMAL", pywraplp.Solver.FEASIBLE: "FEASIBLE"}
        if code not in names:
            raise Infeasible(f"SCIP found no allocation for budget {budget} (status {code})")
        choice = [max(range(kk), key=lambda k: x[i][k].solution_value()) for i in range(n)]
        status = names[code]
    else:
        from ortools.sat.python import cp_model  # lazy: as above

        model = cp_model.CpModel()
        x = [[model.NewBoolVar(f"x{i}_{k}") for k in range(kk)] for i in range(n)]
        for i in range(n):
            model.AddExactlyOne(x[i])
        model.Add(sum(extra[i][k] * x[i][k] for i in range(n) for k in range(1, kk)) <= cap - lowest)
        model.Maximize(sum(gain[i][k] * x[i][k] for i in range(n) for k in range(1, kk)))
        sat = cp_model.CpSolver()
        sat.parameters.max_time_in_seconds = float(time_limit)
        sat.parameters.num_workers = int(workers)
        sat.parameters.random_seed = 0
        code = sat.Solve(model)
        if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            raise Infeasible(f"CP-SAT found no allocation for budget {budget} ({sat.StatusName(code)})")
        choice = [next(k for k in range(kk) if sat.Value(x[i][k])) for i in range(n)]
        status = sat.StatusName(code)
    if problem.cost(choice) > cap:  # never expected: the solver's tolerance must not break the budget
        raise RuntimeError(f"the {solver} allocation exceeds budget {budget}")
    choice = fill(problem, choice, budget, ints)
    return {"choice": choice, "status": status, "seconds": time.time() - t0}


def fill(problem: Problem, choice: Sequence[int], budget: float, ints: np.ndarray | None = None) -> list[int]:
    """Raise layers one bit step at a time, the best gain per cost first, while the budget allows (a no-op on
    an optimal allocation: each raise gains, so an optimum has nothing left to raise)."""
    ints = integer_scores(problem.scores) if ints is None else ints
    choice = list(choice)
    while True:
        up = raisable(problem, choice, budget)
        if not up:
            return choice
        def per_cost(j):
            step = int(problem.sizes[j]) * (problem.bits[choice[j] + 1] - problem.bits[choice[j]])
            return (ints[j, choice[j] + 1] - ints[j, choice[j]]) / max(step, 1), -j

        i = max(up, key=per_cost)
        choice[i] += 1


def raisable(problem: Problem, choice: Sequence[int], budget: float) -> list[int]:
    """Layers that could take the next higher bits and still meet the budget."""
    slack = problem.capacity(budget) - problem.cost(choice)
    return [i for i, k in enumerate(choice) if k + 1 < len(problem.bits)
            and int(problem.sizes[i]) * (problem.bits[k + 1] - problem.bits[k]) <= slack]


def greedy(problem: Problem, budget: float, order: Sequence[int], rng: np.random.Generator | None = None) -> list[int]:
    """Start every layer at the lowest bits; in `order`, raise each to the highest bits that fit (or, with `rng`,
    to a random option that fits); then raise, in the same order, whatever still fits."""
    cap = problem.capacity(budget)
    choice = [0] * len(problem.names)
    if problem.cost(choice) > cap:
        raise Infeasible(f"budget {budget} is below the lowest candidate ({problem.bits[0]} bits)")
    used = problem.cost(choice)
    for i in order:
        fits = [k for k in range(len(problem.bits))
                if used + int(problem.sizes[i]) * (problem.bits[k] - problem.bits[0]) <= cap]
        k = int(rng.choice(fits)) if rng is not None else max(fits)
        used += int(problem.sizes[i]) * (problem.bits[k] - problem.bits[0])
        choice[i] = k
    while True:  # use what is left
        up = raisable(problem, choice, budget)
        if not up:
            return choice
        i = min(up, key=list(order).index)
        choice[i] += 1


def uniform(problem: Problem, budget: float) -> list[int]:
    """Every layer at the largest candidate <= budget."""
    below = [k for k, b in enumerate(problem.bits) if b <= budget + 1e-9]
    if not below:
        raise Infeasible(f"budget {budget} is below the lowest candidate ({problem.bits[0]} bits)")
    return [below[-1]] * len(problem.names)


@dataclass
class KindSpec:
    """One allocation (weights or activations): the layers to choose for, candidates, metrics and sizes."""

    names: list[str]
    bits: list[int]
    ssim: np.ndarray
    sqnr: np.ndarray
    sizes: np.ndarray
    groups: Mapping[str, str]
    fixed_cost: int = 0  # size x bits of the layers not chosen here (unmeasured, protected)
    fixed_size: int = 0
    fixed: dict = field(default_factory=dict)  # {layer: bits} of every layer not chosen here

    def problem(self, which: Sequence[int], metric: str) -> Problem:
        scores = self.ssim if metric == "ssim" else self.sqnr
        return Problem([self.names[i] for i in which], self.bits, scores[list(which)], self.sizes[list(which)])

    def free_budget(self, budget: float) -> float:
        """The average the chosen layers may reach once the fixed layers' cost is paid."""
        total = int(self.sizes.sum()) + self.fixed_size
        return (budget * total - self.fixed_cost) / max(int(self.sizes.sum()), 1)


def split_budget(spec: KindSpec, budget: float, ratio: float) -> tuple[float, float]:
    """MixDQ's group split: the content layers' average budget is `ratio` x the free average, the quality
    layers take what keeps the size-weighted total at the free average."""
    free = spec.free_budget(budget)
    content = np.array([spec.groups[n] == "content" for n in spec.names])
    pc, pq = int(spec.sizes[content].sum()), int(spec.sizes[~content].sum())
    b_content = ratio * free if pc else 0.0
    b_quality = (free * (pc + pq) - b_content * pc) / pq if pq else 0.0
    lo, hi = min(spec.bits), max(spec.bits)
    for name, b, p in (("content", b_content, pc), ("quality", b_quality, pq)):
        if p and not (lo - 1e-9 <= b):
            raise Infeasible(f"split {ratio}: the {name} group's budget {b:.3f} is below {lo} bits")
    # above the highest bits a group cannot spend it: cap it (the other group's budget is not raised)
    return min(b_content, hi), min(b_quality, hi)


def allocate(spec: KindSpec, allocator: str, budget: float, ratio: float = 1.0, seed: int = 0,
             time_limit: float = 10.0, solver: str = "scip") -> dict:
    """{"bits": {layer: bits}, "objective": {...}, "status"} of one allocator at one budget (and split)."""
    if allocator not in ALLOCATORS:
        raise ValueError(f"--allocator {allocator!r}: use one of {', '.join(ALLOCATORS)}")
    n = len(spec.names)
    content = [i for i in range(n) if spec.groups[spec.names[i]] == "content"]
    quality = [i for i in range(n) if spec.groups[spec.names[i]] != "content"]
    free = spec.free_budget(budget)
    choice, status = [0] * n, "OPTIMAL"
    if allocator in ("ilp", "sorting"):
        b_content, b_quality = split_budget(spec, budget, ratio)
        for which, metric, b in ((content, "ssim", b_content), (quality, "sqnr", b_quality)):
            prob = spec.problem(which, metric)
            if allocator == "ilp":
                res = solve_ilp(prob, b, time_limit, solver)
                sub, status = res["choice"], res["status"] if status == "OPTIMAL" else status
            else:  # most sensitive (lowest score at the lowest bits) first
                sub = greedy(prob, b, list(np.argsort(prob.scores[:, 0], kind="stable")))
            for j, i in enumerate(which):
                choice[i] = sub[j]
    elif allocator == "sqnr-only":  # one program over every layer on SQNR: the coupled metric
        res = solve_ilp(spec.problem(range(n), "sqnr"), free, time_limit, solver)
        choice, status = res["choice"], res["status"]
    elif allocator == "random":
        rng = np.random.default_rng(seed)
        choice = greedy(spec.problem(range(n), "sqnr"), free, list(rng.permutation(n)), rng=rng)
    else:
        choice = uniform(spec.problem(range(n), "sqnr"), free)
    whole = spec.problem(range(n), "sqnr")
    return {"bits": {spec.names[i]: spec.bits[k] for i, k in enumerate(choice)}, "status": status,
            "ratio": ratio, "budget": budget,
            "average": (whole.cost(choice) + spec.fixed_cost) / max(int(spec.sizes.sum()) + spec.fixed_size, 1),
            "objective": {"ssim_content": float(sum(spec.ssim[i, choice[i]] for i in content)),
                          "sqnr_quality": float(sum(spec.sqnr[i, choice[i]] for i in quality)),
                          "ssim_all": float(sum(spec.ssim[i, choice[i]] for i in range(n))),
                          "sqnr_all": float(sum(spec.sqnr[i, choice[i]] for i in range(n)))}}


def protected_layers(names: Sequence[str], sqnr_lowest: Sequence[float], frac: float) -> list[str]:
    """MixDQ's protection: the ~`frac` most sensitive activation layers (lowest SQNR at the lowest candidate:
    the one metric measured for every layer on one scale), at least one when frac > 0."""
    if frac <= 0 or not names:
        return []
    k = max(1, round(frac * len(names)))
    order = np.argsort(np.asarray(sqnr_lowest, dtype=np.float64), kind="stable")
    return [names[i] for i in order[:k]]


def pareto_front(points: Sequence[dict], x: str = "average", y: str = "objective") -> list[int]:
    """Indices of the points not dominated (lower or equal `x` with higher or equal `y`, one strictly); of equal
    points (budgets the allocation cannot spend) only the first."""
    keep = []
    for i, p in enumerate(points):
        dominated = any((q[x] <= p[x] and q[y] >= p[y]) and (q[x] < p[x] or q[y] > p[y]) for q in points)
        repeated = any(q[x] == p[x] and q[y] == p[y] for q in points[:i])
        if not (dominated or repeated):
            keep.append(i)
    return keep


def val_pick(points: Sequence[dict], budget: float, score: Callable[[dict], float]) -> int | None:
    """Index of the sweep point MixDQ keeps (its final pick on val prompts): among the frontier points
    ("frontier": True, pareto_front) whose budget is within `budget`, the one `score(point)` rates highest
    (val SSIM to FP); on a tie, the lower average. Each point scored gets "val_ssim"; None when no point
    qualifies."""
    # a sweep budget from linspace may sit a rounding error above the same budget typed as --w-budget
    contenders = [i for i, p in enumerate(points) if p.get("frontier") and p["budget"] <= budget + 1e-9]
    for i in contenders:
        points[i]["val_ssim"] = float(score(points[i]))
    if not contenders:
        return None
    return max(contenders, key=lambda i: (points[i]["val_ssim"], -points[i]["average"]))


def parse_sweep(text: str | None) -> list[float]:
    """'3:8:11' -> 11 budgets from 3 to 8; '4,5,6' -> those; None/'' -> []."""
    if not text:
        return []
    try:
        if ":" in text:
            lo, hi, n = text.split(":")
            n = int(n)
            if n < 1:
                raise ValueError
            return [float(v) for v in np.linspace(float(lo), float(hi), n)]
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--pareto-budgets {text!r}: give LO:HI:N (e.g. 3:8:11) or a comma list such as 3,4,6"
                         ) from None


def sqnr_scores(sqnr_db: np.ndarray, scale: str) -> np.ndarray:
    """Each layer's SQNR as the programs sum it. "db": the dB values, as MixDQ publishes (a layer raised from 8 to
    16 bits gains as much as one raised from 4 to 8, however bad the 4-bit one is). "power": minus the noise to
    signal power ratio 10^(-SQNR/10), which is what adds up across layers when their noises are independent, so
    one 15 dB layer outweighs many 60 dB ones."""
    if scale not in SQNR_SCALES:
        raise ValueError(f"--sqnr-scale {scale!r}: use one of {', '.join(SQNR_SCALES)}")
    sqnr_db = np.asarray(sqnr_db, dtype=np.float64)
    return sqnr_db if scale == "db" else -np.power(10.0, -sqnr_db / 10.0)


def kind_spec(rec: Mapping, kind: str, bits: Sequence[int], groups: Mapping[str, str],
              fixed: Mapping[str, int], kept: Mapping[str, int] | None = None, sqnr_scale: str = "db") -> KindSpec:
    """The allocation of `kind` ("w" weights, "a" activations) over the record's measured layers at `bits`.
    `fixed` {layer: bits} (the protected layers) are measured layers held at their bits: their cost counts
    against the budget. `kept` (layers the record did not measure) keep the state's bits outside the budget.
    `sqnr_scale`: how the SQNR scores enter the programs (sqnr_scores)."""
    sizes = rec["weight_numel"] if kind == "w" else rec["act_numel"]
    names = [n for n in rec["layers"] if n not in fixed]
    cols = [f"{kind}{b}" for b in bits]
    return KindSpec(names=names, bits=list(bits),
                    ssim=np.array([[rec["ssim"][n][c] for c in cols] for n in names]).reshape(len(names), len(cols)),
                    sqnr=sqnr_scores(np.array([[rec["sqnr"][n][c] for c in cols] for n in names]
                                              ).reshape(len(names), len(cols)), sqnr_scale),
                    sizes=np.array([sizes[n] for n in names], dtype=np.int64), groups=groups,
                    fixed_cost=int(sum(sizes[n] * b for n, b in fixed.items())),
                    fixed_size=int(sum(sizes[n] for n in fixed)), fixed={**(kept or {}), **fixed})


def mixdq_objective(spec: KindSpec, bits_of: Mapping[str, int]) -> int:
    """MixDQ's objective of any allocation of `spec`'s layers: the integer scores (`integer_scores`) of SSIM
    over the content layers plus those of SQNR over the quality layers (each group normalized on its own, as
    its program is), so that allocators and budgets compare on one scale."""
    total = 0
    for group, metric in (("content", "ssim"), ("quality", "sqnr")):
        which = [i for i, n in enumerate(spec.names) if (spec.groups[n] == "content") == (group == "content")]
        if not which:
            continue
        ints = integer_scores(spec.problem(which, metric).scores)
        total += int(sum(ints[j, spec.bits.index(bits_of[spec.names[i]])] for j, i in enumerate(which)))
    return total
