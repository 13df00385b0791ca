"""QDiffBench evaluation: Frechet metrics against scipy, FID behaviour on real
Inception features, FAB/BitOPs metrics against the accounting, the evaluate
stage end to end, DDP = one process, and the clear errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from pipeline.evaluation import (
    EvalSettings,
    FPReference,
    PromptMismatchError,
    Split,
    StaticQuantState,
    method_from_state,
    register_method,
    run_evaluation,
    validate,
)
from pipeline.metrics import FAB, BitOPs, FrechetDistance, TooFewImagesError
from pipeline.metrics.frechet import PrecomputedFeatures

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean.real))


def features_fid(real: torch.Tensor, fake: torch.Tensor) -> FrechetDistance:
    m = FrechetDistance(feature=PrecomputedFeatures(real.shape[1]))
    m.update(features=real, real=True)
    m.update(features=fake, real=False)
    return m


def calibrated_state(path: Path, seed: int = 0, steps: int = 2, w_bits: int = 8, a_bits: int = 8,
                     a_bit_options=None) -> Path:
    """A min-max PTQ state of tiny-random (seed picks the weights), observed on
    one random UNet call: enough for evaluation plumbing."""
    from pipeline.models import tiny_pipeline
    from pipeline.quant import QuantConfig, act_banks, observing, quantize_unet, save_quantized

    unet = tiny_pipeline(seed).unet
    quantize_unet(unet, QuantConfig(w_bits=w_bits, a_bits=a_bits, a_bit_options=a_bit_options or [], n_steps=steps))
    g = torch.Generator().manual_seed(0)
    with observing(unet), torch.no_grad():
        unet(torch.randn(2, 4, 16, 16, generator=g), 500, torch.randn(2, 77, 64, generator=g))
    for bank in act_banks(unet).values():
        bank.finalize()
    save_quantized(unet, path, extra={"method": "naive", "model": "tiny-random"})
    return path


@pytest.fixture(scope="module")
def w8a8_state(tmp_path_factory):
    return calibrated_state(tmp_path_factory.mktemp("state") / "w8a8")


def smooth_images(n: int, side: int = 32, seed: int = 0) -> torch.Tensor:
    """Deterministic, varied, smooth uint8 images: random low-frequency colour fields."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    img = torch.nn.functional.interpolate(low, size=(side, side), mode="bicubic", align_corners=False)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


