"""Q2B: structure and decisions for any bit-option list, the batch rule,
safetensors I/O, training (quality-weighted distortion + FAB steering) on the
seeded tiny model, text-aware generation and evaluation end to end, and the
clear errors. q is given directly: nothing here needs a trained T2Q."""
import json

import numpy as np
import pytest
import torch

from pipeline.metrics.cost import weighted_fab
from pipeline.qlip.q2b import Q2BModule, check_target_fab, load_q2b, save_q2b

OPTION_SETS = [[8, 16], [8, 16, 32], [6, 8, 16, 32], [4, 6, 8, 16, 32]]
STEPS = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def random_q2b(options, n_layers=6, steps=4, seed=0) -> Q2BModule:
    torch.manual_seed(seed)
    m = Q2BModule([f"layer{i}" for i in range(n_layers)], steps, options, q_mean=0.5, q_std=0.2)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 2)
    return m


# ---------------------------------------------------------------------------
# the module
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("options", OPTION_SETS)
def test_structure_probabilities_and_monotone_decisions(options):
    m = random_q2b(options)
    L, T, K = 6, 4, len(options)
    side = (K + 1) // 2
    assert sum(p.numel() for p in m.parameters()) == 2 * L + 2 * L * T * (side - 1)
    q = torch.linspace(-0.2, 1.2, 57)
    probs = m.probs(q)
    assert probs.shape == (57, L, T, K) and (probs >= 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(57, L, T))
    bits = m(q)
    assert bits.shape == (57, L, T) and set(bits.unique().tolist()) <= set(options)
    assert (bits[1:] >= bits[:-1]).all()  # more quality never means fewer bits
    assert (bits[-1] > bits[0]).any()  # and the gates do move across this range
    # the deterministic relaxed decision is the hard decision, one-hot
    hard = m.relaxed(q, tau=0.5, noise=False)
    assert torch.equal(hard.sum(-1), torch.ones(57, L, T)) and set(hard.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(m.options[hard.argmax(-1)].to(torch.int16), bits)
    # a Gumbel sample is one-hot over the options and passes gradients to every parameter
    sample = m.relaxed(q, tau=0.5, noise=True)
    assert torch.equal(sample.detach().sum(-1), torch.ones(57, L, T))
    (sample @ m.options).sum().backward()
    for name, p in m.named_parameters():
        assert p.numel() == 0 or p.grad.abs().sum() > 0, name


def test_sides_of_three_options():
    """{8, 16, 32}: the gate chooses {8, 16} or {16, 32}; the step terms choose within."""
    m = Q2BModule(["a", "b"], 2, [8, 16, 32])
    with torch.no_grad():
        m.gate_bias.copy_(torch.tensor([-50.0, 50.0]))  # layer a always low side, b always high
        m.low.copy_(torch.tensor([[[-5.0], [5.0]], [[5.0], [-5.0]]]))
        m.high.copy_(torch.tensor([[[5.0], [-5.0]], [[-5.0], [5.0]]]))
    assert m(torch.tensor([0.5])).tolist() == [[[8, 16], [16, 32]]]


def test_batch_takes_the_maximum_over_its_prompts():
    m = random_q2b([8, 16, 32], n_layers=10, steps=5)
    q = torch.tensor([0.1, 0.4, 0.45, 0.9])
    per_prompt, policy = m(q), m.batch_policy(q)
    assert torch.equal(policy, per_prompt.amax(0))
    w = torch.rand(10, dtype=torch.float64) + 0.1
    fabs = weighted_fab(per_prompt.double(), w)
    assert float(weighted_fab(policy.double(), w)) >= float(fabs.max())
    assert torch.equal(m.batch_policy(q[:1]), per_prompt[0])  # batch size 1: the prompt's own bits


def test_save_load_is_exact_and_pickle_free(tmp_path):
    m = random_q2b([6, 8, 16, 32], n_layers=7, steps=5)
    save_q2b(m, tmp_path / "q2b", {"criterion": "length"})
    files = sorted(p.name for p in (tmp_path / "q2b").iterdir())
    assert files == ["q2b.json", "q2b.safetensors"]
    meta = json.loads((tmp_path / "q2b" / "q2b.json").read_text())
    assert meta["bit_options"] == [6, 8, 16, 32] and meta["n_steps"] == 5 and meta["criterion"] == "length"
    back = load_q2b(tmp_path / "q2b")
    q = torch.linspace(-1, 2, 301)
    assert torch.equal(back(q), m(q))  # save rounded m to its fp16 storage: identical decisions
    assert back.memory_bytes() == m.memory_bytes() == 2 * (2 * 7 + 2 * 7 * 5)
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "q2b" / "q2b.safetensors"))["low"].dtype == torch.float16


