"""The command line end to end on the seeded tiny pipeline, and its errors."""
import json
import subprocess
import sys

import pytest
import torch

from pipeline.fit import STAGES, main


def test_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "pipeline.fit", "--help"], capture_output=True, text=True, check=True)
    for stage in STAGES:
        assert stage in out.stdout


def test_calibrate_naive_writes_a_loadable_state(tmp_path):
    from pipeline.models import tiny_pipeline
    from pipeline.quant import get_bit_policy, load_quantized

    args = ["calibrate", "--model", "tiny-random", "--method", "naive", "--w-bits", "8", "--a-bits", "8",
            "--prompts", "builtin", "--cali-n", "2", "--steps", "3", "--run-dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false"]
    main(args)
    q = tmp_path / "quant"
    meta = json.loads((q / "quant_config.json").read_text())
    assert meta["quant_config"]["w_bits"] == 8 and meta["extra"]["method"] == "naive"
    manifest = json.loads((q / "manifest.json").read_text())
    assert manifest["metrics"]["fab"] == 8.0 and manifest["versions"]["torch"] == torch.__version__
    unet, _, _ = load_quantized(tiny_pipeline(0).unet, q)
    assert (get_bit_policy(unet) == 8).all()
    assert all(b.calibrated.all() for n, b in unet.named_modules() if hasattr(b, "calibrated"))
    # the same command again refuses to overwrite, and --overwrite replaces
    with pytest.raises(FileExistsError, match="already holds results.*--overwrite"):
        main(args)
    main(args + ["--overwrite", "true"])


def test_yaml_config_is_accepted(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: tiny-random\nw_bits: 4\na_bits: 16\nprompts: builtin\ncali_n: 2\nsteps: 2\n"
                   f"run_dir: {tmp_path}\ntrainer:\n  enable_progress_bar: false\n")
    main(["calibrate", "--config", str(cfg)])
    meta = json.loads((tmp_path / "quant" / "quant_config.json").read_text())
    assert meta["quant_config"]["w_bits"] == 4 and meta["quant_config"]["a_bits"] == 16


@pytest.mark.parametrize("flags,message", [
    (["--w-bits", "1"], "--w-bits 1 must be an integer in 2..16"),
    (["--a-bits", "64"], "--a-bits 64 must be an integer in 2..16"),
    (["--a-bit-options", "8,16", "--a-bits", "4"], "--a-bits 4 is not one of --a-bit-options 8,16"),
    (["--a-bit-options", "8,x"], "must be comma-separated"),
    (["--method", "magic"], "--method 'magic' is not available"),
    (["--model", "no/such-model"], "not in the local Hugging Face cache"),
    (["--model", "not a model"], "unknown model"),
    (["--prompts", "missing.txt"], "does not exist"),
])
def test_bad_input_is_named(tmp_path, flags, message):
    base = ["calibrate", "--model", "tiny-random", "--prompts", "builtin", "--cali-n", "1", "--steps", "2",
            "--run-dir", str(tmp_path)]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        main(base + flags)


def test_bitops_stage_prints_the_reference_table(capsys):
    from pipeline.stages.bitops import BitopsConfig, bitops

    rows = bitops(BitopsConfig(reference=["sd-v1-4"], resolution=512, bits=["32/32", "8/8", "4/8"]))
    assert abs(rows[0]["W8A8"] - 43.31) / 43.31 < 0.005
    assert "sd-v1-4" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["naive", "qdiff"])
def test_calibrate_under_ddp_with_two_cpu_processes(tmp_path, method):
    """--trainer.strategy ddp with 2 CPU processes: same command, loadable state."""
    cmd = [sys.executable, "-m", "pipeline.fit", "calibrate", "--method", method, "--model", "tiny-random",
           "--prompts", "builtin", "--cali-n", "4", "--steps", "3", "--cali-st", "2", "--iters-w", "2",
           "--iters-a", "1", "--run-dir", str(tmp_path), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
           "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MEMBER: 2/2" in out.stdout + out.stderr  # both processes joined the process group
    from pipeline.models import tiny_pipeline
    from pipeline.quant import load_quantized

    unet, meta, _ = load_quantized(tiny_pipeline(0).unet, tmp_path / "quant")
    assert meta["extra"]["method"] == method


def _cli(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "pipeline.fit", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args,named", [
    (["calibrate", "--w-bits", "0"], "--w-bits 0 must be an integer in 2..16"),
    (["calibrate", "--bogus", "3"], "unrecognized arguments: --bogus"),
    (["calibrate", "--w-bits", "x"], "--w-bits: expected an integer, got x"),
    (["q2b"], "--quant-state is required"),
])
def test_a_user_error_is_one_line_and_exit_status_2(tmp_path, args, named):
    res = _cli(*args, "--run-dir", str(tmp_path))
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    debug = _cli(*args, "--run-dir", str(tmp_path), env={"QLIP_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_existing_results_are_one_line_naming_overwrite(tmp_path):
    args = ["calibrate", "--model", "tiny-random", "--prompts", "builtin", "--cali-n", "1", "--steps", "2",
            "--run-dir", str(tmp_path)]
    first = _cli(*args)
    assert first.returncode == 0, first.stderr
    # one stage, one progress bar: no Lightning banner, tip or deprecation line
    for noise in ("GPU available", "TPU available", "Tip:", "LeafSpec", "predict returned None"):
        assert noise not in first.stdout + first.stderr, noise
    again = _cli(*args)
    assert again.returncode == 2 and "already holds results; pass --overwrite true" in again.stderr
    assert len([line for line in again.stderr.splitlines() if line.strip()]) == 1


@pytest.mark.parametrize("name", list(STAGES))
def test_flags_are_generated_from_the_stage_config(name):
    """Each field of the stage's config is one flag (dashes), with the field's docstring as its help:
    each default and help text exists once."""
    import dataclasses

    from pipeline.fit import build_parser, config_class, field_docs

    cls = config_class(STAGES[name])
    docs = field_docs(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    assert set(fields) <= set(docs), f"fields without a docstring: {set(fields) - set(docs)}"
    sub = build_parser({name})._subcommands_action.choices[name]
    flags = {a.dest: a for a in sub._actions if a.option_strings and a.dest in fields}
    assert set(flags) == set(fields)
    for f in dataclasses.fields(cls):
        assert flags[f.name].option_strings[0] == "--" + f.name.replace("_", "-")
        assert flags[f.name].help == docs[f.name]
    defaults = cls()
    for f in fields:
        assert sub.get_defaults()[f] == getattr(defaults, f), f


def test_print_config_round_trips(tmp_path):
    res = _cli("calibrate", "--w-bits", "4", "--a-bit-options", "8,16", "--print_config")
    assert res.returncode == 0, res.stderr
    cfg = tmp_path / "c.yaml"
    cfg.write_text(res.stdout)
    from pipeline.fit import build_parser

    ns = build_parser({"calibrate"}).parse_args(["calibrate", "--config", str(cfg)])
    assert ns.calibrate.w_bits == 4 and ns.calibrate.a_bit_options == "8,16"
