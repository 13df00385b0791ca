"""The README main job: the whole chain (calibrate -> score -> t2q -> q2b -> evaluate) at toy sizes."""
import json
import shutil

import pytest

from pipeline.artifacts import RunDirError
from pipeline.fit import main as stage

SMALL = ["--n", "4", "--cali-n", "2", "--score-n", "24", "--q2b-n", "2", "--q2b-epochs", "1", "--iters-w", "2",
         "--iters-a", "2", "--steps", "4", "--eval-batch", "2", "--deploy-n", "2",
         "--trainer.enable_progress_bar", "false"]


@pytest.mark.slow
def test_demo_runs_the_qlip_chain_and_resumes(tmp_path):
    run = tmp_path / "demo"
    stage(["demo", "--run-dir", str(run), *SMALL])
    report = (run / "demo" / "report.md").read_text()
    rows = {r["method"]: r for r in json.loads((run / "demo" / "results.json").read_text())["evaluate"]}
    assert set(rows) == {"FP32", "naive-W8A8", "naive-W4A8", "naive-W4A16", "Q-Diffusion-W4A16", "Q-Diffusion+QLIP"}
    assert rows["naive-W4A8"]["fab"] == pytest.approx(8.0) and rows["Q-Diffusion-W4A16"]["fab"] == pytest.approx(16.0)
    # QLIP chose bits from {8,16,32} per layer and step: on average below the static W4A16 base here
    assert 8.0 <= rows["Q-Diffusion+QLIP"]["fab"] < 16.0
    assert (run / "demo" / "bits_heatmap.png").is_file() and "Q-Diffusion+QLIP" in report
    for step in ("naive_w8a8", "naive_w4a16", "qdiff", "scored", "t2q", "qlip", "evaluate"):
        assert (run / step).is_dir(), step
    # real low-bit inference: naive W8A8 and QLIP exported, generated on the int8 kernels beside fake-quant
    deploy = json.loads((run / "demo" / "results.json").read_text())["deploy"]["rows"]
    assert set(deploy) == {"naive-W8A8", "Q-Diffusion+QLIP"} and "Real low-bit inference (oneDNN" in report
    for label, r in deploy.items():
        assert r["n_images"] == 2 and r["fake_s_per_image"] > 0 and r["real_s_per_image"] > 0, label
        # the same images up to rounding flips (docs/deploy.md): every layer agrees to ~3e-7 on this run's inputs,
        # the images 28-41 dB at 4 steps; two unrelated images are ~10 dB apart
        assert r["psnr_min"] >= 25, (label, r)
    assert "qlip" in json.loads((run / "qlip" / "deploy" / "deploy.json").read_text())  # Q2B + T2Q inside

    with pytest.raises(RunDirError, match="--overwrite true"):  # a finished demo is never overwritten silently
        stage(["demo", "--run-dir", str(run), *SMALL])

    # an interrupted demo: the last steps are gone; a rerun keeps every finished step
    kept = {p: p.stat().st_mtime_ns for p in run.glob("*/*/manifest.json") if p.parts[-3] not in ("evaluate", "demo")}
    kept[run / "deploy_timing" / "manifest.json"] = (run / "deploy_timing" / "manifest.json").stat().st_mtime_ns
    for gone in ("evaluate", "demo"):
        shutil.rmtree(run / gone)
    assert len(kept) == 10  # naive x3, qdiff, scored, t2q, qlip, the two exports, the real-kernel timing
    stage(["demo", "--run-dir", str(run), *SMALL])
    assert (run / "demo" / "report.md").is_file()
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