def test_bit_shares_and_plots(tmp_path):
    from pipeline.plots import bit_shares, plot_bit_heatmaps, plot_bit_shares, plot_fab_vs_batch_size

    m = random_q2b([8, 16, 32], n_layers=6, steps=4)
    tables = m(torch.linspace(0, 1, 9))
    shares = bit_shares(tables, [8, 16, 32])
    assert shares.shape == (3, 6) and torch.allclose(shares.sum(0), torch.ones(6))
    assert float(shares[0, 2]) == pytest.approx(float((tables[:, 2] == 8).float().mean()))
    layers = ["conv_in", "down_blocks.0.attentions.0.proj_in", "down_blocks.0.resnets.0.conv1", "a", "b", "c"]
    for f in (plot_bit_heatmaps({"q=0": tables[0], "q=1": tables[-1]}, layers, [8, 16, 32], tmp_path / "h.png"),
              plot_bit_shares(tables, layers, [8, 16, 32], tmp_path / "s.png"),
              plot_fab_vs_batch_size({1: 11.0, 2: 12.5, 4: 14.0}, tmp_path / "b.png", baseline=16.0)):
        assert f.is_file() and f.stat().st_size > 1000


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------
def test_bad_input_is_named(tmp_path, tiny_pipe):
    from pipeline.quant import QuantConfig, act_banks, observing, quant_layers, quantize_unet

    m = random_q2b([8, 16, 32])
    save_q2b(m, tmp_path / "q2b")
    with pytest.raises(ValueError, match=r"trained for bit options \[8, 16, 32\], not \[8, 16\]"):
        load_q2b(tmp_path / "q2b", bit_options=[8, 16])
    layers = m.layers
    with pytest.raises(ValueError, match="another layer list.*missing \\['layer5'\\]"):
        m.check_layout(layers[:-1], 4, [8, 16, 32])
    with pytest.raises(ValueError, match="same layers, other order"):
        m.check_layout(layers[::-1], 4, [8, 16, 32])
    with pytest.raises(ValueError, match="addresses 4 sampling steps"):
        m.check_layout(layers, 20, [8, 16, 32])
    with pytest.raises(ValueError, match=r"lacks the \[32\]-bit .*--a-bit-options 8,16,32"):
        m.check_layout(layers, 4, [8, 16])
    for target in (7.9, 32.5):
        with pytest.raises(ValueError, match=r"target FAB .* outside \[8, 32\]"):
            check_target_fab(target, [8, 16, 32])
    assert check_target_fab(8, [8, 16, 32]) == 8.0
    with pytest.raises(ValueError, match="at least two distinct"):
        Q2BModule(["a"], 2, [8, 8])
    with pytest.raises(ValueError, match="q_std"):
        Q2BModule(["a"], 2, [8, 16], q_std=0.0)
    with pytest.raises(FileNotFoundError, match="not a Q2B checkpoint"):
        load_q2b(tmp_path)
    # a quantized UNet: its real layer list, first with no quantizer calibrated
    unet = tiny_pipe.unet
    quantize_unet(unet, QuantConfig(w_bits=8, a_bits=8, a_bit_options=[8, 16, 32], n_steps=4))
    q2b = Q2BModule(list(quant_layers(unet)), 4, [8, 16, 32])
    with pytest.raises(ValueError, match="no calibrated 8-bit quantizer"):
        q2b.check_unet(unet)  # nothing calibrated yet
    with observing(unet), torch.no_grad():
        unet(torch.randn(2, 4, 8, 8), 500, torch.randn(2, 77, 64))
    for bank in act_banks(unet).values():
        bank.finalize()
    q2b.check_unet(unet)
    Q2BModule(list(quant_layers(unet)), 4, [8, 16]).check_unet(unet)  # a subset of the bank is fine
    with pytest.raises(ValueError, match=r"lacks the \[6\]-bit"):
        Q2BModule(list(quant_layers(unet)), 4, [6, 16]).check_unet(unet)


