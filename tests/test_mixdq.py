"""MixDQ (issue 19): per-layer weight bits, metric-decoupled sensitivity, the integer-program allocation.

Solver: equal to brute force, on the budget, SDXL-sized in seconds, monotone sweep; sensitivity: reproducible,
resumable; every bad input of the issue fails with its named error before anything slow; one tiny-random
run sensitivity -> mixdq -> evaluate."""
import itertools
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.mixdq.allocation import (
    BudgetError,
    Infeasible,
    KindSpec,
    Problem,
    allocate,
    integer_scores,
    mixdq_objective,
    pareto_front,
    raisable,
    solve_ilp,
    sqnr_scores,
)
from pipeline.mixdq.groups import GroupError, layer_groups

STEPS = 1
ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def brute_force(p: Problem, budget: float) -> int:
    """The best integer objective over every allocation within the budget (what the program maximizes)."""
    ints, cap = integer_scores(p.scores), p.capacity(budget)
    return max(sum(int(ints[i, k]) for i, k in enumerate(c))
               for c in itertools.product(range(len(p.bits)), repeat=len(p.names)) if p.cost(c) <= cap)


def test_solver_equals_brute_force_and_spends_the_budget():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n, k = int(rng.integers(1, 7)), int(rng.integers(2, 4))
        bits = sorted(rng.choice([2, 3, 4, 6, 8, 16], k, replace=False).tolist())
        p = Problem([f"l{i}" for i in range(n)], bits, rng.normal(size=(n, k)), rng.integers(1, 30, n))
        budget = float(rng.uniform(bits[0], bits[-1]))
        res = solve_ilp(p, budget)
        ints = integer_scores(p.scores)
        assert sum(int(ints[i, c]) for i, c in enumerate(res["choice"])) == brute_force(p, budget), trial
        assert p.average(res["choice"]) <= budget  # within the budget ...
        assert raisable(p, res["choice"], budget) == []  # ... and no layer could take more bits
        best = max(p.average(c) for c in itertools.product(range(k), repeat=n) if p.average(c) <= budget)
        assert p.average(res["choice"]) <= best  # the largest achievable average is <= B (by construction)


def test_power_scale_protects_a_ruinous_layer_that_the_db_sum_sacrifices():
    """Three equal-size layers, bits {4, 8, 16}, budget 8: layer 0 is ruined at 4 bits (10 dB), layers 1-2 are
    fine at 8 (60 dB) and gain 70 dB more at 16. Summing dB (MixDQ as published) buys 16 bits for one of them by
    putting layer 0 at 4 bits; summing the noise power keeps layer 0 at 8, where the total noise is lowest."""
    sqnr = np.array([[10.0, 40.0, 70.0], [35.0, 60.0, 130.0], [35.0, 60.0, 130.0]])
    assert np.allclose(sqnr_scores(sqnr, "power"), -(10.0 ** (-sqnr / 10)))
    assert np.array_equal(sqnr_scores(sqnr, "db"), sqnr)
    picks, noise = {}, {}
    for scale in ("db", "power"):
        p = Problem(["l0", "l1", "l2"], [4, 8, 16], sqnr_scores(sqnr, scale), [1, 1, 1])
        choice = solve_ilp(p, 8.0)["choice"]
        picks[scale] = [p.bits[k] for k in choice]
        noise[scale] = float(sum(10.0 ** (-sqnr[i, k] / 10) for i, k in enumerate(choice)))
    assert picks["db"][0] == 4 and 16 in picks["db"]
    assert picks["power"] == [8, 8, 8]
    assert noise["power"] < noise["db"] / 100
    with pytest.raises(ValueError, match="--sqnr-scale 'linear'"):
        sqnr_scores(sqnr, "linear")


def test_sdxl_sized_problem_solves_in_seconds():
    rng = np.random.default_rng(1)
    n = 794  # SDXL's quantized layers
    base = rng.gamma(1.0, 1.0, n)
    scores = -base[:, None] * np.array([16.0, 4.0, 1.0]) + rng.normal(0, 0.01, (n, 3))
    p = Problem([f"l{i}" for i in range(n)], [2, 4, 8], scores, rng.integers(1000, 5_000_000, n))
    t0 = time.time()
    res = solve_ilp(p, 4.0)
    assert time.time() - t0 <= 5.0
    assert res["status"] == "OPTIMAL" and p.average(res["choice"]) <= 4.0
    assert raisable(p, res["choice"], 4.0) == []