# ---------------------------------------------------------------------------
# Frechet distance: exactness, sync semantics, too few images
# ---------------------------------------------------------------------------
def test_fid_equals_scipy_frechet_distance():
    g = torch.Generator().manual_seed(0)
    d = 32
    a = torch.randn(400, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    b = 0.8 * a[:300] + 0.3 * torch.randn(300, d, generator=g, dtype=torch.float64) + 0.5
    ours = float(features_fid(a, b).compute())
    ref = scipy_fid(a.numpy(), b.numpy())
    assert ours == pytest.approx(ref, rel=1e-6)
    assert ours > 1.0


def test_fid_of_a_set_with_itself_is_zero():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(200, 16, generator=g, dtype=torch.float64) * 3
    m = features_fid(a, a)
    trace = float(torch.cov(a.T).trace())
    assert abs(float(m.compute())) < 1e-9 * trace


def test_fid_states_merge_like_one_process():
    """dist_reduce_fx='sum' semantics: two shards merged == one pass."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(90, 8, generator=g), torch.randn(70, 8, generator=g) + 0.2
    whole = features_fid(a, b)
    shard1, shard2 = features_fid(a[:40], b[:30]), features_fid(a[40:], b[30:])
    shard1.merge_state(shard2)
    assert float(shard1.compute()) == pytest.approx(float(whole.compute()), rel=1e-10)


def test_too_few_images_names_the_minimum():
    m = features_fid(torch.randn(64, 64), torch.randn(100, 64))
    with pytest.raises(TooFewImagesError, match=r"needs at least 65 images .* reference set.* has 64"):
        m.compute()


def test_rank_deficient_fid_only_when_asked():
    """A benchmark that fixes the image count (1,000 images, 2048 dims) may ask for the rank-deficient
    Frechet distance; it still equals the closed form."""
    from pipeline.metrics.frechet import frechet_from_features

    g = torch.Generator().manual_seed(3)
    a = torch.randn(40, 64, generator=g, dtype=torch.float64)
    b = torch.randn(50, 64, generator=g, dtype=torch.float64) * 1.5 + 0.2
    with pytest.raises(TooFewImagesError):
        frechet_from_features(a, b)
    assert frechet_from_features(a, b, full_rank_only=False) == pytest.approx(scipy_fid(a.numpy(), b.numpy()),
                                                                              rel=1e-5)


def test_stage_refuses_too_few_images_before_generating(tmp_path):
    from pipeline.fit import main

    args = ["evaluate", "--model", "tiny-random", "--n", "8", "--run-dir", str(tmp_path), "--steps", "2"]
    with pytest.raises(TooFewImagesError, match=r"2048-dim features needs at least 2049 images.*has 8"):
        main(args + ["--fid-dims", "2048"])
    with pytest.raises(TooFewImagesError, match=r"64-dim features needs at least 65 images"):
        main(args)  # auto picks the largest supported set; none fits 8 images
    assert not (tmp_path / "evaluate").exists()


# ---------------------------------------------------------------------------
# the standard FID Inception
# ---------------------------------------------------------------------------
def test_inception_taps_match_the_scripted_network():
    from pipeline.metrics.inception import InceptionBackbone, shared_backbone

    backbone = shared_backbone()
    x = smooth_images(1, side=299)
    taps = backbone.taps(x, [64, 192, 2048, "spatial"])
    assert {k: tuple(v.shape) for k, v in taps.items()} == {64: (1, 64), 192: (1, 192), 2048: (1, 2048),
                                                            "spatial": (1, 2023)}
    with torch.no_grad():
        direct = backbone.net(InceptionBackbone.preprocess(x))  # the TorchScript's own forward
    assert torch.allclose(taps[2048], direct, atol=1e-5)
    pooled = backbone.taps(x, ["spatial"], spatial_grid=3)["spatial"]
    assert pooled.shape == (1, 63)
    with pytest.raises(ValueError, match="uint8"):
        backbone.taps(x.float(), [64])


@pytest.mark.slow
def test_fid_is_zero_on_itself_and_grows_with_noise():
    x = smooth_images(72, side=32)
    m = FrechetDistance(64)
    feats = m.inception(x)
    assert float(features_fid(feats, feats).compute()) == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    fids = []
    for sigma in (4.0, 16.0, 48.0):
        noisy = (x.float() + sigma * torch.randn(x.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)
        m = FrechetDistance(64)
        m.update(x, real=True)
        m.update(noisy, real=False)
        fids.append(float(m.compute()))
    assert 0 < fids[0] < fids[1] < fids[2], fids


# ---------------------------------------------------------------------------
# FAB / BitOPs metrics
# ---------------------------------------------------------------------------
def test_fab_and_bitops_metrics_match_accounting_and_merge():
    from pipeline.metrics.cost import bitops, fab, layer_stats
    from pipeline.models import tiny_pipeline
    from pipeline.quant import QuantConfig, get_bit_policy, quant_layers, quantize_unet, set_bit_policy

    unet = tiny_pipeline(0).unet
    stats = layer_stats(unet)
    quantize_unet(unet, QuantConfig(w_bits=4, a_bits=8, a_bit_options=[8, 16, 32], n_steps=3))
    layers = list(quant_layers(unet))
    w_bits = {n: 4 for n in layers}
    set_bit_policy(unet, {layers[0]: [8, 16, 32], layers[3]: 16})
    p1 = get_bit_policy(unet)
    set_bit_policy(unet, 16)
    p2 = get_bit_policy(unet)

    f, b = FAB(stats, layers), BitOPs(stats, layers, w_bits)
    f.update(p1, 3)
    b.update(p1, 3)
    a_bits = {n: p1[i].tolist() for i, n in enumerate(layers)}
    assert float(f.compute()["fab"]) == pytest.approx(fab(stats, p1, layers)["fab"], rel=1e-12)
    assert float(b.compute()) == pytest.approx(bitops(stats, w_bits, a_bits), rel=1e-12)

    # a second batch with another policy, on "another process": image-weighted mean
    f, b, f2, b2 = FAB(stats, layers), BitOPs(stats, layers, w_bits), FAB(stats, layers), BitOPs(stats, layers, w_bits)
    f.update(p1, 3)
    b.update(p1, 3)
    f2.update(p2, 1)
    b2.update(p2, 1)
    f.merge_state(f2)
    b.merge_state(b2)
    want_fab = (3 * fab(stats, p1, layers)["fab"] + 16.0) / 4
    assert float(f.compute()["fab"]) == pytest.approx(want_fab, rel=1e-12)
    want_bitops = (3 * bitops(stats, w_bits, a_bits) + bitops(stats, w_bits, 16)) / 4
    assert float(b.compute()) == pytest.approx(want_bitops, rel=1e-12)
    with pytest.raises(ValueError, match="does not fit"):
        f.update(torch.full((3, 3), 8), 1)

def test_fidelity_to_fp_takes_generated_arrays_like_the_metric():
    """The shared helper (demo, calibration benchmark) = FidelityToFP on [N, 3, H, W] tensors."""
    from pipeline.metrics import FidelityToFP
    from pipeline.metrics.fidelity import fidelity_to_fp

    g = np.random.default_rng(0)
    fp = g.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)  # what pipeline.sampling.generate returns
    q = np.clip(fp.astype(int) + g.integers(-20, 21, fp.shape), 0, 255).astype(np.uint8)
    m = FidelityToFP()
    m.update(torch.from_numpy(fp).permute(0, 3, 1, 2), torch.from_numpy(q).permute(0, 3, 1, 2))
    want = {k: float(v) for k, v in m.compute().items()}
    got = fidelity_to_fp(fp, q)
    assert got == pytest.approx(want) and 20 < got["psnr"] < 40 and 0 < got["ssim"] < 1
    same = fidelity_to_fp(fp, fp)
    assert same["psnr"] > 60 and same["ssim"] == pytest.approx(1.0)


def test_fidelity_keeps_per_image_scores_in_image_order():
    """Batches arrive in any order (DDP deals them to processes): per_image() returns the scores sorted by image
    index, each equal to piq's score of that image alone, and their mean is compute()'s. Breaks if the scores
    are returned in update order, or if an update's indices are ignored."""
    import piq

    from pipeline.metrics import FidelityToFP

    g = torch.Generator().manual_seed(0)
    fp = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g)
    q = (fp.int() + torch.randint(-30, 31, fp.shape, generator=g) * torch.arange(1, 5).view(4, 1, 1, 1) // 2)
    q = q.clamp(0, 255).to(torch.uint8)  # image i: noise growing with i
    m = FidelityToFP()
    m.update(fp[2:], q[2:], [2, 3])
    m.update(fp[:2], q[:2], [0, 1])
    per = m.per_image()
    want = [float(piq.psnr(q[i:i + 1] / 255.0, fp[i:i + 1] / 255.0, data_range=1.0)) for i in range(4)]
    assert per["index"] == [0, 1, 2, 3] and per["psnr"] == pytest.approx(want, rel=1e-6)
    assert per["psnr"][0] > per["psnr"][3] and len(per["ssim"]) == 4 and "lpips" not in per
    assert float(m.compute()["psnr"]) == pytest.approx(np.mean(per["psnr"]), rel=1e-12)
    with pytest.raises(ValueError, match="1 indices for 2 images"):
        m.update(fp[:2], q[:2], [0])



# ---------------------------------------------------------------------------
# clear errors: prompt mismatch, a state of another model
# ---------------------------------------------------------------------------
def test_mismatched_prompts_are_refused():
    ref = FPReference()
    imgs = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    ref.put("in_domain", [0, 1], ["a red circle", "a blue square"], [0, 1], imgs, {})
    assert ref.get("in_domain", [1], ["a blue square"], [1]).images.shape == (1, 3, 8, 8)
    with pytest.raises(PromptMismatchError, match=r"prompt 'two dogs' with seed 1.*'a blue square' with seed 1"):
        ref.get("in_domain", [1], ["two dogs"], [1], label="naive W8A8")
    with pytest.raises(PromptMismatchError, match="seed 7"):
        ref.get("in_domain", [0], ["a red circle"], [7])
    with pytest.raises(PromptMismatchError, match="image 5 .* no FP reference"):
        ref.get("in_domain", [5], ["a red circle"], [5])


def test_state_of_another_model_is_refused_before_generating(tmp_path):
    other = calibrated_state(tmp_path / "seed1", seed=1)
    split = Split("in_domain", "builtin", ["a red circle"] * 3)
    settings = EvalSettings(steps=2, guidance=5.0, fid=False, sfid=False)
    with pytest.raises(ValueError, match=r"seed1 cannot be evaluated on --model tiny-random.*other weights"):
        validate("tiny-random", [method_from_state(other)], [split], settings)
    with pytest.raises(ValueError, match="addresses 2 sampling steps but --steps is 5"):
        validate("tiny-random", [method_from_state(other)], [split],
                 EvalSettings(steps=5, guidance=5.0, fid=False, sfid=False))


def test_real_image_folder_is_cropped_and_counted(tmp_path):
    from PIL import Image

    from data.images import list_images, load_square

    for i, size in enumerate([(40, 24), (24, 24), (30, 50)]):
        Image.new("RGB", size, (i * 60, 10, 200)).save(tmp_path / f"{i}.png")
    assert len(list_images(tmp_path)) == 3
    assert load_square(tmp_path / "0.png", 32).shape == (32, 32, 3)
    split = Split("in_domain", "builtin", ["a red circle"] * 65)
    settings = EvalSettings(steps=2, guidance=5.0, fid_dims=64, sfid=False, real_images=str(tmp_path))
    with pytest.raises(TooFewImagesError, match=r"FID to real on 64-dim features needs at least 65 .*real-images"):
        validate("tiny-random", [], [split], settings)


# ---------------------------------------------------------------------------
# the stage end to end (no Inception: fast), and a dynamic method plugging in
# ---------------------------------------------------------------------------
def test_evaluate_stage_writes_tables_grids_and_json(tmp_path, w8a8_state, tiny_clip_dir):
    """The stage end to end, with per-image scores, their intervals and the paired tests: the same state under
    two labels differs by exactly 0 (interval [0, 0], p = 1), and W4A8's paired difference to the baseline is
    the mean of the per-image differences stored in results.json. Breaks if the paired test reads the
    baseline's scores for both methods (W4A8's difference becomes 0), or if a table drops its image / prompt
    counts."""
    from pipeline.fit import main

    w4a8 = calibrated_state(tmp_path / "w4a8", w_bits=4, a_bits=8)
    exported = main(["export", "--model", "tiny-random", "--quant-state", str(w4a8), "--run-dir", str(tmp_path),
                     "--backend", "reference"])  # beside the state: the size column reads this artifact
    main(["evaluate", "--model", "tiny-random", "--quant-states", f"[{w8a8_state},{w8a8_state},{w4a8}]",
          "--labels", "[naive,again,w4a8]", "--n", "2", "--steps", "2",
          "--batch-size", "2", "--fid", "false", "--sfid", "false", "--clip", str(tiny_clip_dir), "--generalization",
          str(ROOT / "tests/assets/prompts.txt"), "--split-fractions", "0,0,1",  # 6 prompts: all of them test
          "--run-dir", str(tmp_path), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
          "--trainer.enable_progress_bar", "false"])
    out = tmp_path / "evaluate"
    res = json.loads((out / "results.json").read_text())
    rows = {(r["split"], r["method"]): r for r in res["rows"]}
    assert set(rows) == {(s, m) for s in ("in_domain", "generalization") for m in ("FP32", "naive", "again", "w4a8")}
    fp, q = rows[("in_domain", "FP32")], rows[("in_domain", "naive")]
    assert fp["fab"] == 32.0 and q["fab"] == 8.0 and q["bit_options"] == "W8A8"
    assert q["bitops_T"] == pytest.approx(fp["bitops_T"] / 16, rel=1e-9)  # every Conv/Linear at W8A8
    assert q["size_bytes"] < fp["size_bytes"] / 3
    # sizes are artifact bytes on disk: W4A8 its export's file; naive (no export beside it) a temporary export,
    # whose bytes an export of the same state reproduces; the arithmetic estimate stays a column of its own
    w4 = rows[("in_domain", "w4a8")]
    assert (w4["size_bytes"], w4["size_source"]) == ((exported / "unet.safetensors").stat().st_size,
                                                     "the export beside the state")
    again = main(["export", "--model", "tiny-random", "--quant-state", str(w8a8_state), "--run-dir",
                  str(tmp_path / "w8a8_export"), "--backend", "reference"])
    assert q["size_bytes"] == (again / "unet.safetensors").stat().st_size and q["size_source"].startswith("exported")
    assert q["size_estimate_bytes"] != q["size_bytes"] and "Size, arithmetic estimate (MiB)" in \
        (out / "results.md").read_text()
    assert 20 < q["psnr"] < 100 and 0 < q["ssim"] <= 1 and q["n_images"] == 2 and q["n_prompts"] == 2
    assert 0 <= q["clip_score"] <= 100 and 0 <= fp["clip_score"] <= 100
    per = res["per_image"]["in_domain"]
    assert "FP32" not in per and per["naive"]["index"] == [0, 1]
    for label in ("naive", "w4a8"):
        r = rows[("in_domain", label)]
        assert r["psnr"] == pytest.approx(np.mean(per[label]["psnr"]), rel=1e-12)
        assert r["psnr_ci_low"] <= r["psnr"] <= r["psnr_ci_high"] and r["ssim_ci_low"] <= r["ssim"] <= r["ssim_ci_high"]
    assert res["baseline"] == "naive" and res["statistics"]["n_resamples"] == 2000
    paired = {(p["split"], p["method"], p["metric"]): p for p in res["paired"]}
    assert set(paired) == {(s, m, k) for s in ("in_domain", "generalization") for m in ("again", "w4a8")
                           for k in ("psnr", "ssim")}
    same = paired[("in_domain", "again", "psnr")]
    assert (same["mean_diff"], same["ci_low"], same["ci_high"], same["p_wilcoxon"]) == (0.0, 0.0, 0.0, 1.0)
    diff = paired[("in_domain", "w4a8", "psnr")]
    want = np.mean(np.subtract(per["w4a8"]["psnr"], per["naive"]["psnr"]))
    assert diff["mean_diff"] == pytest.approx(want, rel=1e-12) and diff["mean_diff"] != 0
    assert diff["ci_low"] <= diff["mean_diff"] <= diff["ci_high"]
    assert diff["n_images"] == diff["n_prompts"] == 2 and diff["baseline"] == "naive"
    md = (out / "results.md").read_text()
    assert "| Method | Bit options | FAB | BitOPs (T) | FID | sFID | CLIP score | Images (prompts) |" in md
    assert "### Paired differences to naive" in md
    assert "| again | PSNR (dB) | 0.0000 | [0.0000, 0.0000] | 1 | 2 (2) |" in md
    assert md.count("| 2 (2) |") >= 3 * 2 * 4  # every row of the three tables, both splits
    assert (out / "grid_naive.png").is_file() and (out / "manifest.json").is_file()


def test_two_evaluate_seeds_score_the_same_prompts_with_other_noise(tmp_path, w8a8_state):
    """--seed 0 and --seed 1 draw the same world captions (the prompt seed is fixed) but generate other images:
    the per-image scores differ. --prompt-seed 1 draws other captions. Breaks if load_split draws with the
    evaluate seed again (the old behaviour: the prompts differ), or if a split's noise seeds ignore --seed."""
    from data.prompts import draw_prompts
    from pipeline.fit import main

    def run(seed: int, *extra) -> dict:
        main(["evaluate", "--model", "tiny-random", "--quant-states", f"[{w8a8_state}]", "--in-domain", "world:test",
              "--n", "3", "--steps", "2", "--batch-size", "3", "--fid", "false", "--sfid", "false", "--clip", "none",
              "--seed", str(seed), *extra, "--run-dir", str(tmp_path / f"s{seed}{''.join(extra)}"),
              "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.enable_progress_bar", "false"])
        return json.loads((tmp_path / f"s{seed}{''.join(extra)}" / "evaluate" / "results.json").read_text())

    a, b = run(0), run(1)
    assert draw_prompts("world:test", "test", 3, seed=1).prompts != draw_prompts("world:test", "test", 3).prompts
    assert a["splits"][0]["prompts"] == b["splits"][0]["prompts"] == draw_prompts("world:test", "test", 3).prompts
    assert (a["seed"], b["seed"], a["splits"][0]["prompt_seed"], b["splits"][0]["prompt_seed"]) == (0, 1, 0, 0)
    pa, pb = a["per_image"]["in_domain"]["naive"]["psnr"], b["per_image"]["in_domain"]["naive"]["psnr"]
    assert len(pa) == len(pb) == 3 and all(x != y for x, y in zip(pa, pb))
    other = run(0, "--prompt-seed", "1")
    assert other["splits"][0]["prompts"] == draw_prompts("world:test", "test", 3, seed=1).prompts


def test_baseline_must_name_an_evaluated_method(w8a8_state):
    """Breaks if an unknown --baseline falls back to the first method silently."""
    from pipeline.evaluation.plan import pick_baseline, plan_evaluation

    assert pick_baseline(None, ["a", "b"]) == "a" and pick_baseline("b", ["a", "b"]) == "b"
    assert pick_baseline(None, ["a"]) is None
    with pytest.raises(ValueError, match=r"--baseline 'c' is none of the evaluated methods \['naive'\]"):
        plan_evaluation("tiny-random", [str(w8a8_state)], None, "builtin", None, 2, 1, 0,
                        EvalSettings(fid=False, sfid=False), clip="none", baseline="c")


@register_method("test-dynamic")
class PromptLengthBits(StaticQuantState):
    """A toy text-aware method: 16-bit activations for batches with a long prompt."""

    text_aware = True

    def before_batch(self, pipe, prompts):
        from pipeline.quant import set_bit_policy

        set_bit_policy(pipe.unet, 16 if max(len(p) for p in prompts) > 20 else 8)


def test_a_per_batch_policy_method_plugs_in(tmp_path):
    from pipeline.models import tiny_pipeline
    from pipeline.quant import load_quantized

    path = calibrated_state(tmp_path / "dyn", a_bit_options=[8, 16])
    meta = json.loads((path / "quant_config.json").read_text())
    meta["extra"]["eval_method"] = "test-dynamic"
    (path / "quant_config.json").write_text(json.dumps(meta))
    method = method_from_state(path)
    assert isinstance(method, PromptLengthBits)
    load_quantized(tiny_pipeline(0).unet, path)  # still an ordinary state
    prompts = ["a red circle", "two dogs", "a striped purple circle at the top left", "a cat"]
    split = Split("in_domain", "test", prompts)
    settings = EvalSettings(steps=2, guidance=5.0, fid=False, sfid=False)
    res = run_evaluation("tiny-random", [method], [split], settings, batch_size=2,
                         trainer_kwargs={"accelerator": "cpu", "devices": 1, "enable_progress_bar": False})
    row = next(r for r in res["rows"] if r["method"] == "naive")
    assert row["fab"] == pytest.approx((2 * 8 + 2 * 16) / 4)  # batch 1 short prompts, batch 2 a long one
    assert row["bit_options"] == "W8A{8,16}"
    # --text-aware-batch-size 1: every prompt its own bits inside the same global batches (only the long one
    # at 16); the images equal those of an evaluation at batch 1
    settings.text_aware_batch = 1
    one = run_evaluation("tiny-random", [method], [split], settings, batch_size=2,
                         trainer_kwargs={"accelerator": "cpu", "devices": 1, "enable_progress_bar": False})
    assert next(r for r in one["rows"] if r["method"] == "naive")["fab"] == pytest.approx((3 * 8 + 16) / 4)
    settings.text_aware_batch = None
    ref = run_evaluation("tiny-random", [method], [split], settings, batch_size=1,
                         trainer_kwargs={"accelerator": "cpu", "devices": 1, "enable_progress_bar": False})
    assert one["per_image"]["naive"]["in_domain"]["psnr"] == pytest.approx(
        ref["per_image"]["naive"]["in_domain"]["psnr"], abs=1e-3)


@pytest.mark.slow
def test_evaluate_resumes_per_method_and_split(tmp_path, w8a8_state, monkeypatch):
    """Killed in the quantized method's second split, the rerun redoes only that pass: FP's reference
    (images and Inception features), the finished rows and their per-image scores come back from the progress
    folder, and the results (intervals and per-image scores included) equal an uninterrupted run's (timing
    aside). A corrupted reference file is redone, and so is a pass kept without per-image scores. Breaks if
    record_pass stops storing the per-image scores (the resumed pass has none)."""
    from pipeline.evaluation.module import MethodEvaluation

    prompts = ["a red circle", "two dogs", "a striped purple circle at the top left", "a cat"]
    splits = [Split("in_domain", "test", prompts[:2]), Split("generalization", "test", prompts[2:])]
    settings = EvalSettings(steps=2, guidance=5.0, fid=True, fid_dims=64, sfid=False, grid_n=2)
    splits = [Split(s.name, s.source, s.prompts, images_per_prompt=33) for s in splits]  # 66 > 64 for the FID
    kw = dict(batch_size=33, trainer_kwargs={"accelerator": "cpu", "devices": 1, "enable_progress_bar": False})
    method = [method_from_state(w8a8_state)]
    full = run_evaluation("tiny-random", method, splits, settings, progress_dir=tmp_path / "a", **kw)
    real, passes = MethodEvaluation.predict_step, []

    def killed(self, batch, idx):
        if not self.method.is_reference and batch["split"] == "generalization":
            raise RuntimeError("killed")
        return real(self, batch, idx)

    monkeypatch.setattr(MethodEvaluation, "predict_step", killed)
    with pytest.raises(RuntimeError, match="killed"):
        run_evaluation("tiny-random", method, splits, settings, progress_dir=tmp_path / "b", **kw)
    monkeypatch.setattr(MethodEvaluation, "predict_step",
                        lambda self, b, i: passes.append((self.method.label, b["split"])) or real(self, b, i))
    resumed = run_evaluation("tiny-random", method, splits, settings, progress_dir=tmp_path / "b", **kw)
    assert set(passes) == {("naive", "generalization")}
    timing = {"seconds_per_image", "metric_seconds_per_image", "generate_share"}
    strip = [{k: v for k, v in r.items() if k not in timing} for r in full["rows"]]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in resumed["rows"]]
    assert next(r for r in resumed["rows"] if r["method"] == "naive")["fid_to_fp"] > 0
    assert resumed["per_image"] == full["per_image"] and resumed["per_image"]["FP32"] == {"in_domain": None,
                                                                                          "generalization": None}
    kept = resumed["per_image"]["naive"]["in_domain"]  # from the progress folder (the pass was not redone)
    assert kept["index"] == list(range(66)) and len(kept["psnr"]) == 66
    assert all(r["psnr_ci_low"] < r["psnr"] < r["psnr_ci_high"] for r in resumed["rows"] if r["method"] == "naive")
    for label, per_split in full["grids"].items():
        for split, grid in per_split.items():
            assert np.array_equal(grid, resumed["grids"][label][split]), (label, split)
    ref = next((tmp_path / "b").glob("fp_*_rank0.safetensors"))
    ref.write_bytes(ref.read_bytes()[:-8] + b"\0" * 8)  # flipped bytes in the FP reference
    passes.clear()
    again = run_evaluation("tiny-random", method, splits, settings, progress_dir=tmp_path / "b", **kw)
    assert len(set(passes)) == 1 and passes[0][0] == "FP32"  # the bad split's FP pass, nothing else
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in again["rows"]]
    record = json.loads((tmp_path / "b" / "progress.json").read_text())
    del record["done"][json.dumps(["naive", "in_domain"])]["per_image"]  # kept by an older version
    (tmp_path / "b" / "progress.json").write_text(json.dumps(record))
    passes.clear()
    again = run_evaluation("tiny-random", method, splits, settings, progress_dir=tmp_path / "b", **kw)
    assert set(passes) == {("naive", "in_domain")} and again["per_image"] == full["per_image"]


