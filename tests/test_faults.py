"""Nothing lost, nothing silently wrong: a kill -9 before the manifest, two
processes on one run directory, a stale lock, flipped bytes and truncated
shards, each with its exact outcome (pipeline/artifacts.py)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.artifacts import ShardIndex, load_tensors, lock_run_dir, release_run_dir, save_tensors, sha256_file
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