def synthetic_spec(n=12, seed=0) -> KindSpec:
    """Scores that rise with the bits (SSIM to 1, SQNR ~6 dB per bit), sizes of a few orders of magnitude."""
    rng = np.random.default_rng(seed)
    names = [f"down.{i}.attn2.to_k" if i % 3 == 0 else f"down.{i}.conv1" for i in range(n)]
    bits = [2, 4, 8]
    hard = rng.gamma(2.0, 1.0, (n, 1))
    sqnr = np.array(bits, dtype=float)[None] * 6.0 - 10 * hard + rng.normal(0, 0.2, (n, 3))
    ssim = 1 - hard * np.array([0.1, 0.02, 0.001])[None]
    return KindSpec(names, bits, ssim, sqnr, rng.integers(100, 100_000, n), layer_groups(names))


def test_sweep_is_monotone_and_the_frontier_non_dominated():
    spec = synthetic_spec()
    points, objectives = [], []
    for budget in np.linspace(3, 8, 11):
        res = allocate(spec, "ilp", float(budget))
        assert res["average"] <= budget + 1e-9
        points.append({"average": res["average"], "objective": mixdq_objective(spec, res["bits"])})
        objectives.append(points[-1]["objective"])
    assert all(b >= a for a, b in zip(objectives, objectives[1:])), objectives  # never falls as the budget grows
    front = [points[i] for i in pareto_front(points)]
    for p in front:  # no saved point is dominated by any point of the sweep
        assert not any(q["average"] <= p["average"] and q["objective"] >= p["objective"] and q != p for q in points)
    # a known answer: (3, 2) is dominated by (3, 3), (4, 3) by (3, 3), the repeat of (2, 1) is kept once
    known = [{"average": a, "objective": o} for a, o in ((2, 1), (3, 3), (3, 2), (4, 3), (5, 5), (2, 1))]
    assert pareto_front(known) == [0, 1, 4]
    # and the program is at least as good as its baselines on its own objective, at every split it is given
    for alloc in ("sorting", "sqnr-only", "random", "uniform"):
        assert mixdq_objective(spec, allocate(spec, alloc, 4.0)["bits"]) <= \
            mixdq_objective(spec, allocate(spec, "ilp", 4.0)["bits"])


def test_budget_outside_the_range_and_infeasible_splits():
    spec = synthetic_spec()
    with pytest.raises(Infeasible, match="below"):
        allocate(spec, "ilp", 2.0, ratio=0.5)  # the content group would get 1 bit
    from pipeline.mixdq.allocation import check_budget

    for bad in (1.5, 9.0, math.nan):
        with pytest.raises(BudgetError, match="outside the candidate range"):
            check_budget(bad, [2, 4, 8], "--w-budget")


def test_groups_follow_the_documented_rule_and_refuse_an_empty_group():
    names = ["conv_in", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
             "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2", "down_blocks.0.resnets.0.conv1"]
    groups = layer_groups(names)
    assert [groups[n] for n in names] == ["quality", "quality", "content", "content", "quality"]
    assert layer_groups(names, r"attn1")[names[1]] == "content"  # overridden
    with pytest.raises(GroupError, match="leaves the content group empty"):
        layer_groups(names, r"nothing-matches")
    with pytest.raises(GroupError, match="quality group empty"):
        layer_groups(names, r".")


# ---------------------------------------------------------------------------
# per-layer weight bits
# ---------------------------------------------------------------------------
def tiny_unet(seed=0):
    """tiny-random's UNet alone (its text encoder and VAE are not needed here)."""
    from diffusers import UNet2DConditionModel

    from pipeline.models import TINY_UNET_CONFIG

    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY_UNET_CONFIG)


def random_call(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), 500, torch.randn(2, 77, 64, generator=g)


