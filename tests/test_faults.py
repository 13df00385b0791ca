"""Nothing lost, nothing silently wrong: a kill -9 before the manifest, two
processes on one run directory, a stale lock, flipped bytes and truncated
shards, each with its exact outcome (pipeline/artifacts.py)."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.artifacts import (
    ARTIFACTS,
    ShardIndex,
    load_tensors,
    lock_run_dir,
    release_run_dir,
    save_tensors,
    sha256_file,
)
from pipeline.calibration.data import CalibrationData, collect
from pipeline.errors import RunDirError
from pipeline.models import tiny_pipeline
from pipeline.quant import load_quantized
from pipeline.stages.calibrate import CalibrateConfig, calibrate

ROOT = Path(__file__).resolve().parents[1]
CALI = {"model": "tiny-random", "method": "naive", "prompts": "builtin", "cali_n": 2, "steps": 2, "batch_size": 2}
CLI = ["calibrate", *(x for k, v in CALI.items() for x in (f"--{k.replace('_', '-')}", str(v))),
       "--trainer.enable_progress_bar", "false"]
# The killed process runs the real CLI with write_manifest replaced by a pause, so the test kills it -9 at
# exactly "state written, manifest not yet" from outside; a production test hook would not be needed then.
PAUSED = ("import sys, time\nimport pipeline.artifacts as a\n"
          "def pause(*_, **__):\n    print('PAUSED before the manifest', flush=True)\n    time.sleep(600)\n"
          "a.write_manifest = pause\nfrom pipeline.fit import main\nmain(sys.argv[1:])\n")


def _cli(*args, code=None):
    cmd = [sys.executable, *(["-c", code] if code else ["-m", "pipeline.fit"]), *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted calibrate run's state, on one thread as the CLI processes (OMP_NUM_THREADS=1):
    reductions over other thread counts differ in the last bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = calibrate(CalibrateConfig(**CALI, run_dir=str(tmp_path_factory.mktemp("uninterrupted"))),
                        {"enable_progress_bar": False})
    finally:
        torch.set_num_threads(threads)
    return load_file(str(out / "quant_state.safetensors"))


@pytest.fixture(scope="module")
def killed_and_rerun(tmp_path_factory):
    """A calibrate killed -9 after its state file, before its manifest; a second process started
    meanwhile; the rerun. Returns (run dir, killed PID, second's result, rerun's result)."""
    run = tmp_path_factory.mktemp("killed")
    first = _cli(*CLI, "--run-dir", str(run), code=PAUSED)
    try:
        while not (run / ".lock").exists() and first.poll() is None:
            time.sleep(0.1)
        second = _cli(*CLI, "--run-dir", str(run))  # while the first calibrates
        second_out = second.communicate(timeout=600)
        line = first.stdout.readline()  # the pause: the lock is held, the state written, no manifest
        assert line.startswith("PAUSED"), first.stderr.read()[-3000:]
        assert (run / "quant" / "quant_state.safetensors").is_file() and not (run / "quant" / "manifest.json").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    (run / "partial").mkdir()
    (run / "partial" / "progress.json").write_text("{}")  # stands for a finished reconstruction
    rerun = _cli(*CLI, "--run-dir", str(run))
    rerun_out = rerun.communicate(timeout=600)
    return run, first.pid, (second.returncode, *second_out), (rerun.returncode, *rerun_out)


def test_a_second_process_on_the_run_dir_is_refused_naming_the_holder(killed_and_rerun):
    run, pid, (code, out, err), _ = killed_and_rerun
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err[-3000:]
    assert f"{run} is in use by process {pid} on host {socket.gethostname()} (stage calibrate" in lines[0]
    assert "wait for it to finish or use another --run-dir" in lines[0]


def test_rerun_after_kill_takes_over_the_stale_lock_and_redoes_the_unfinished_artifact(killed_and_rerun, reference):
    run, pid, _, (code, out, err) = killed_and_rerun
    assert code == 0, err[-3000:]
    assert f"taking over the stale lock {run / '.lock'} of process {pid} on {socket.gethostname()}" in out
    assert f"{run / 'quant'} holds an unfinished quant (no manifest.json" in out
    assert (run / "partial" / "progress.json").read_text() == "{}"  # no --overwrite: the progress survives
    assert not (run / ".lock").exists()  # released at exit
    q = run / "quant"
    manifest = json.loads((q / "manifest.json").read_text())
    assert manifest["files"] == {n: sha256_file(q / n) for n in ("quant_config.json", "quant_state.safetensors")}
    state = load_file(str(q / "quant_state.safetensors"))
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)


def test_a_bit_flipped_state_is_refused_at_load_naming_the_file(killed_and_rerun, tmp_path):
    run = killed_and_rerun[0]
    q = tmp_path / "quant"
    q.mkdir()
    for f in (run / "quant").iterdir():
        q.joinpath(f.name).write_bytes(f.read_bytes())
    load_quantized(tiny_pipeline(0).unet, q)  # the copy loads
    data = bytearray((q / "quant_state.safetensors").read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")  # safetensors: u64 header length, JSON header, tensor data
    data[(header + len(data)) // 2] ^= 0xFF  # one byte of tensor data: same size, still parses
    (q / "quant_state.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{q / 'quant_state.safetensors'} does not match the SHA-256 recorded "
                                         f"when it was written.*calibrate` again, with --overwrite true"):
        load_quantized(tiny_pipeline(0).unet, q)


def test_lock_refuses_a_live_holder_takes_over_a_dead_one_and_spares_ddp_ranks(tmp_path, monkeypatch, capsys):
    live = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    try:
        for pid, where in ((live.pid, host), (dead.pid, "another-host")):  # another host's PID: unknowable
            (tmp_path / ".lock").write_text(json.dumps({"pid": pid, "host": where, "started": "t", "stage": "t2q"}))
            with pytest.raises(RunDirError, match=f"in use by process {pid} on host {where} \\(stage t2q"):
                lock_run_dir(tmp_path, "calibrate")
            monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP rank > 0 shares its job's lock
            assert lock_run_dir(tmp_path, "calibrate") is None
            monkeypatch.delenv("LOCAL_RANK")
    finally:
        live.kill()
        live.wait()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": host, "started": "t", "stage": "t2q"}))
    path = lock_run_dir(tmp_path, "calibrate")
    assert f"taking over the stale lock {path} of process {dead.pid} on {host}" in capsys.readouterr().out
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert lock_run_dir(tmp_path, "generate") == path  # re-entrant: the demo runs several stages
    release_run_dir(tmp_path)
    assert not path.exists()


def test_a_truncated_calibration_shard_is_redone_on_resume(tmp_path, capsys):
    pipe = tiny_pipeline(0)
    args = {"prompts": ["a red cube", "a blue ball", "two green cones", "a cat"], "steps": 3, "cali_st": 2,
            "batch_size": 2}
    a, b = collect(pipe, out_dir=tmp_path / "a", **args), collect(pipe, out_dir=tmp_path / "b", **args)
    shard = b / "x_00001_002.safetensors"
    full = shard.read_bytes()
    shard.write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match=f"{shard} is truncated or corrupted .*run the same command again"):
        list(CalibrationData(b).batches())  # read without the resume: a named error, no raw SafetensorError
    before = {f.name: f.stat().st_mtime_ns for f in b.glob("*.safetensors")}
    collect(pipe, out_dir=b, **args)
    assert f"note: {shard} is truncated or does not match its checksum" in capsys.readouterr().out
    redone = {f.name for f in b.glob("*.safetensors") if f.stat().st_mtime_ns != before.get(f.name)}
    assert redone == {"emb_00001.safetensors", "x_00001_000.safetensors", "x_00001_002.safetensors"}
    for f in sorted(a.glob("*.safetensors")):
        want, got = load_file(str(f)), load_file(str(b / f.name))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), f.name
    assert len(list(CalibrationData(b).batches())) == 4  # 2 shards x 2 steps


def test_shard_index_redoes_a_changed_or_unrecorded_shard_and_truncation_is_named(tmp_path, capsys):
    index = ShardIndex(tmp_path)
    good, changed, unrecorded = (save_tensors(tmp_path / f"{n}.safetensors", {"x": torch.arange(6.0)})
                                 for n in ("good", "changed", "unrecorded"))
    index.record(good, changed)
    save_tensors(changed, {"x": torch.arange(6.0) + 1})  # same size, other bytes
    assert index.finished(good) and good.is_file()
    assert not index.finished(changed) and not changed.exists()
    assert not index.finished(unrecorded) and not unrecorded.exists()  # written, killed before the index
    assert capsys.readouterr().out.count("does not match its checksum") == 2
    good.write_bytes(good.read_bytes()[:20])
    with pytest.raises(ValueError, match=f"{good} is truncated or corrupted .*; collect it again"):
        load_tensors(good, "collect it again")


# ---------------------------------------------------------------------------
# kill -9 at seeded random points of every resumable stage
# ---------------------------------------------------------------------------
# Every artifact write ends in os.replace (pipeline.artifacts' atomic writes), so the child counts them and
# SIGKILLs itself just before or just after the k-th: a kill in the middle of a write (its temporary file
# left behind) or between two writes. An uninterrupted run counts the renames; k is drawn, seeded, from them.
KILLER = """
import os, signal, sys, atexit
k, when = int(sys.argv[1]), sys.argv[2]
n, real = [0], os.replace
def replace(src, dst, *a, **kw):
    n[0] += 1
    print(f"RENAME {n[0]} {os.fspath(dst)}", flush=True)
    if n[0] == k and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst, *a, **kw)
    if n[0] == k and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