# ---------------------------------------------------------------------------
# DDP: two processes give the numbers of one
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    state = calibrated_state(tmp_path / "w4a8", w_bits=4, a_bits=8, steps=2)
    results = {}
    for devices in (1, 2):
        cmd = [sys.executable, "-m", "pipeline.fit", "evaluate", "--model", "tiny-random", "--quant-states",
               f"[{state}]", "--n", "13", "--images-per-prompt", "5", "--steps", "2", "--batch-size", "4",
               "--fid-dims", "64", "--sfid", "false", "--run-dir", str(tmp_path / f"d{devices}"),
               "--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.strategy", "ddp",
               "--trainer.enable_progress_bar", "false"]
        env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = json.loads((tmp_path / f"d{devices}" / "evaluate" / "results.json").read_text())
    assert results[2]["world_size"] == 2 and results[1]["world_size"] == 1
    timing = {"seconds_per_image", "metric_seconds_per_image", "generate_share"}
    for one, two in zip(results[1]["rows"], results[2]["rows"]):
        assert one["method"] == two["method"] and one["n_images"] == two["n_images"] == 65
        for k, v in one.items():
            if k in timing or v is None or isinstance(v, str):
                continue
            assert two[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (one["method"], k)
    q = next(r for r in results[1]["rows"] if r["method"] == "naive")
    assert q["fid_to_fp"] > 0 and q["psnr"] > 0
    one, two = results[1]["per_image"]["in_domain"]["naive"], results[2]["per_image"]["in_domain"]["naive"]
    assert one["index"] == two["index"] == list(range(65))  # both processes' images, gathered in image order
    assert two["psnr"] == pytest.approx(one["psnr"], rel=1e-6) and two["ssim"] == pytest.approx(one["ssim"], rel=1e-6)


# ---------------------------------------------------------------------------
# CLIP score
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random transformers CLIPModel folder without processor files."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    path = tmp_path_factory.mktemp("clip") / "clip"
    CLIPModel(cfg).eval().save_pretrained(path)
    return path


def test_clip_score_equals_clip_cosine(tiny_clip_dir):
    from pipeline.metrics.clip import clip_score_metric, load_clip

    prompts = ["a red circle", "two green triangles", "a small yellow star"]
    x = smooth_images(3, side=48, seed=3)
    metric = clip_score_metric(tiny_clip_dir)
    metric.update(x, prompts)
    model, processor = load_clip(str(tiny_clip_dir))
    inputs = processor(text=prompts, images=list(x), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.model(**inputs)
    # torchmetrics clips the mean at 0, not each pair
    want = (100 * (out.image_embeds * out.text_embeds).sum(-1)).mean().clamp(min=0)
    assert float(metric.compute()) == pytest.approx(float(want), rel=1e-4, abs=1e-4)


def test_clip_option_errors(tmp_path):
    from pipeline.metrics.clip import ClipUnavailable, resolve_clip

    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        resolve_clip(str(tmp_path))
    with pytest.raises(ClipUnavailable, match="disabled"):
        resolve_clip("none")


# ---------------------------------------------------------------------------
# CLIP score on the embedded world
# ---------------------------------------------------------------------------
def test_clip_score_prefers_matched_captions():
    from pipeline.metrics.clip import world_clip_path

    clip = world_clip_path()
    if not (clip / "config.json").is_file():
        pytest.skip(f"{clip} is absent (the embedded world's CLIP)")
    from pipeline.metrics.clip import clip_score_metric
    from pipeline.models import EMBEDDED_DIR, load_pipeline
    from pipeline.sampling import generate

    if not (EMBEDDED_DIR / "model_index.json").is_file():
        pytest.skip("the embedded world model is absent")
    from data.prompts import load_prompts

    prompts = load_prompts("world", limit=16, split="val", seed=0)
    images = generate(load_pipeline("embedded"), prompts, list(range(len(prompts))), steps=20, progress=False)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    matched, shuffled = clip_score_metric(clip), clip_score_metric(clip)
    matched.update(x, prompts)
    shuffled.update(x, prompts[1:] + prompts[:1])
    assert float(matched.compute()) > float(shuffled.compute())


def test_world_real_images_are_renders_of_the_test_split(tmp_path):
    """--real-images world:N renders N test-split scenes once (a rerun reuses them) at the given size."""
    from data.images import list_images, load_square
    from data.world import render_split
    from pipeline.evaluation.real_images import world_real_images

    folder = world_real_images("world:5", tmp_path, 32)
    files = list_images(folder)
    assert len(files) == 5
    assert np.array_equal(load_square(files[3], 32), render_split("test", 5, resolution=32)[0][3])
    stamp = files[0].stat().st_mtime_ns
    assert world_real_images("world:5", tmp_path, 32) == folder and files[0].stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="world:N"):
        world_real_images("world:many", tmp_path)
