"""Every stage on a tiny seeded pipeline of each family, saved as a diffusers folder with the family's own
scheduler: SD 1.x with PNDM (steps_offset 1), SD 2.x with v-prediction (DDIM), SDXL with its Euler
scheduler and two text encoders. calibrate (progressive + relaxing; PTQD = Q-Diffusion + its statistics),
score, t2q, q2b, generate and evaluate, chained as a user would."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_schedulers import family_folder  # the family folders the scheduler tests build
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

import pipeline.api as api
from data.tokenizer import clip_tokenizer
from pipeline.models import TINY_TEXT_CONFIG, load_pipeline, pooled_text_encoder, tiny_sdxl_pipeline
from pipeline.qlip.t2q import load_t2q
from pipeline.quant import load_quantized

QUIET = {"enable_progress_bar": False}


def _model(root, family: str) -> tuple[str, str | None]:
    """(model folder, T2Q's --clip folder or None when the model carries its projection, as SDXL does)."""
    if family == "sdxl":
        out = root / "sdxl"
        tiny_sdxl_pipeline(0).save_pretrained(out, safe_serialization=True)
        return str(out), None
    model = family_folder(root, family)
    # SD text encoders have no projection: T2Q reads a CLIPTextModelWithProjection of the same text weights
    clip = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT_CONFIG))
    text = load_pipeline(model).text_encoder
    getattr(clip, "text_model", clip).load_state_dict(getattr(text, "text_model", text).state_dict())
    clip.save_pretrained(root / "clip", safe_serialization=True)
    clip_tokenizer().save_pretrained(root / "clip")
    return model, str(root / "clip")


def _reference_images(folder, n=8):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return str(folder)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1-pndm", "sd2-v", "sdxl"])
def test_every_stage_runs_on_each_family(tmp_path, family):
    model, clip = _model(tmp_path, family)
    common = {"model": model, "run_dir": str(tmp_path / "run")}
    # iters_w 2: AdaRound over every unit's captured inputs (SDXL's added conditioning inside the blocks' kwargs)
    cali = {"prompts": "builtin", "cali_n": 4, "batch_size": 2, "steps": 3, "cali_st": 3, "iters_w": 2, "iters_a": 0}

    def calibrate(folder, **kw):
        return api.calibrate(api.CalibrateConfig(**{**common, "run_dir": str(tmp_path / folder)}, **cali, **kw),
                             trainer=QUIET)

    naive = calibrate("naive", method="naive", progressive=True, relax_tau=0.34)
    metrics = json.loads((naive / "manifest.json").read_text())["metrics"]
    want = ("xT", [0]) if family == "sdxl" else ("x0", [2])  # PCR: SDXL relaxes the x_T end, SD the x_0 end
    assert (metrics["relax_end"], metrics["relaxed_steps"]) == want
    state = calibrate("run", method="ptqd", a_bit_options="8,16", time_aware=True)
    _, _, extra = load_quantized(load_pipeline(model).unet, state)
    assert extra["ptqd_k"].shape == (3,) and torch.isfinite(extra["ptqd_bias"]).all()

    scored = api.score(api.ScoreConfig(**common, prompts="builtin", steps=3, split_fractions="0.5,0.5,0",
                                       reference=_reference_images(tmp_path / "ref"), gmm_components=2, pca_dim=4,
                                       n_reference=8), trainer=QUIET)
    t2q_dir = api.t2q(api.T2QConfig(**common, scored=str(scored), clip=clip, epochs=1, richness=False),
                      trainer=QUIET)
    assert load_t2q(t2q_dir).reads_same_text_as(*pooled_text_encoder(load_pipeline(model)))  # one shared pass
    qlip = api.q2b(api.Q2BConfig(**common, quant_state=str(state), t2q=str(t2q_dir), bit_options="8,16",
                                 target_fab=12.0, prompts="builtin", n=4, val_n=2, batch_size=2, epochs=1),
                   trainer=QUIET)
    images = api.generate(api.GenerateConfig(**common, quant_state=str(state), prompts="builtin", n=2, steps=3))
    assert len(list((images / "images").glob("*.png"))) == 2
    ev = api.evaluate(api.EvaluateConfig(**common, quant_states=[str(qlip)], labels=["QLIP"], in_domain="builtin",
                                         n=4, steps=3, batch_size=2, fid=False, sfid=False, lpips=False,
                                         clip="none"), trainer=QUIET)
    rows = json.loads((ev / "results.json").read_text())["rows"]
    assert rows[-1]["method"] == "QLIP" and 8 <= rows[-1]["fab"] <= 16


@pytest.mark.parametrize("family", ["sd2-v", "sdxl"])
def test_deployed_unet_generates_on_each_family(tmp_path, family):
    """Symmetric W8A8 exported and generated on the int8 kernels, in the fp32 and the bf16 runtime: SD 2.x's
    v-prediction and SDXL's added conditioning (text_embeds, time_ids) pass through the deployed UNet's fp32
    door. Measured PSNR to the fake-quant images (3 steps): sd2-v 36 / 35-36 dB, sdxl 42-43 / 39 dB."""
    from pipeline.deploy import attach
    from pipeline.deploy.backends import onednn_bf16_missing
    from pipeline.deploy.timing import psnr_per_image
    from pipeline.sampling import generate

    if onednn_bf16_missing():
        pytest.skip(f"the deployed runtimes need oneDNN's int8 kernels writing bf16: {onednn_bf16_missing()}")

    model, _ = _model(tmp_path, family)
    state = api.calibrate(api.CalibrateConfig(model=model, run_dir=str(tmp_path / "w8s"), method="naive", w_bits=8,
                                              a_bits=8, weight_symmetric=True, prompts="builtin", cali_n=2, steps=3),
                          trainer=QUIET)
    api.export(api.ExportConfig(model=model, quant_state=str(state), run_dir=str(tmp_path / "w8s")))
    prompts = ["a red cube", "two cats on a sofa"]
    fake = load_pipeline(model)
    load_quantized(fake.unet, state)
    ref = generate(fake, prompts, steps=3, progress=False)
    for dtype in ("fp32", "bf16"):
        pipe = attach(load_pipeline(model), tmp_path / "w8s" / "deploy", "onednn", dtype=dtype)
        assert not any(k[3] is not None for m in pipe.unet.modules() for k in getattr(m, "kernels", []))
        psnr = psnr_per_image(ref, generate(pipe, prompts, steps=3, progress=False))
        assert psnr.min() >= 30, (dtype, psnr)