atexit.register(lambda: print(f"RENAMES {n[0]}", flush=True))
from pipeline.fit import main
main(sys.argv[3:])
"""
QUIET = ["--trainer.enable_progress_bar", "false"]
TIMING = {"seconds_per_image", "metric_seconds_per_image", "generate_share", "q2b_seconds", "seconds",
          "calibration_seconds", "timings_s", "wall_seconds"}


def _killable(args, k=0, when="after"):
    """Run the CLI with `args`, killed -9 at its k-th rename (0: never). Returns (process, the renamed paths)."""
    proc = subprocess.run([sys.executable, "-c", KILLER, str(k), when, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc, [line.split(" ", 2)[2] for line in proc.stdout.splitlines() if line.startswith("RENAME ")]


def _tensors_equal(a: Path, b: Path):
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys(), a
    for key in ta:
        assert torch.equal(ta[key], tb[key]), (a.name, key)


def _strip(obj):
    """JSON without wall times (and without paths, which name the run dir)."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _same_calibration(ref: Path, run: Path):
    _tensors_equal(ref / "quant" / "quant_state.safetensors", run / "quant" / "quant_state.safetensors")


def _same_score(ref: Path, run: Path):
    assert (ref / "scored" / "scored.jsonl").read_text() == (run / "scored" / "scored.jsonl").read_text()


