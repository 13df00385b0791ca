"""Any diffusers scheduler: the step index of a quantized UNet is the sampler's
call counter, stochastic samplers are seeded per prompt, and tiny seeded
pipelines of the real families (SD 1.x with PNDM, steps_offset 1; SD 2.x
v-prediction) run the quantized stages from a diffusers folder."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler
from safetensors.torch import load_file

from pipeline.api import CalibrateConfig, GenerateConfig, calibrate, generate
from pipeline.models import SCHEDULERS, SD_SCHEDULER_CONFIG, load_pipeline, set_scheduler, tiny_pipeline
from pipeline.quant import QuantConfig, call_steps, quantize_unet, set_schedule
from pipeline.sampling import denoise, encode_prompts, generate as sample, initial_latents, noise_generators

PROMPTS = ["a red circle", "a small blue square on the left"]
BASE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
FAMILIES = {  # the schedulers these families ship with
    "sd1-pndm": PNDMScheduler(**BASE, steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False),
    "sd2-v": DDIMScheduler(**BASE, steps_offset=1, clip_sample=False, set_alpha_to_one=False,
                           prediction_type="v_prediction"),
}


def family_folder(root, family: str):
    """A tiny seeded pipeline of `family` saved as a diffusers folder (safetensors)."""
    pipe = tiny_pipeline(0)
    pipe.scheduler = FAMILIES[family]
    out = root / family
    pipe.save_pretrained(out, safe_serialization=True)
    return str(out)


def _with(name: str):
    pipe = tiny_pipeline(0)
    pipe.scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    return set_scheduler(pipe, name)


def test_call_steps_map_every_call_of_a_run_onto_its_steps():
    for name in SCHEDULERS:
        pipe = _with(name)
        pipe.scheduler.set_timesteps(6)
        mapping = call_steps(pipe.scheduler.timesteps)
        assert mapping[0] == 0 and mapping[-1] == 5, (name, mapping)
        assert all(b - a in (0, 1) for a, b in zip(mapping, mapping[1:])), (name, mapping)
    pndm, heun = _with("pndm"), _with("heun")
    pndm.scheduler.set_timesteps(6)
    heun.scheduler.set_timesteps(6)
    assert call_steps(pndm.scheduler.timesteps) == [0, 1, 1, 2, 3, 4, 5]  # PLMS repeats its second timestep
    assert call_steps(heun.scheduler.timesteps) == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]  # second-order evaluations


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_project_sampler_matches_the_pipeline_call(name):
    """denoise() (calibration data, PCR, Q2B targets) and the diffusers pipeline's own __call__
    give the same final latents for the same prompts and seeds, stochastic samplers included."""
    pipe = _with(name)
    text = encode_prompts(pipe, PROMPTS)
    gens = noise_generators([3, 4])
    ours = denoise(pipe, text, initial_latents(pipe, generators=gens), 4, 5.0, generators=gens)
    gens = noise_generators([3, 4])
    theirs = pipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, latents=initial_latents(pipe, generators=gens),
                  generator=gens, output_type="latent").images
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", ["euler-ancestral", "ddpm", "lcm"])
def test_stochastic_samplers_are_seeded_per_prompt(name):
    pipe = _with(name)
    a = sample(pipe, PROMPTS, [7, 8], steps=4, progress=False)
    b = sample(pipe, PROMPTS, [7, 8], steps=4, progress=False)
    alone = sample(pipe, PROMPTS[1:], [8], steps=4, progress=False, batch_size=1)
    assert np.array_equal(a, b)  # the same seed gives the same image
    assert np.abs(a[1].astype(int) - alone[0]).max() <= 1  # and does not depend on its batch
    other = sample(pipe, PROMPTS, [9, 10], steps=4, progress=False)
    assert np.abs(a.astype(int) - other).max() > 20  # the seed, not a fixed noise, decides


def test_ddim_eta_draws_seeded_noise():
    pipe = _with("ddim")
    a = sample(pipe, PROMPTS, [1, 2], steps=4, progress=False, eta=0.8)
    assert np.array_equal(a, sample(pipe, PROMPTS, [1, 2], steps=4, progress=False, eta=0.8))
    assert not np.array_equal(a, sample(pipe, PROMPTS, [1, 2], steps=4, progress=False, eta=0.0))


def test_quantized_unet_sees_each_step_once_per_noise_level_under_pndm():
    pipe = _with("pndm")
    quantize_unet(pipe.unet, QuantConfig(w_bits=8, a_bits=8, n_steps=4, time_aware=True))
    seen = []
    pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(m.quant_context.step))
    sample(pipe, PROMPTS, [0, 1], steps=4, progress=False, batch_size=1)
    assert seen == [0, 1, 1, 2, 3] * 2  # the count wraps after each run
    pipe.scheduler.set_timesteps(5)
    with pytest.raises(ValueError, match=r"has 5 steps \(6 UNet calls\).*calibrated for 4"):
        set_schedule(pipe.unet, pipe.scheduler.timesteps)


@pytest.mark.parametrize("family,method", [("sd1-pndm", "qdiff"), ("sd2-v", "naive")])
def test_quantized_stages_run_on_a_family_folder(tmp_path, family, method):
    """calibrate (time-aware) and generate from a diffusers folder with the family's own scheduler;
    qdiff on PNDM exercises calibration data and reconstruction under its repeated timestep."""
    model = family_folder(tmp_path, family)
    assert type(load_pipeline(model).scheduler) is type(FAMILIES[family])
    run = tmp_path / "run"
    state = calibrate(CalibrateConfig(model=model, method=method, w_bits=8, a_bits=8, time_aware=True,
                                      prompts="builtin", cali_n=2, batch_size=2, steps=3, cali_st=2, iters_w=2,
                                      iters_a=1, run_dir=str(run)), trainer={"enable_progress_bar": False})
    out = generate(GenerateConfig(model=model, quant_state=str(state), prompts="builtin", n=2, steps=3,
                                  run_dir=str(run)))
    assert len(list((out / "images").glob("*.png"))) == 2


def test_scheduler_flag_and_pickle_refusal(tmp_path):
    with pytest.raises(ValueError, match="--scheduler 'unipc' is not supported; choose one of pndm, ddim"):
        load_pipeline("tiny-random", scheduler="unipc")
    assert type(load_pipeline("tiny-random", scheduler="euler-ancestral").scheduler).__name__ == \
        "EulerAncestralDiscreteScheduler"
    folder = tmp_path / "pickled"
    tiny_pipeline(0).save_pretrained(folder, safe_serialization=True)
    unet_dir = folder / "unet"
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), unet_dir / "diffusion_pytorch_model.bin")  # the UNet as pickle only
    weights.unlink()
    with pytest.raises(ValueError, match="only pickle weights.*--allow-pickle true"):
        load_pipeline(str(folder))
    assert load_pipeline(str(folder), allow_pickle=True).unet is not None


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pndm", "dpm++", "euler-ancestral"])
def test_w8a8_naive_stays_close_to_fp_on_the_world(tmp_path, name):
    """Same prompts, seeds and noise for FP and W8A8 under each sampler: the images stay close, while FP
    images of other seeds are far (asserted below 20 dB), so the bound separates. A multistep sampler can let
    one trajectory diverge, so the bound is on 3 of the 4 images. Measured per-image PSNR (these 4 prompts,
    these settings, with split shortcut weight ranges): PNDM 13.4 / 26.1 / 33.7 / 23.4 (mean 24.2; 29.5
    before the split ranges), DPM-Solver++ 42.9 / 43.2 / 43.3 / 38.7 (mean 34.6 before, one trajectory diverging
    to 13.6), Euler ancestral 49.7 / 47.7 / 47.4 / 36.2."""
    from pipeline.models import EMBEDDED, EMBEDDED_DIR
    from pipeline.quant import load_quantized

    if not (EMBEDDED_DIR / "model_index.json").is_file():
        pytest.skip("the embedded world is not shipped")
    state = calibrate(CalibrateConfig(model=EMBEDDED, method="naive", scheduler=name, prompts="world", cali_n=4,
                                      batch_size=4, steps=20, run_dir=str(tmp_path)),
                      trainer={"enable_progress_bar": False})
    pipe = load_pipeline(EMBEDDED, scheduler=name)
    prompts = ["a red circle on a blue background", "a large striped green triangle on the left",
               "two yellow squares on a black background", "a small dotted white star"]
    fp = sample(pipe, prompts, [0, 1, 2, 3], steps=20, progress=False)
    others = sample(pipe, prompts, [10, 11, 12, 13], steps=20, progress=False)
    load_quantized(pipe.unet, state)
    q = sample(pipe, prompts, [0, 1, 2, 3], steps=20, progress=False)

    def psnr(a, b):  # per image
        return 10 * np.log10(255 ** 2 / ((a.astype(np.float64) - b) ** 2).mean(axis=(1, 2, 3)))

    close, far = psnr(fp, q), psnr(fp, others)
    print(f"{name}: W8A8 naive PSNR to FP {np.round(close, 1)} dB; other seeds {np.round(far, 1)} dB")
    assert (close > 23).sum() >= 3 and far.mean() < 20