def test_weight_options_switch_per_layer_and_reload_bit_exactly(tmp_path):
    from pipeline.metrics.cost import average_weight_bits, layer_stats, model_size_bytes
    from pipeline.quant import (
        QuantConfig,
        get_weight_bits,
        load_quantized,
        quant_layers,
        quantize_unet,
        save_quantized,
        set_weight_bits,
    )
    from pipeline.quant.state import quantizer_state

    unet = quantize_unet(tiny_unet(), QuantConfig(w_bits=8, w_bit_options=[2, 4, 8], a_bits=32, a_bit_options=[32]))
    layers = quant_layers(unet)
    names = list(layers)
    layer = layers[names[0]]
    for b in (2, 4, 8):  # each option is its own per-channel grid at its bits
        wq = layer.weight_quantizer(b)
        assert wq.n_bits == b and len(torch.unique(wq(layer.weight)[0])) <= 2 ** b
    with torch.no_grad():
        x = random_call(unet)
        out8 = unet(*x).sample
        set_weight_bits(unet, 2)
        out2 = unet(*x).sample
        policy = {n: [2, 4, 8][i % 3] for i, n in enumerate(names)}
        set_weight_bits(unet, policy)
        mixed = unet(*x).sample
    assert not torch.equal(out8, out2) and not torch.equal(mixed, out2)
    with pytest.raises(ValueError, match="3-bit weights is not a calibrated option"):
        set_weight_bits(unet, {names[0]: 3})
    stats = layer_stats(unet)
    want = sum(stats[n].weight_numel * b for n, b in policy.items()) / sum(stats[n].weight_numel for n in policy)
    assert average_weight_bits(stats, policy) == pytest.approx(want)
    fp_bytes = sum(p.numel() * 4 for p in unet.parameters() if not any(p is m.weight for m in layers.values()))
    q_bytes = sum(m.weight.numel() * b / 8 + 8 * m.weight.shape[0] for m, b in zip(layers.values(), policy.values()))
    assert model_size_bytes(unet) == int(fp_bytes + q_bytes)

    save_quantized(unet, tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "quant_config.json").read_text())
    assert meta["w_policy"] == policy and meta["quant_config"]["w_bit_options"] == [2, 4, 8]
    again, _, _ = load_quantized(tiny_unet(), tmp_path / "s")
    assert dict(get_weight_bits(again)) == policy
    with torch.no_grad():
        assert torch.equal(again(*x).sample, mixed)  # bit-exact

    # one weight option: the same state keys and JSON as before per-layer bits existed
    plain = quantize_unet(tiny_unet(), QuantConfig(w_bits=8))
    assert not any(".w_options." in k for k in quantizer_state(plain))
    assert "w_bit_options" not in plain.quant_config.to_dict()


def test_adaround_learns_every_weight_option():
    """Q-Diffusion's weight phase on one lone-layer unit fits AdaRound per option: each option's rounding moves
    off round-to-nearest and its held-out error does not rise above it."""
    from pipeline.calibration.qdiff import learn_weights
    from pipeline.quant import QuantConfig, quant_layers, quantize_unet

    unet = quantize_unet(tiny_unet(), QuantConfig(w_bits=8, w_bit_options=[2, 4, 8], a_bits=32, a_bit_options=[32],
                                                  weight_rounding="adaround"))
    name = "down_blocks.0.resnets.0.conv1"
    layer = quant_layers(unet)[name]
    g = torch.Generator().manual_seed(0)
    items = []
    for _ in range(6):
        x = torch.randn(4, layer.in_features, 8, 8, generator=g)
        items.append({"args": (x,), "kwargs": {}, "out": layer.fp_forward(x).detach(), "step": 0})
    nearest = {b: layer.weight_quantizer(b).round_up.clone() for b in (2, 4, 8)}
    metrics = learn_weights(unet, name, layer, items, iters_w=30, trainer_kwargs={"logger": False})
    for b in (2, 4, 8):
        m = metrics if b == 8 else metrics[f"w{b}"]
        assert m["mse_adaround"] <= m["mse_rtn"] * 1.05, (b, m)
        assert not torch.equal(layer.weight_quantizer(b).round_up, nearest[b]), b
    assert layer.w_bits == 8  # left at the default option


def test_mixed_labels():
    from pipeline.evaluation.methods import format_bits

    assert format_bits({2, 4, 8}, [4, 8, 16]) == "W{2,4,8}A{4,8,16}"
    assert format_bits(4, [16]) == "W4A16"