def _same_q2b(ref: Path, run: Path):
    _tensors_equal(ref / "q2b" / "q2b.safetensors", run / "q2b" / "q2b.safetensors")
    metrics = [_strip(json.loads((d / "q2b" / "manifest.json").read_text())["metrics"]) for d in (ref, run)]
    assert metrics[0] == metrics[1]


def _same_evaluation(ref: Path, run: Path):
    rows = [_strip(json.loads((d / "evaluate" / "results.json").read_text())["rows"]) for d in (ref, run)]
    assert rows[0] == rows[1]


def _same_demo(ref: Path, run: Path):
    res = [_strip(json.loads((d / "demo" / "results.json").read_text())) for d in (ref, run)]
    assert res[0]["evaluate"] == res[1]["evaluate"] and res[0]["qlip"] == res[1]["qlip"]


@pytest.fixture(scope="module")
def kill_inputs(tmp_path_factory):
    """What the killed stages read: a W4A16 naive state with {8,16,32} banks, and reference images for score."""
    root = tmp_path_factory.mktemp("inputs")
    proc, _ = _killable(["calibrate", "--model", "tiny-random", "--method", "naive", "--w-bits", "4", "--a-bits", "16",
                         "--a-bit-options", "8,16,32", "--prompts", "builtin", "--cali-n", "2", "--steps", "3",
                         "--run-dir", str(root / "state"), *QUIET])
    assert proc.returncode == 0, proc.stderr[-3000:]
    from PIL import Image

    (root / "ref").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "ref" / f"{i}.png")
    return root


