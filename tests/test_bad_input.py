"""Bad input to every stage: each is refused as a user error (pipeline.errors.USER_ERRORS) whose one-line
message names the flag or the file and the fix, before anything is written to --run-dir.

Most cases fail in `check_flags` or on a cheap read, before any model loads; the few that need the model
use the seeded tiny pipeline."""
import dataclasses
import importlib
import json
import subprocess
import sys

import pytest
import torch

from pipeline.engine import check_flags, flag_ranges, numeric_fields
from pipeline.errors import USER_ERRORS
from pipeline.fit import STAGES, config_class, main

TINY = ["--model", "tiny-random", "--steps", "2"]
BUILTIN = ["--prompts", "builtin"]


def test_every_numeric_flag_has_a_range():
    """A numeric field without a range (a new flag) fails here: add it to pipeline.engine.FLAG_RANGES."""
    missing = {f"{name}: {field}" for name, stage in STAGES.items() for cls in [config_class(stage)]
               for field in numeric_fields(cls) if field not in flag_ranges(cls)}
    assert not missing, f"numeric flags without a range in pipeline.engine.FLAG_RANGES: {sorted(missing)}"
    assert len({f for stage in STAGES.values() for f in numeric_fields(config_class(stage))}) > 50


@pytest.mark.parametrize("name", list(STAGES))
def test_every_default_is_in_range(name):
    check_flags(config_class(STAGES[name])())


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_function_checks_its_flags_first(tmp_path, name):
    """Through the Python API too (pipeline.api calls the same functions): the check is in the stage's path."""
    stage = STAGES[name]
    cfg = config_class(stage)(model="tiny-random", seed=-1, run_dir=str(tmp_path / "run"))
    fn = getattr(importlib.import_module(stage.module), stage.function)
    with pytest.raises(USER_ERRORS, match=r"^--seed -1 must be in \[0, 4294967295\]$"):
        fn(cfg) if not stage.trainer else fn(cfg, trainer=None)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Prompt files and artifact folders, good and broken, named in the cases as {name}."""
    from pipeline.artifacts import save_artifact
    from pipeline.models import tiny_pipeline
    from pipeline.qlip.q2b import Q2B_FORMAT
    from pipeline.qlip.t2q import T2Q_FORMAT
    from pipeline.quant import QuantConfig, quantize_unet, save_quantized

    d = tmp_path_factory.mktemp("inputs")
    (d / "binary.txt").write_bytes(bytes(range(128, 256)) * 4)  # no UTF-8 text starts with a continuation byte
    (d / "empty.txt").write_text("\n  \n")
    unet = tiny_pipeline(0).unet
    quantize_unet(unet, QuantConfig(w_bits=8, a_bits=8, a_bit_options=[8, 16, 32], n_steps=2))
    state = save_quantized(unet, d / "state")  # a library-written state: no manifest checks its JSON
    renamed = save_quantized(unet, d / "renamed")
    meta = json.loads((renamed / "quant_config.json").read_text())
    meta["quant_cfg"] = meta.pop("quant_config")
    (renamed / "quant_config.json").write_text(json.dumps(meta))
    zeros = {"x": torch.zeros(1)}
    t2q = save_artifact(d / "t2q", T2Q_FORMAT, zeros, {"text_tower": {"model": "tiny-random"}, "hidden_dim": 8})
    q2b = save_artifact(d / "q2b", Q2B_FORMAT, zeros, {"layers": [], "n_steps": 2, "options": [8, 16]})
    return {"binary": d / "binary.txt", "empty": d / "empty.txt", "state": state, "renamed": renamed,
            "t2q_renamed": t2q, "q2b_renamed": q2b}


GEN = ["generate", *TINY, *BUILTIN]
CALI = ["calibrate", *TINY, *BUILTIN]
Q2B = ["q2b", "--model", "tiny-random", *BUILTIN, "--quant-state", "{state}", "--criterion", "length"]
EVAL = ["evaluate", *TINY, "--in-domain", "builtin", "--n", "2"]
CASES = {
    # ranges (pipeline.engine.FLAG_RANGES), one stage after another
    "cali-n": (["calibrate", *TINY, *BUILTIN, "--cali-n", "0"], r"--cali-n 0 must be >= 1"),
    "n": ([*GEN, "--n", "0"], r"--n 0 must be >= 1"),
    "steps": ([*GEN, "--steps", "-3"], r"--steps -3 must be >= 1"),
    "guidance": ([*GEN, "--guidance", "-1"], r"--guidance -1.0 must be >= 0"),
    "guidance-yaml-nan": ([*GEN, "--guidance", ".nan"], r"--guidance nan must be finite and >= 0"),
    "guidance-nan": ([*GEN, "--guidance", "nan"], r"--guidance: expected a finite number or null \(the default\), "
                                                  r"got nan"),
    "seed": ([*GEN, "--seed", str(2**32)], r"--seed 4294967296 must be in \[0, 4294967295\]"),
    "batch-size": ([*CALI, "--batch-size", "0"], r"--batch-size 0 must be >= 1"),
    "relax-tau": ([*CALI, "--relax-tau", "1"], r"--relax-tau 1.0 must be in \[0, 1\)"),
    "ram-cap-gib": ([*CALI, "--ram-cap-gib", "-1"], r"--ram-cap-gib -1.0 must be >= 0"),
    "iters-w": ([*CALI, "--iters-w", "-1"], r"--iters-w -1 must be >= 0"),
    "w-bits": ([*CALI, "--w-bits", "0"], r"--w-bits 0 must be an integer in 2..16, or 32 \(full precision\)"),
    "a-bits": ([*CALI, "--a-bits", "17"], r"--a-bits 17 must be an integer in 2..16, or 32"),
    "w-bits-type": ([*CALI, "--w-bits", "x"], r"--w-bits: expected an integer, got x"),
    "val-n": ([*Q2B, "--val-n", "-1"], r"--val-n -1 must be >= 0"),
    "tau-end": ([*Q2B, "--tau-end", "0"], r"--tau-end 0.0 must be > 0"),
    "plot-every": ([*Q2B, "--plot-every", "0"], r"--plot-every 0 must be >= 1"),
    "t2q-lr": (["t2q", "--lr", "0"], r"--lr 0.0 must be > 0"),
    "t2q-epochs": (["t2q", "--epochs", "0"], r"--epochs 0 must be >= 1"),
    "score-limit": (["score", *TINY, "--limit", "0"], r"--limit 0 must be >= 1"),
    "norm-quantile": (["score", *TINY, "--norm-quantile", "0.5"], r"--norm-quantile 0.5 must be in \[0, 0.5\)"),
    "images-per-prompt": ([*EVAL, "--images-per-prompt", "0"], r"--images-per-prompt 0 must be >= 1"),
    "bitops-resolution": (["bitops", "--reference", "[sd-v1-4]", "--resolution", "0"], r"--resolution 0 must be >= 1"),
    "pretrain-resolution": (["pretrain", "--resolution", "48"], r"--resolution 48 must be one of 32, 64"),
    "cond-dropout": (["pretrain", "--cond-dropout", "1.5"], r"--cond-dropout 1.5 must be in \[0, 1\]"),
    "demo-cali-n": (["demo", *TINY, "--cali-n", "0"], r"--cali-n 0 must be >= 1"),
    "demo-q2b-epochs": (["demo", *TINY, "--q2b-epochs", "0"], r"--q2b-epochs 0 must be >= 1"),
    # what needs the model, or another flag
    "resolution": ([*GEN, "--resolution", "7"], r"--resolution 7 \(given\) must be a positive multiple of the "
                                                r"VAE's scale factor 2"),
    "q2b-resolution": ([*Q2B, "--resolution", "7"], r"--resolution 7 \(given\) must be a positive multiple"),
    "a-bit-options-dup": ([*CALI, "--a-bit-options", "8,8"], r"--a-bit-options '8,8' lists 8 more than once"),
    "a-bit-options-entry": ([*CALI, "--a-bit-options", "8,99"], r"--a-bit-options '8,99': the entry=99 is not "
                                                                r"supported"),
    "a-bits-not-option": ([*CALI, "--a-bit-options", "4,16"], r"--a-bits 8 is not one of --a-bit-options 4,16; "
                                                              r"add it there or change --a-bits"),
    "bit-options-dup": ([*Q2B, "--bit-options", "8,8"], r"--bit-options '8,8' lists 8 more than once"),
    "bit-options-one": ([*Q2B, "--bit-options", "8"], r"--bit-options 8: Q2B needs at least two bit options"),
    "bitops-bits": (["bitops", "--reference", "[]", "--model", "tiny-random", "--bits", "[0/8]"],
                    r"--bits '0/8': the weight bits=0 is not supported"),
    "split-fractions": ([*CALI, "--split-fractions", "0.5,0.6,0.1"],
                        r"--split-fractions 0.5,0.6,0.1 must be 3 non-negative numbers .*summing to 1 \(they sum to "
                        r"1.2\)"),
    "split-fractions-nan": ([*CALI, "--split-fractions", "nan,0.5,0.5"], r"--split-fractions nan,0.5,0.5 must be"),
    "scheduler": ([*CALI, "--scheduler", "nosuch"], r"--scheduler 'nosuch' is not supported; choose one of pndm"),
    "name": ([*GEN, "--n", "1", "--name", "../../x"], r"output name '../../x' is not a folder inside --run-dir"),
    # models, prompt files, artifact folders
    "model": (["calibrate", "--model", "/nonexistent", *BUILTIN], r"--model /nonexistent: no such folder"),
    "t2q-model": (["t2q", "--model", "/nonexistent"], r"--model /nonexistent: no such folder"),
    "hub-model": ([*CALI[:1], "--model", "no/such-model", *BUILTIN], r"'no/such-model' is not in the local Hugging "
                                                                     r"Face cache.*--allow-download"),
    "prompts-binary": ([*CALI[:3], "--prompts", "{binary}"], r"prompt file .*binary.txt is not UTF-8 text"),
    "generate-prompts-binary": ([*GEN[:3], "--prompts", "{binary}"], r"prompt file .*binary.txt is not UTF-8 text"),
    "prompts-empty": ([*CALI[:3], "--prompts", "{empty}"], r"prompt source '.*empty.txt' gave no prompts"),
    "score-prompts-empty": (["score", *TINY, "--reference", "world", "--prompts", "{empty}"],
                            r"prompt source '.*empty.txt' gave no prompts"),
    "prompts-missing": ([*CALI[:3], "--prompts", "nosuch.txt"], r"prompt file nosuch.txt does not exist"),
    "quant-state": ([*GEN, "--quant-state", "/nonexistent"], r"--quant-state /nonexistent: no such folder; "
                                                             r"expected a quantized state \(run the calibrate stage"),
    "q2b-quant-state": ([*Q2B[:-4], "--quant-state", "/nonexistent"], r"--quant-state /nonexistent: no such folder"),
    "q2b-t2q": ([*Q2B[:-2], "--t2q", "/nonexistent"], r"--t2q /nonexistent: no such folder; expected a T2Q folder"),
    "generate-q2b": ([*GEN, "--q2b", "/nonexistent"], r"--q2b /nonexistent: no such folder"),
    "evaluate-quant-states": ([*EVAL, "--quant-states", "[/nonexistent]"], r"--quant-states /nonexistent: no such "
                                                                           r"folder"),
    "evaluate-quant-states-list": ([*EVAL, "--quant-states", "/nonexistent"], r"--quant-states: expected a list "
                                                                              r"such as \[a, b\], got /nonexistent"),
    "renamed-key": ([*Q2B[:-4], "--quant-state", "{renamed}"],
                    r"renamed/quant_config.json has no 'quant_config' entry .*run the calibrate stage.* again"),
    "generate-renamed-key": ([*GEN, "--quant-state", "{renamed}"], r"quant_config.json has no 'quant_config' entry"),
    "evaluate-renamed-key": ([*EVAL, "--quant-states", "[{renamed}]"], r"quant_config.json has no 'quant_config'"),
    "t2q-renamed-key": ([*Q2B[:-2], "--t2q", "{t2q_renamed}"], r"t2q.json has no 'hidden' entry .*train one with "
                                                               r"`python -m pipeline.fit t2q` again"),
    "q2b-renamed-key": ([*GEN, "--q2b", "{q2b_renamed}"], r"q2b.json has no 'bit_options' entry"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_naming_the_flag_before_anything_is_written(tmp_path, files, case):
    args, message = CASES[case]
    run = tmp_path / "run"
    with pytest.raises(USER_ERRORS, match=message) as e:
        main([a.format(**files) for a in args] + ["--run-dir", str(run)])
    assert "\n" not in str(e.value)  # the CLI prints one line
    assert not run.exists() and not (tmp_path.parent / "x").exists()


def test_the_cli_prints_one_line_and_exits_2(tmp_path):
    run = tmp_path / "run"  # one process start is most of this test's time: one case
    res = subprocess.run([sys.executable, "-m", "pipeline.fit", "calibrate", *TINY, *BUILTIN, "--cali-n", "0",
                          "--run-dir", str(run)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --cali-n 0 must be >= 1"), res.stderr
    assert "Traceback" not in res.stderr + res.stdout and not run.exists()


def test_the_check_takes_python_values_too():
    """What the CLI cannot produce but a Python caller can: inf, a float for an int, a string."""
    from pipeline.api import CalibrateConfig, GenerateConfig

    for cfg, message in ((GenerateConfig(guidance=float("inf")), r"--guidance inf must be finite and >= 0"),
                         (GenerateConfig(n=2.5), r"--n 2.5 must be an integer"),
                         (CalibrateConfig(ram_cap_gib=float("inf")), r"--ram-cap-gib inf must be finite"),
                         (CalibrateConfig(cali_n="8"), r"--cali-n '8' must be a number")):
        with pytest.raises(USER_ERRORS, match=message):
            check_flags(cfg)
    check_flags(dataclasses.replace(GenerateConfig(), guidance=0.0, steps=1))  # the bounds themselves are allowed