def test_stage_refuses_bad_options_and_targets_before_loading(tmp_path, tiny_state):
    from pipeline.fit import main

    state, _ = tiny_state
    base = ["q2b", "--model", "tiny-random", "--quant-state", str(state), "--criterion", "length",
            "--run-dir", str(tmp_path)]
    with pytest.raises(ValueError, match=r"target FAB 40.0 is outside \[8, 32\]"):
        main(base + ["--target-fab", "40"])
    with pytest.raises(ValueError, match=r"lacks the \[6\]-bit activation quantizers"):
        main(base + ["--bit-options", "6,8,16"])
    with pytest.raises(ValueError, match="--criterion t2q needs --t2q"):
        main(base[:-4] + ["--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--criterion 'magic'"):
        main(base + ["--criterion", "magic"])
    assert not (tmp_path / "q2b").exists()


# ---------------------------------------------------------------------------
# training on the seeded tiny model
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_state(tmp_path_factory):
    """A naive W4A8 state with options {8, 16, 32} for STEPS steps, and training
    items of 8 prompts at 16x16 pixels (latent 8x8) with q = 0, 1/7, ..., 1."""
    from data.prompts import load_prompts
    from pipeline.calibration.data import CalibrationData, collect
    from pipeline.models import tiny_pipeline
    from pipeline.qlip.train import training_items
    from pipeline.quant import QuantConfig, act_banks, observing, quantize_unet, save_quantized
    from pipeline.sampling import generate

    root = tmp_path_factory.mktemp("q2b")
    pipe = tiny_pipeline(0)
    prompts = load_prompts("builtin", 8)
    collect(pipe, prompts, root / "cali", steps=STEPS, cali_st=STEPS, batch_size=4, resolution=16)
    q = torch.linspace(0, 1, 8)
    items = training_items(pipe.unet, CalibrationData(root / "cali"), q)
    quantize_unet(pipe.unet, QuantConfig(w_bits=4, a_bits=8, a_bit_options=[8, 16, 32], n_steps=STEPS))
    with observing(pipe.unet):
        generate(pipe, prompts[:2], steps=STEPS, resolution=16, progress=False)
    for bank in act_banks(pipe.unet).values():
        bank.finalize()
    save_quantized(pipe.unet, root / "quant", extra={"method": "naive", "model": "tiny-random"})
    return root / "quant", items


def trained(tiny_state, target, epochs=10, **hp):
    from pipeline.metrics.cost import fab_weights, layer_stats
    from pipeline.models import tiny_pipeline
    from pipeline.qlip.train import fit_q2b
    from pipeline.quant import load_quantized, quant_layers

    state, items = tiny_state
    unet = load_quantized(tiny_pipeline(0).unet, state)[0]
    layers = list(quant_layers(unet))
    q = torch.cat([it["q"] for it in items[::STEPS]])
    q2b = Q2BModule(layers, STEPS, [8, 16, 32], float(q.mean()), float(q.std()))
    w = fab_weights(layer_stats(unet), layers)
    module = fit_q2b(unet, q2b, items, w, target, 5.0, epochs=epochs,
                     trainer_kwargs={"enable_progress_bar": False}, **hp)
    return q2b, w, module


def quality_spread(q2b, w) -> tuple[torch.Tensor, float]:
    """Per-prompt FAB of the 8 training qualities, and richer half minus poorer half."""
    fab = weighted_fab(q2b(torch.linspace(0, 1, 8)).double(), w)
    return fab, float(fab[4:].mean() - fab[:4].mean())


def test_training_reaches_the_target_and_follows_quality(tiny_state):
    from pipeline.qlip.train import spearman

    q2b, w, module = trained(tiny_state, target=12.0, kappa=2.0)
    fab, spread = quality_spread(q2b, w)
    assert abs(float(fab.mean()) - 12.0) <= 1.0, fab
    assert spearman(torch.linspace(0, 1, 8), fab) >= 0.8, fab
    assert spread > 0.15, fab  # the richer half gets more bits
    assert len(module.history) == 10 and module.history[-1]["tau"] == pytest.approx(0.2)
    assert set(q2b(torch.linspace(-3, 3, 50)).unique().tolist()) <= {8, 16, 32}


def test_a_killed_training_resumes_from_its_epoch_checkpoint_and_ends_identical(tiny_state, tmp_path):
    """Killed at the start of epoch 2 of 4 (an exception: the checkpoint of epochs 0-1 is on disk), the
    rerun restores tables, Adam, the dual variable, the history and the random states (Gumbel noise,
    shuffling) and ends tensor-identical to an uninterrupted run. Other settings are refused."""
    import lightning as L

    from pipeline.errors import RunDirError

    class Kill(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if pl_module.epoch == 2:
                raise RuntimeError("killed")

    sig = {"run": "test"}
    full, _, module_full = trained(tiny_state, 12.0, epochs=4, progress={"folder": tmp_path / "a", "signature": sig})
    with pytest.raises(RuntimeError, match="killed"):
        trained(tiny_state, 12.0, epochs=4, progress={"folder": tmp_path / "b", "signature": sig}, callbacks=[Kill()])
    assert json.loads((tmp_path / "b" / "progress.json").read_text())["epochs_done"] == 2
    resumed, _, module = trained(tiny_state, 12.0, epochs=4, progress={"folder": tmp_path / "b", "signature": sig})
    assert module.epoch_offset == 2
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert module.lam == module_full.lam and module.history == module_full.history
    # killed after the last epoch's checkpoint (before the stage saved the result): nothing left to train
    again, _, module = trained(tiny_state, 12.0, epochs=4, progress={"folder": tmp_path / "a", "signature": sig})
    assert module.epoch_offset == 4 and all(torch.equal(v, again.state_dict()[k]) for k, v in full.state_dict().items())
    with pytest.raises(RunDirError, match="Q2B training progress of other settings.*run"):
        trained(tiny_state, 12.0, epochs=4, progress={"folder": tmp_path / "b", "signature": {"run": "other"}})


@pytest.mark.slow
@pytest.mark.parametrize("target", [10.0, 16.0])
def test_fab_steering_follows_the_target(tiny_state, target):
    q2b, w, _ = trained(tiny_state, target=target)
    fab, _ = quality_spread(q2b, w)
    assert abs(float(fab.mean()) - target) <= 1.0, fab


@pytest.mark.slow
def test_the_quality_weighting_is_what_makes_bits_follow_q(tiny_state):
    """w(q) decreasing in q (kappa < 0) leaves only what the initial gates held;
    increasing (kappa > 0) makes the gates follow q."""
    spreads = {k: quality_spread(*trained(tiny_state, target=12.0, kappa=k)[:2])[1] for k in (-1.0, 2.0)}
    assert spreads[2.0] > spreads[-1.0] + 0.1, spreads


# ---------------------------------------------------------------------------
# text-aware generation and evaluation end to end (quality = prompt length)
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_stage_generate_and_evaluate_end_to_end(tmp_path, capsys, monkeypatch):
    from data.tokenizer import clip_tokenizer
    from pipeline.fit import main
    from pipeline.qlip.sources import PromptLength

    common = ["--model", "tiny-random", "--run-dir", str(tmp_path)]
    main(["calibrate", *common, "--method", "naive", "--w-bits", "4", "--a-bits", "16", "--a-bit-options",
          "8,16,32", "--prompts", "builtin", "--cali-n", "2", "--steps", str(STEPS),
          "--trainer.enable_progress_bar", "false"])
    main(["q2b", *common, "--quant-state", str(tmp_path / "quant"), "--criterion", "length", "--prompts", "builtin",
          "--n", "8", "--val-n", "8", "--batch-size", "4", "--resolution", "16", "--epochs", "6",
          "--trainer.enable_progress_bar", "false"])
    out = tmp_path / "q2b"
    manifest = json.loads((out / "manifest.json").read_text())["metrics"]
    assert 8 <= manifest["fab_train"] <= 16 and manifest["memory_bytes"] > 0
    for f in ("q2b.safetensors", "q2b.json", "bits_heatmap.png", "bit_shares.png"):
        assert (out / f).is_file(), f
    assert list((out / "training").glob("bits_epoch*.png"))  # the training callback's heatmaps
    assert json.loads((out / "q2b.json").read_text())["quant_state"] == "../quant"  # the run dir can move
    capsys.readouterr()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na large striped purple circle at the top left on a gray background\n"
                       "two stars\na small dotted orange triangle in the center\n")
    from data.prompts import draw_prompts  # evaluate takes its test split in hash order: generate the same batches
    prompts.write_text("\n".join(draw_prompts(str(prompts), "test", fractions=(0, 0, 1)).prompts) + "\n")
    main(["generate", *common, "--q2b", str(out), "--prompts", str(prompts), "--n", "4", "--steps", str(STEPS),
          "--batch-size", "2"])
    assert capsys.readouterr().out.count("-> FAB") == 2  # one logged line per batch
    bits = json.loads((tmp_path / "images" / "bits.json").read_text())
    q2b = load_q2b(out)
    from safetensors.torch import load_file

    tables = load_file(str(tmp_path / "images" / "bits.safetensors"))["policies"]
    lines = prompts.read_text().splitlines()
    for i, batch in enumerate(bits["batches"]):
        q = PromptLength(clip_tokenizer()).predict(lines[2 * i:2 * i + 2])
        assert batch["q"] == q.tolist()
        assert torch.equal(tables[i], q2b(q).amax(0))  # the batch rule, as generated
        assert batch["fab"] >= max(batch["prompt_fab"]) - 1e-9
    main(["evaluate", *common, "--quant-states", f"[{tmp_path / 'quant'},{out}]", "--in-domain", str(prompts),
          "--split-fractions", "0,0,1", "--n", "4", "--steps", str(STEPS), "--batch-size", "2", "--fid", "false",
          "--sfid", "false", "--clip", "none", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
          "--trainer.enable_progress_bar", "false"])
    rows = {r["method"]: r for r in json.loads((tmp_path / "evaluate" / "results.json").read_text())["rows"]}
    assert rows["naive"]["bit_options"] == "W4A16" and rows["naive"]["fab"] == 16.0
    qlip = rows["naive+QLIP"]
    assert qlip["bit_options"] == "W4A{8,16,32}" and qlip["kind"] == "qlip"
    assert qlip["fab"] == pytest.approx(sum(b["fab"] for b in bits["batches"]) / 2, rel=1e-6)
    assert qlip["size_bytes"] > 0 and qlip["size_source"] == "exported to a temporary folder"
    # a Q2B whose criterion cannot deploy (the complexity oracle) still evaluates, with no artifact size
    import pipeline.deploy.size as size
    from pipeline.models import load_quantized_pipeline

    def refused(*args, **kwargs):
        raise ValueError("its quality criterion 'complexity' needs an FP image per prompt")

    monkeypatch.setattr(size, "qlip_payload", refused)
    unet = load_quantized_pipeline("tiny-random", tmp_path / "quant").unet
    assert size.artifact_bytes(unet, tmp_path / "quant", out, "tiny-random") == \
        (None, "not exportable: its quality criterion 'complexity' needs an FP image per prompt")


@pytest.mark.slow
def test_end_to_end_through_t2q(tmp_path):
    """T2Q -> Q2B -> bits -> images on the embedded world. The T2Q head is
    untrained (its predictions vary a little per prompt; its quality is not
    the point here): the data path is."""
    from pipeline.fit import main
    from pipeline.models import EMBEDDED_DIR
    from pipeline.qlip.pipeline import QLIPPipeline
    from pipeline.quant import get_bit_policy

    t2q = pytest.importorskip("pipeline.qlip.t2q")
    if not (EMBEDDED_DIR / "clip" / "config.json").is_file():
        pytest.skip("the embedded world (with its CLIP) is not in checkpoints/")
    torch.manual_seed(0)
    t2q.save_t2q(t2q.T2QModule(t2q.load_text_tower("embedded")), tmp_path / "t2q")
    common = ["--model", "embedded", "--run-dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]
    main(["calibrate", *common, "--method", "naive", "--w-bits", "8", "--a-bits", "16", "--a-bit-options", "8,16",
          "--prompts", "builtin", "--cali-n", "2", "--steps", str(STEPS)])
    main(["q2b", *common, "--quant-state", str(tmp_path / "quant"), "--t2q", str(tmp_path / "t2q"),
          "--prompts", "builtin", "--n", "8", "--val-n", "0", "--batch-size", "4", "--epochs", "2"])
    qlip = QLIPPipeline.from_pretrained(tmp_path / "q2b")
    prompts = ["a red circle", "a large striped red circle on the left on a gray background", "two stars"]
    record = qlip.set_bits(prompts)
    q = t2q.load_t2q(tmp_path / "t2q").predict(prompts)
    assert torch.allclose(torch.tensor(record["q"]), q)
    assert torch.equal(record["policy"], qlip.q2b(q).amax(0))
    assert torch.equal(get_bit_policy(qlip.pipe.unet), record["policy"].to(torch.int16))
    out = qlip(prompts[:2], batch_size=1)
    assert out.images.shape[0] == 2 and len(out.batches) == 2 and 8 <= out.fab <= 16

    # The T2Q reads the world's own text encoder: one text pass serves quality and generation.
    from pipeline.models import tiny_pipeline
    from pipeline.sampling import encode_prompts, generate

    assert qlip.shares_text_encoder
    assert not t2q.load_t2q(tmp_path / "t2q").reads_same_text_as(tiny_pipeline(0).tokenizer,
                                                                  tiny_pipeline(0).text_encoder)
    text = encode_prompts(qlip.pipe, prompts)
    cond, uncond, pooled = text.cond, text.uncond, text.pooled
    with torch.no_grad():  # the pipeline's own encoding
        ref_cond, ref_uncond = qlip.pipe.encode_prompt(prompts, "cpu", 1, True)
    assert torch.equal(cond, ref_cond) and torch.equal(uncond, ref_uncond)
    assert torch.allclose(pooled, qlip.quality_source.encode(prompts, cache=False), atol=1e-5)
    assert torch.allclose(torch.tensor(qlip.set_bits(prompts, pooled=pooled)["q"]), q, atol=1e-6)
    shared = generate(qlip.pipe, prompts[:1], [3], steps=STEPS, progress=False, text=text.rows(slice(0, 1)))
    assert np.array_equal(shared, generate(qlip.pipe, prompts[:1], [3], steps=STEPS, progress=False))
    from pipeline.evaluation.methods import method_from_state  # evaluation shares the pass the same way

    method = method_from_state(tmp_path / "q2b")
    assert method.text_aware  # a T2Q criterion: evaluate may split batches so each prompt gets its own bits
    eval_pipe = method.load("embedded")
    embeds = method.before_batch(eval_pipe, prompts)
    assert embeds is not None and torch.equal(embeds.cond, ref_cond) and torch.equal(embeds.uncond, ref_uncond)
    assert torch.equal(get_bit_policy(eval_pipe.unet), record["policy"].to(torch.int16))


def test_q2b_saves_and_loads_the_diffusers_way(tmp_path):
    q2b = Q2BModule(["a", "b"], 3, [8, 16, 32], 0.5, 0.1)
    with torch.no_grad():
        q2b.gate_bias.add_(0.3)
    q2b.save_pretrained(tmp_path / "q")
    back = Q2BModule.from_pretrained(tmp_path / "q", bit_options=[8, 16, 32])
    q = torch.tensor([0.2, 0.5, 0.9])
    assert torch.equal(q2b(q), back(q))