# ---------------------------------------------------------------------------
# sensitivity, and the stages end to end (tiny-random)
# ---------------------------------------------------------------------------
LAYERS = ["conv_in", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]


def quick_state(path, a_bit_options=(8, 16)):
    """A min-max state of tiny-random with weight options 2,4,8, observed on one random UNet call (as
    tests/test_evaluation.py's): enough to measure and allocate."""
    from pipeline.models import tiny_pipeline
    from pipeline.quant import QuantConfig, act_banks, observing, quantize_unet, save_quantized

    unet = quantize_unet(tiny_pipeline(0).unet, QuantConfig(w_bits=8, w_bit_options=[2, 4, 8], a_bits=8,
                                                  a_bit_options=list(a_bit_options), n_steps=STEPS, bos_aware=True))
    with observing(unet), torch.no_grad():
        unet(*random_call(unet))
    for bank in act_banks(unet).values():
        bank.finalize()
    save_quantized(unet, path, extra={"method": "naive", "model": "tiny-random", "steps": STEPS, "guidance": 7.5})
    return path


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A state, and the sensitivity stage's record of two layers, one per group (weights 2,8; activations 8)."""
    from pipeline.fit import main

    run = tmp_path_factory.mktemp("mixdq")
    state = quick_state(run / "quant")
    t0 = time.time()
    main(["sensitivity", "--model", "tiny-random", "--run-dir", str(run), "--quant-state", str(state), "--n", "1",
          "--layers", "^(conv_in|down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k)$",
          "--w-bit-options", "2,8", "--a-bit-options", "8"])
    return run, state, time.time() - t0


def test_sensitivity_is_reproducible_and_resumes(tmp_path):
    from pipeline.mixdq.sensitivity import Measurement, Probe, measure_sensitivity
    from pipeline.models import load_quantized_pipeline
    from pipeline.quant import set_quant_state

    state = quick_state(tmp_path / "quant")
    pipe = load_quantized_pipeline("tiny-random", str(state))
    probe = Probe(["a red cube"], [7], STEPS, 7.5)
    first = measure_sensitivity(pipe, probe, [2], [], layers=LAYERS)
    assert first["sqnr"]["conv_in"]["w2"] < 40 and first["ssim"]["conv_in"]["w2"] < 1
    whole = Measurement(pipe, probe)  # the same probe with every layer quantized (W8A8): far noisier than one
    set_quant_state(pipe.unet, weight=True, act=True)  # layer at 2 bits with the rest in full precision
    assert first["sqnr"][LAYERS[1]]["w2"] > whole.score()["sqnr"] + 10

    progress = tmp_path / "progress" / "progress.json"
    progress.parent.mkdir()
    seen = []

    def killed(layer, kind, bits):
        if layer == LAYERS[1]:
            raise KeyboardInterrupt  # a kill after the first layer was measured and saved
        seen.append(layer)

    with pytest.raises(KeyboardInterrupt):
        measure_sensitivity(pipe, probe, [2], [], progress, {"run": 1}, layers=LAYERS, on_measured=killed)
    assert list(json.loads(progress.read_text())["ssim"]) == [LAYERS[0]]
    again = []
    resumed = measure_sensitivity(pipe, probe, [2], [], progress, {"run": 1}, layers=LAYERS,
                                  on_measured=lambda layer, kind, bits: again.append(layer))
    assert again == [LAYERS[1]]  # only what was left
    assert resumed == first  # and the same numbers: fixed seeds reproduce every measurement, resumed or not


def test_sensitivity_stage_writes_the_record(measured):
    from pipeline.mixdq.sensitivity import read_sensitivity

    run, _, seconds = measured
    rec = read_sensitivity(run / "sensitivity")
    assert rec["candidates"] == ["w2", "w8", "a8"] and rec["layers"] == LAYERS
    assert rec["groups"]["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"] == "content"
    for n in rec["layers"]:  # fewer bits, more noise: both metrics agree in direction
        assert rec["sqnr"][n]["w2"] < rec["sqnr"][n]["w8"]
        assert rec["ssim"][n]["w2"] <= rec["ssim"][n]["w8"] + 1e-6
    assert (run / "sensitivity" / "heatmap.png").is_file() and "| conv_in |" in (run / "sensitivity" /
                                                                                 "table.md").read_text()


