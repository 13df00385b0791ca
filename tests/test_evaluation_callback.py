"""callbacks/evaluation.py on a tiny Q2B run (the q2b stage's --eval-every): the paired quality to FP and the
FAB it logs are what an independent recomputation from the saved best checkpoint gives, the best checkpoint is
the best epoch's and deploys on its own, and the measurement does not change the training."""
import json

import numpy as np
import pytest
import torch

from pipeline.fit import main

QUIET = ["--trainer.enable_progress_bar", "false"]
STEPS = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of uint8 images [N, H, W, 3] in [0, 1] units, written out (not piq)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) / 255.0) ** 2
    return 10 * np.log10(1.0 / mse.reshape(len(a), -1).mean(1))


def test_q2b_eval_every_measures_logs_and_keeps_the_best(tmp_path):
    from data.prompts import draw_prompts, prompt_seed
    from pipeline.models import load_pipeline
    from pipeline.qlip.pipeline import QLIPPipeline
    from pipeline.qlip.q2b import load_q2b
    from pipeline.sampling import generate

    main(["calibrate", "--model", "tiny-random", "--run-dir", str(tmp_path), "--method", "naive", "--w-bits", "4",
          "--a-bits", "16", "--a-bit-options", "8,16,32", "--prompts", "builtin", "--cali-n", "2", "--steps",
          str(STEPS), *QUIET])
    q2b = ["q2b", "--model", "tiny-random", "--quant-state", str(tmp_path / "quant"), "--criterion", "length",
           "--prompts", "builtin", "--n", "8", "--val-n", "8", "--batch-size", "4", "--resolution", "16",
           "--epochs", "4", "--target-fab", "12", *QUIET]
    main(q2b + ["--run-dir", str(tmp_path), "--eval-every", "2", "--eval-n", "4"])
    out = tmp_path / "q2b"
    summary = json.loads((out / "evaluation" / "evaluation.json").read_text())
    hist, best = summary["history"], summary["best"]
    assert [h["epoch"] for h in hist] == [1, 3] and summary["monitor"] == "psnr"
    assert best == max(hist, key=lambda h: h["psnr"])
    for h in hist:
        assert h["n_images"] == 4 and 8 <= h["fab"] <= 32
        assert h["psnr_ci"][0] <= h["psnr"] <= h["psnr_ci"][1] and h["ssim_ci"][0] <= h["ssim"] <= h["ssim_ci"][1]
    manifest = json.loads((out / "manifest.json").read_text())["metrics"]["evaluation"]
    assert manifest["best"] == best and manifest["split"]["n_prompts"] == 4

    # the best checkpoint deploys on its own and reproduces its record, recomputed another way
    best_dir = out / "evaluation" / "best"
    assert load_q2b(best_dir, deployed=True).meta["evaluation"] == best
    prompts = draw_prompts("builtin", "val", 8, (0.8, 0.1, 0.1), seed=0).prompts[:4]
    assert prompts == manifest["split"]["prompts"]
    seeds = [prompt_seed(p) for p in prompts]
    meta = json.loads((out / "q2b.json").read_text())
    fp = generate(load_pipeline("tiny-random"), prompts, seeds, steps=STEPS, guidance=meta["guidance"], batch_size=1,
                  progress=False)
    qlip = QLIPPipeline.from_pretrained(best_dir)
    result = qlip(prompts, seeds, batch_size=1, progress=False)
    assert psnr(result.images, fp).mean() == pytest.approx(best["psnr"], rel=1e-5)  # piq works in float32
    assert result.fab == pytest.approx(best["fab"], rel=1e-9)
    assert (psnr(result.images, fp) < 99).all()  # quantized images do differ from FP: the PSNR is finite

    # observational: the same training without the callback ends with the same tables
    main(q2b + ["--run-dir", str(tmp_path / "plain")])
    with_eval, plain = load_q2b(out).state_dict(), load_q2b(tmp_path / "plain" / "q2b").state_dict()
    assert all(torch.equal(with_eval[k], plain[k]) for k in plain)


def test_eval_flags_are_checked_before_anything_loads(tmp_path):
    from pipeline.errors import UserError

    args = ["q2b", "--model", "tiny-random", "--run-dir", str(tmp_path), "--quant-state", str(tmp_path / "none")]
    with pytest.raises(UserError, match="--eval-every 2 evaluates on val prompts, but --val-n is 0"):
        main(args + ["--eval-every", "2", "--val-n", "0"])
    with pytest.raises(ValueError, match="--eval-monitor 'lpips'.*psnr"):
        main(args + ["--eval-every", "2", "--eval-monitor", "lpips"])
    with pytest.raises(ValueError, match="--eval-every -1 must be >= 0"):
        main(args + ["--eval-every", "-1"])