TINY = ["--model", "tiny-random", "--prompts", "builtin"]
KILL_CASES = {  # case: (flags, how the final artifacts are compared, where its resumable progress is written)
    "calibrate-naive": (lambda i: ["calibrate", *TINY, "--method", "naive", "--cali-n", "4", "--batch-size", "2",
                                   "--steps", "3"], _same_calibration, None),
    "calibrate-qdiff": (lambda i: ["calibrate", *TINY, "--method", "qdiff", "--w-bits", "4", "--cali-n", "2",
                                   "--steps", "2", "--cali-st", "2", "--iters-w", "2", "--iters-a", "2"],
                        _same_calibration, "/partial/units/"),
    "calibrate-progressive": (lambda i: ["calibrate", *TINY, "--method", "naive", "--progressive", "true",
                                         "--cali-n", "2", "--steps", "3"], _same_calibration, "/partial/progressive/"),
    "score": (lambda i: ["score", *TINY, "--steps", "2", "--split-fractions", "0.5,0.5,0", "--reference",
                         str(i / "ref"), "--giqa", "gmm", "--gmm-components", "2", "--pca-dim", "4", "--n-reference",
                         "8", "--shard-size", "2"], _same_score, "/scored/shards/"),
    "q2b": (lambda i: ["q2b", *TINY, "--quant-state", str(i / "state" / "quant"), "--criterion", "length", "--n", "8",
                       "--val-n", "4", "--batch-size", "4", "--resolution", "16", "--epochs", "4", "--plot-every", "2"],
            _same_q2b, "/q2b_progress/"),
    "evaluate": (lambda i: ["evaluate", "--model", "tiny-random", "--quant-states", f"[{i / 'state' / 'quant'}]",
                            "--in-domain", "builtin", "--generalization", str(ROOT / "tests/assets/prompts.txt"),
                            "--split-fractions", "0,0,1", "--n", "4", "--steps", "3", "--batch-size", "2", "--fid",
                            "false", "--sfid", "false", "--clip", "none"], _same_evaluation, "/evaluate_progress/"),
    # the whole chain (tiny-random: prompt length stands in for T2Q), killed inside any stage's progress
    "demo": (lambda i: ["demo", "--model", "tiny-random", "--n", "4", "--cali-n", "2", "--q2b-n", "4", "--q2b-epochs",
                        "3", "--iters-w", "2", "--iters-a", "2", "--steps", "3", "--eval-batch", "2"], _same_demo,
             ("/partial/units/", "/q2b_progress/", "/evaluate_progress/")),
}
# two kills in a row, then a rerun to the end: the first at a random one of the middle half of the stage's
# progress writes (so that the rerun has progress to resume from and work left), the second at a random point
# of that rerun
KILLS_PER_CASE = 2


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(KILL_CASES))
def test_killed_twice_at_random_points_the_rerun_ends_identical(case, kill_inputs, tmp_path):
    flags, same, progress = KILL_CASES[case]
    args = [*flags(kill_inputs), *QUIET]
    proc, renames = _killable([*args, "--run-dir", str(tmp_path / "ref")])
    assert proc.returncode == 0 and renames, proc.stderr[-3000:]
    marks = (progress,) if isinstance(progress, str) else progress or ()
    points = [i for i, dst in enumerate(renames, 1) if any(m in dst for m in marks)] or range(1, len(renames) + 1)
    points = points[len(points) // 4: max(len(points) // 4 + 1, 3 * len(points) // 4)]
    rng = random.Random(f"{case}-kills")  # seeded: the same kill points on every run of the suite
    run, killed = tmp_path / "run", 0
    finished = run / ARTIFACTS[args[0]] / "manifest.json"
    for j in range(KILLS_PER_CASE):
        k, when = (rng.choice(points) if j == 0 else rng.randint(1, len(renames))), rng.choice(["before", "after"])
        proc, _ = _killable([*args, "--run-dir", str(run)], k, when)
        killed += proc.returncode == -signal.SIGKILL
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-3000:]  # a rerun may finish before k
        if finished.is_file():  # done (or killed after its last write): a rerun would be refused, rightly
            break
    assert killed >= 1
    if not finished.is_file():
        proc, _ = _killable([*args, "--run-dir", str(run)])
        assert proc.returncode == 0, proc.stderr[-3000:]
    same(tmp_path / "ref", run)


@pytest.mark.slow
def test_a_corrupted_finished_unit_is_redone_alone_and_the_state_matches(kill_inputs, tmp_path):
    """Q-Diffusion's finished units are checksummed: one with a flipped byte is reconstructed again, the
    others are loaded, and the state equals the uninterrupted run's."""
    import shutil

    args = [*KILL_CASES["calibrate-qdiff"][0](kill_inputs), *QUIET]
    proc, _ = _killable([*args, "--run-dir", str(tmp_path / "ref")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "ref", run)
    shutil.rmtree(run / "quant")  # as if killed before the state was written: partial/ holds every unit
    unit = sorted((run / "partial" / "units").glob("*.safetensors"))[1]
    data = bytearray(unit.read_bytes())
    data[-1] ^= 0xFF
    unit.write_bytes(bytes(data))
    proc, renames = _killable([*args, "--run-dir", str(run)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{unit} does not match its checksum" in proc.stdout
    assert [d for d in renames if "/partial/units/" in d] == [str(unit)]  # that unit alone was redone
    _same_calibration(tmp_path / "ref", run)