def test_mixdq_then_evaluate(measured):
    from pipeline.fit import main

    run, state, _ = measured
    t0 = time.time()
    out = main(["mixdq", "--model", "tiny-random", "--run-dir", str(run), "--sensitivity", str(run / "sensitivity"),
                "--w-budget", "5", "--a-budget", "8", "--protect-frac", "0", "--w-splits", "0.75",
                "--pareto-budgets", "2:8:4"])
    policy = json.loads((out / "policy.json").read_text())
    rec = json.loads((run / "sensitivity" / "sensitivity.json").read_text())
    sizes = rec["weight_numel"]
    measured_layers = rec["layers"]
    avg = sum(sizes[n] * policy["weights"][n] for n in measured_layers) / sum(sizes[n] for n in measured_layers)
    assert avg <= 5.0 and set(policy["weights"][n] for n in measured_layers) <= {2, 8}
    assert all(policy["weights"][n] == 8 for n in policy["weights"] if n not in measured_layers)  # kept
    pareto = json.loads((out / "pareto.json").read_text())
    assert [p["feasible"] for p in pareto] == [False, True, True, True]  # 2 bits: the content group gets 1.5
    objective = [p["objective"] for p in pareto[1:]]
    assert objective == sorted(objective) and any(p.get("frontier") for p in pareto)
    assert any(c.get("chosen") for c in json.loads((out / "candidates.json").read_text()))
    main(["evaluate", "--model", "tiny-random", "--run-dir", str(run), "--quant-states", f"[{state},{out}]",
          "--n", "2", "--steps", str(STEPS), "--fid", "false", "--sfid", "false"])
    table = (run / "evaluate" / "results.md").read_text()
    assert "mixdq-ilp" in table and "W{2,8}A8 (avg W" in table
    print(f"mixdq + evaluate: {time.time() - t0:.1f} s")


def with_record(run, tmp_path, edit):
    rec = json.loads((run / "sensitivity" / "sensitivity.json").read_text())
    edit(rec)
    (tmp_path / "bad").mkdir(exist_ok=True)
    path = tmp_path / "bad" / "sensitivity.json"
    path.write_text(json.dumps(rec))
    return path.parent


@pytest.mark.parametrize("case, error, match", [
    ("budget", "BudgetError", "--w-budget 1.5 is outside the candidate range"),
    ("bits", "ValueError", r"bits \[3\] have no quantizer in the state"),
    ("unmeasured", "SensitivityMismatch", r"bits \[4\] were not measured"),
    ("state", "SensitivityMismatch", "another quantized state"),
    ("model", "SensitivityMismatch", "another model"),
    ("steps", "SensitivityMismatch", "measured with 1 sampling steps"),
    ("regex", "GroupError", "leaves the content group empty"),
    ("nan", "NonFiniteSensitivity", "not finite"),
    ("scale", "ValueError", "--sqnr-scale 'dbm'"),
])
def test_bad_input_fails_early_by_name(measured, tmp_path, case, error, match):
    from pipeline.fit import main
    from pipeline.mixdq import allocation, groups, sensitivity

    run, state, _ = measured
    sens = str(run / "sensitivity")
    args = ["--w-budget", "4"]
    if case == "budget":
        args = ["--w-budget", "1.5"]
    elif case == "bits":
        args += ["--w-bit-options", "3,8"]
    elif case == "unmeasured":
        args += ["--w-bit-options", "4,8"]
    elif case == "state":
        sens = with_record(run, tmp_path, lambda r: r["signature"].update(quant_state={"x": "0"}))
    elif case == "model":
        sens = with_record(run, tmp_path, lambda r: r["signature"].update(model="0" * 64))
    elif case == "steps":
        args += ["--steps", "3"]
    elif case == "regex":
        args += ["--content-regex", "no-such-layer"]
    elif case == "scale":
        args += ["--sqnr-scale", "dbm"]
    elif case == "nan":
        sens = with_record(run, tmp_path, lambda r: r["sqnr"]["conv_in"].update(w2=float("nan")))
    kinds = {**vars(allocation), **vars(groups), **vars(sensitivity), "ValueError": ValueError}
    out = tmp_path / "run"
    with pytest.raises(kinds[error], match=match):
        main(["mixdq", "--model", "tiny-random", "--run-dir", str(out), "--sensitivity", str(sens),
              "--quant-state", str(state), *args])
    assert not (out / "mixdq").exists()  # before anything was written (or loaded)


