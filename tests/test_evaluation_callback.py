"""callbacks/evaluation.py on a tiny Q2B run (the q2b stage's --eval-every): the paired quality to FP and the
FAB it logs are what an independent recomputation from the saved best checkpoint gives, the best checkpoint is
the best epoch's and deploys on its own, and the measurement does not change the training."""
import json
import math

import numpy as np
import pytest
import torch
from test_t2q import needs_world, synthetic_scored  # the scored set the T2Q tests build

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


@needs_world
def test_t2q_eval_every_measures_the_t2q_being_trained_through_a_q2b(tmp_path):
    """t2q --eval-every --eval-q2b: every N epochs the val prompts go through that Q2B fed by the T2Q being
    trained. The record is what the saved best T2Q gives through the same Q2B, recomputed outside the callback;
    the measurement does not change the training."""
    from data.prompts import prompt_seed
    from pipeline.models import load_pipeline, load_quantized_pipeline
    from pipeline.qlip.pipeline import QLIPPipeline
    from pipeline.qlip.q2b import load_q2b, save_q2b
    from pipeline.qlip.t2q import load_t2q
    from pipeline.sampling import generate

    main(["calibrate", "--model", "embedded", "--run-dir", str(tmp_path), "--method", "naive", "--w-bits", "8",
          "--a-bits", "8", "--a-bit-options", "4,8,16", "--prompts", "world", "--cali-n", "2", "--steps",
          str(STEPS), *QUIET])
    main(["q2b", "--model", "embedded", "--quant-state", str(tmp_path / "quant"), "--criterion", "length",
          "--prompts", "world", "--n", "8", "--val-n", "0", "--batch-size", "4", "--epochs", "2", "--target-fab",
          "8", "--run-dir", str(tmp_path), *QUIET])
    # a Q2B whose bits follow q closely: each layer goes from 4 to 16 bits at its own threshold in (0, 1), so any
    # change of the T2Q's predictions moves the FAB (the length-trained tables of 2 epochs barely depend on q)
    q2b = load_q2b(tmp_path / "q2b", deployed=True)
    with torch.no_grad():
        thresholds = torch.linspace(0.02, 0.98, len(q2b.layers))
        q2b.gate_scale.fill_(math.log(math.e - 1))  # softplus: 1
        q2b.gate_bias.copy_(-(thresholds - q2b.q_mean) / q2b.q_std)
        q2b.low.fill_(-10.0)  # low side {4, 8}: 4
        q2b.high.fill_(10.0)  # high side {8, 16}: 16
    save_q2b(q2b, tmp_path / "steep", q2b.meta)  # a sibling folder: its relative link to the state still holds
    synthetic_scored(tmp_path / "t" / "scored", n=60)
    t2q = ["t2q", "--model", "embedded", "--epochs", "4", "--patience", "0", "--batch-size", "8", "--lr", "0.05",
           "--richness", "false", *QUIET]
    main(t2q + ["--run-dir", str(tmp_path / "t"), "--eval-every", "2", "--eval-n", "3", "--eval-q2b",
                str(tmp_path / "steep")])
    out = tmp_path / "t" / "t2q"
    summary = json.loads((out / "evaluation" / "evaluation.json").read_text())
    hist, best = summary["history"], summary["best"]
    assert [h["epoch"] for h in hist] == [1, 3] and best == max(hist, key=lambda h: h["psnr"])
    assert all(h["n_images"] == 3 and 4 <= h["fab"] <= 16 for h in hist)
    assert hist[0]["fab"] != hist[1]["fab"]  # measured with the T2Q as trained so far, not a stale one
    manifest = json.loads((out / "manifest.json").read_text())["metrics"]["evaluation"]
    assert manifest["best"] == best and manifest["split"]["n_prompts"] == 3

    # recomputed another way: the saved best T2Q, loaded on its own, through the same Q2B and quantized state
    meta = json.loads((tmp_path / "steep" / "q2b.json").read_text())
    prompts = manifest["split"]["prompts"]
    seeds = [prompt_seed(p) for p in prompts]
    fp = generate(load_pipeline("embedded"), prompts, seeds, steps=meta["steps"], guidance=meta["guidance"],
                  batch_size=1, progress=False)
    best_t2q = load_t2q(out / "evaluation" / "best", model="embedded")
    qlip = QLIPPipeline(load_quantized_pipeline("embedded", str(tmp_path / "quant")),
                        load_q2b(tmp_path / "steep", deployed=True), best_t2q, meta["steps"], meta["guidance"])
    result = qlip(prompts, seeds, batch_size=1, progress=False)
    # piq's float32 PSNR is 2e-3 dB off float64 at 46 dB
    assert psnr(result.images, fp).mean() == pytest.approx(best["psnr"], rel=1e-4)
    assert result.fab == pytest.approx(best["fab"], rel=1e-9)

    # the T2Q predicts the quality of the Q2B's sampler: generating under another scheduler is refused
    with pytest.raises(ValueError, match="scheduler ddim but t2q \\(--scheduler\\) samples with .*scheduler euler"):
        main(t2q + ["--run-dir", str(tmp_path / "other"), "--scored", str(tmp_path / "t" / "scored"), "--eval-every",
                    "2", "--eval-q2b", str(tmp_path / "steep"), "--scheduler", "euler"])

    # observational: the same training without the callback ends with the same head
    main(t2q + ["--run-dir", str(tmp_path / "plain"), "--scored", str(tmp_path / "t" / "scored")])
    with_eval, plain = load_t2q(out).state_dict(), load_t2q(tmp_path / "plain" / "t2q").state_dict()
    assert all(torch.equal(with_eval[k], plain[k]) for k in plain)


def test_t2q_eval_flags_are_checked_before_anything_loads(tmp_path):
    from pipeline.errors import UserError

    args = ["t2q", "--model", "embedded", "--run-dir", str(tmp_path)]
    with pytest.raises(UserError, match="--eval-every 2 generates through a Q2B.*pass --eval-q2b"):
        main(args + ["--eval-every", "2"])
    with pytest.raises(ValueError, match="--eval-monitor 'fab'.*psnr"):
        main(args + ["--eval-every", "2", "--eval-monitor", "fab"])
    with pytest.raises(ValueError, match="--eval-every -1 must be >= 0"):
        main(args + ["--eval-every", "-1"])