def test_sensitivity_callback_writes_table_and_heatmap(tmp_path):
    import lightning as L

    from callbacks.sensitivity import SensitivityCallback
    from pipeline.engine import make_trainer
    from pipeline.mixdq.sensitivity import Probe
    from pipeline.models import load_quantized_pipeline

    pipe = load_quantized_pipeline("tiny-random", str(quick_state(tmp_path / "quant")))

    class Nothing(L.LightningModule):  # the fit the callback observes: one step of nothing
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, i):
            return (self.p - 1).pow(2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD([self.p], lr=0.1)

    cb = SensitivityCallback(pipe, Probe(["a red cube"], [0], STEPS, 7.5), tmp_path / "sens", w_bits=[2],
                             layers=r"^conv_in$")
    make_trainer({"callbacks": [cb]}, forced={"max_steps": 1}).fit(Nothing(), [torch.zeros(1)])
    assert cb.records and cb.records[0]["layers"] == ["conv_in"]
    assert (tmp_path / "sens" / "sensitivity_0.png").is_file() and (tmp_path / "sens" / "sensitivity_0.md").is_file()


@pytest.mark.slow
def test_sensitivity_under_ddp_two_processes_give_the_file_of_one(tmp_path):
    """Layers dealt to 2 CPU processes, each with its own progress file: rank 0's merged sensitivity.json is the
    1-process file (every score bit-identical; only the wall time differs)."""
    import os
    import subprocess
    import sys

    state = quick_state(tmp_path / "quant")
    records = {}
    for devices in (1, 2):
        cmd = [sys.executable, "-m", "pipeline.fit", "sensitivity", "--model", "tiny-random", "--quant-state",
               str(state), "--n", "1", "--layers", r"^(conv_in|conv_out|.*attn2\.to_k)$", "--w-bit-options", "2",
               "--a-bit-options", "8", "--run-dir", str(tmp_path / f"d{devices}"), "--trainer.accelerator", "cpu",
               "--trainer.devices", str(devices), "--trainer.strategy", "ddp", "--trainer.enable_progress_bar",
               "false"]
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        records[devices] = json.loads((tmp_path / f"d{devices}" / "sensitivity" / "sensitivity.json").read_text())
        progress = sorted(p.name for p in (tmp_path / f"d{devices}" / "sensitivity_progress").iterdir())
        assert progress == [f"progress_rank{r}.json" for r in range(devices)]  # one file per process
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr  # both processes joined the process group
    shares = [json.loads((tmp_path / "d2" / "sensitivity_progress" / f"progress_rank{r}.json").read_text())["ssim"]
              for r in (0, 1)]
    layers = records[1]["layers"]
    assert len(layers) >= 3 and [list(s) for s in shares] == [layers[0::2], layers[1::2]]  # dealt, none twice
    one, two = ({k: v for k, v in r.items() if k != "seconds"} for r in (records[1], records[2]))
    assert json.dumps(two) == json.dumps(one)  # the same file: numbers and key order (layers in state order)


def test_probe_sets_are_disjoint_and_their_agreement_is_spearman(measured, tmp_path):
    """--probe-set 1 draws other prompts and other noise seeds than set 0 (set 0 is the default draw);
    probe_agreement ranks the layers per metric at the lowest w and a candidate and refuses overlapping sets."""
    from pipeline.fit import main
    from pipeline.mixdq.sensitivity import probe_agreement, read_sensitivity

    run, state, _ = measured
    zero = read_sensitivity(run / "sensitivity")
    main(["sensitivity", "--model", "tiny-random", "--run-dir", str(tmp_path), "--quant-state", str(state), "--n", "1",
          "--probe-set", "1", "--layers", "^(conv_in|down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k)$",
          "--w-bit-options", "2,8", "--a-bit-options", "8"])
    one = read_sensitivity(tmp_path / "sensitivity")
    assert not set(one["signature"]["prompts"]) & set(zero["signature"]["prompts"])
    assert not set(one["signature"]["seeds"]) & set(zero["signature"]["seeds"])
    assert one["ssim"] != zero["ssim"]  # other prompts, other scores
    agreement = probe_agreement(zero, one)
    assert set(agreement) == {"layers", "w2", "a8"} and agreement["layers"] == 2  # the lowest of each kind only
    assert abs(agreement["w2"]["sqnr"]) == pytest.approx(1.0)  # two layers: the ranks agree or swap

    layers = [f"l{i}" for i in range(5)]

    def record(prompt, w2, a8):
        return {"layers": layers, "candidates": ["w2", "w8", "a8"], "signature": {"prompts": [prompt]},
                "ssim": {n: {"w2": w2[i], "w8": 1.0, "a8": a8[i]} for i, n in enumerate(layers)},
                "sqnr": {n: {"w2": -w2[i], "w8": 50.0, "a8": a8[i] * 3} for i, n in enumerate(layers)}}

    base = record("p", [0.1, 0.5, 0.3, 0.9, 0.7], [1, 2, 3, 4, 5])
    same_order = record("q", [0.2, 0.6, 0.4, 0.95, 0.8], [1, 1.5, 3, 7, 9])  # other values, same ranks
    moved = record("q", [0.1, 0.3, 0.5, 0.9, 0.7], [5, 4, 3, 2, 1])  # two layers swapped; a8 reversed
    assert probe_agreement(base, same_order)["w2"] == pytest.approx({"ssim": 1.0, "sqnr": 1.0})
    got = probe_agreement(base, moved)
    assert got["w2"]["ssim"] == pytest.approx(0.9) and got["a8"]["sqnr"] == pytest.approx(-1.0)
    assert probe_agreement(base, record("q", [0.5] * 5, [1, 2, 3, 4, 5]))["w2"]["ssim"] is None  # all tied
    with pytest.raises(ValueError, match="share prompts.*different --probe-set"):
        probe_agreement(base, record("p", [0.1] * 5, [1] * 5))
    with pytest.raises(ValueError, match="--probe-set 99 needs train prompts 99..99 of --prompts builtin"):
        main(["sensitivity", "--model", "tiny-random", "--run-dir", str(tmp_path / "x"), "--quant-state", str(state),
              "--n", "1", "--probe-set", "99", "--prompts", "builtin"])


def test_val_pick_takes_the_frontier_point_within_the_budget_closest_to_fp():
    from pipeline.mixdq.allocation import val_pick

    def sweep():
        return [{"budget": 3.0, "average": 2.9, "frontier": True}, {"budget": 4.0, "average": 3.8, "frontier": True},
                {"budget": 5.0, "average": 3.8},  # dominated (a repeat): never scored
                {"budget": 6.0, "average": 5.9, "frontier": True},
                {"budget": 8.0, "average": 7.9, "frontier": True}]  # beyond the budget: never scored

    val = {2.9: 0.7, 3.8: 0.9, 5.9: 0.8, 7.9: 0.99}  # the val optimum within 6 bits is not its largest point
    points = sweep()
    assert val_pick(points, 6.0, lambda p: val[p["average"]]) == 1
    assert [p.get("val_ssim") for p in points] == [0.7, 0.9, None, 0.8, None]
    tied = sweep()
    assert val_pick(tied, 6.0, lambda p: 0.5) == 0  # a tie: the cheaper point
    assert val_pick(sweep(), 2.0, lambda p: 1.0) is None  # nothing within the budget


def test_mixdq_picks_a_sweep_point_on_val_and_writes_it(measured, tmp_path, monkeypatch):
    """--w-budget 8 sweeps 2,4,6,8: the frontier within 8 bits is the 2.0 and 8.0 points. Val scores favouring
    the cheaper point (made up: on tiny-random 8 bits always look closer to FP) must make it the written state,
    not the allocation at --w-budget."""
    from pipeline.fit import main
    from pipeline.stages import mixdq as stage

    run, state, _ = measured
    made_up = iter([0.9, 0.5])  # scored in sweep order: the 2.0 point, then the 8.0 point
    monkeypatch.setattr(stage, "ssim_to", lambda fp, images: next(made_up))
    out = main(["mixdq", "--model", "tiny-random", "--run-dir", str(tmp_path), "--sensitivity",
                str(run / "sensitivity"), "--w-budget", "8", "--a-budget", "8", "--protect-frac", "0", "--w-splits",
                "1.0", "--pareto-budgets", "2:8:4", "--val-n", "1"])
    pareto = json.loads((out / "pareto.json").read_text())
    assert [(p["budget"], p.get("frontier", False), p.get("val_ssim")) for p in pareto] == \
        [(2.0, True, 0.9), (4.0, False, None), (6.0, False, None), (8.0, True, 0.5)]
    assert [p.get("picked", False) for p in pareto] == [True, False, False, False]
    chosen = next(c for c in json.loads((out / "candidates.json").read_text()) if c.get("chosen"))
    assert chosen["w"]["average"] == 8.0  # what --w-budget alone would have written
    policy = json.loads((out / "policy.json").read_text())
    rec = json.loads((run / "sensitivity" / "sensitivity.json").read_text())
    sizes, layers = rec["weight_numel"], rec["layers"]
    avg = sum(sizes[n] * policy["weights"][n] for n in layers) / sum(sizes[n] for n in layers)
    assert policy["picked_budget"] == 2.0 and avg == pytest.approx(2.0)  # the picked point is the state written
    from pipeline.models import tiny_pipeline
    from pipeline.quant import get_weight_bits, load_quantized

    unet, _, _ = load_quantized(tiny_pipeline(0).unet, out)
    assert {n: b for n, b in get_weight_bits(unet).items() if n in layers} == {n: 2 for n in layers}


def test_sensitivity_resumes_from_every_process_progress_file(measured, tmp_path):
    """A rerun (here on one process) skips a layer that another process's file holds and merges its scores;
    a file of other settings is refused by name, and discarded under --overwrite."""
    from pipeline.errors import RunDirError
    from pipeline.fit import main
    from pipeline.mixdq.sensitivity import rank_progress_file

    run, state, _ = measured
    whole = json.loads((run / "sensitivity" / "sensitivity.json").read_text())
    args = ["sensitivity", "--model", "tiny-random", "--run-dir", str(tmp_path), "--quant-state", str(state), "--n",
            "1", "--layers", "^(conv_in|down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k)$",
            "--w-bit-options", "2,8", "--a-bit-options", "8"]
    kept = LAYERS[1]  # as if process 1 of a 2-process run had measured it before the kill, with marked scores
    marked = {m: {c: v + 0.5 for c, v in whole[m][kept].items()} for m in ("ssim", "sqnr")}
    other = rank_progress_file(tmp_path / "sensitivity_progress", 1)
    other.parent.mkdir()
    other.write_text(json.dumps({"signature": whole["signature"], "ssim": {kept: marked["ssim"]},
                                 "sqnr": {kept: marked["sqnr"]}}))
    main(args)
    rec = json.loads((tmp_path / "sensitivity" / "sensitivity.json").read_text())
    assert rec["ssim"][kept] == marked["ssim"] and rec["sqnr"][kept] == marked["sqnr"]  # taken, not measured
    assert rec["ssim"][LAYERS[0]] == whole["ssim"][LAYERS[0]]  # the other one measured here, as before
    own = json.loads(rank_progress_file(tmp_path / "sensitivity_progress", 0).read_text())
    assert list(own["ssim"]) == [LAYERS[0]]

    other.write_text(json.dumps({"signature": {**whole["signature"], "steps": 9}, "ssim": {}, "sqnr": {}}))
    shutil.rmtree(tmp_path / "sensitivity")  # no finished results in the way: the progress is what is checked
    with pytest.raises(RunDirError, match="sensitivity progress of other settings.*steps.*--overwrite true"):
        main(args)
    main(args + ["--overwrite", "true"])  # discarded: every layer measured again
    rec = json.loads((tmp_path / "sensitivity" / "sensitivity.json").read_text())
    assert rec["ssim"] == whole["ssim"] and not other.exists()
