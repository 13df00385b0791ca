"""SDXL end to end, on a tiny seeded StableDiffusionXLPipeline saved as a diffusers
folder with SDXL's own Euler scheduler: both text encoders, the pooled text
embedding and the time ids reach the UNet in the project's own sampler exactly
as in the pipeline's `__call__` (every stage runs on it: tests/test_families.py)."""
import pytest
import torch

from pipeline.calibration.data import CalibrationData, collect
from pipeline.models import load_pipeline, tiny_pipeline, tiny_sdxl_pipeline
from pipeline.quant import load_quantized
from pipeline.sampling import denoise, encode_prompts, initial_latents, noise_generators

PROMPTS = ["a red circle", "a small blue square on the left"]
QUIET = {"enable_progress_bar": False}


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    tiny_sdxl_pipeline(0).save_pretrained(out, safe_serialization=True)
    return str(out)


def test_own_sampler_matches_the_sdxl_pipeline_call(sdxl_folder):
    pipe = load_pipeline(sdxl_folder)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"  # the folder's own
    text = encode_prompts(pipe, PROMPTS, resolution=64)
    with torch.no_grad():
        ref = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
        ids = pipe.tokenizer_2(PROMPTS, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
        pooled = pipe.text_encoder_2.text_model(ids).pooler_output
    for ours, theirs in zip((text.cond, text.uncond, text.text_embeds, text.uncond_text_embeds), ref):
        assert torch.equal(ours, theirs)
    assert torch.allclose(text.pooled, pooled, atol=1e-6)  # T2Q's input: the second encoder's pooled state
    assert text.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    gens = noise_generators([3, 4])
    ours = denoise(pipe, text, initial_latents(pipe, resolution=64, generators=gens), 4, 5.0, generators=gens)
    gens = noise_generators([3, 4])
    theirs = pipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, height=64, width=64, generator=gens,
                  latents=initial_latents(pipe, resolution=64, generators=gens), output_type="latent").images
    assert torch.equal(ours, theirs)
    # the added conditioning is not decoration: other time ids give other latents
    text.time_ids = text.time_ids * 2
    gens = noise_generators([3, 4])
    other = denoise(pipe, text, initial_latents(pipe, resolution=64, generators=gens), 4, 5.0, generators=gens)
    assert (other - theirs).abs().max() > 1e-3


def test_calibration_data_keeps_the_added_conditioning(tmp_path):
    pipe = tiny_sdxl_pipeline(0)
    collect(pipe, PROMPTS, tmp_path / "c", steps=3, cali_st=2, batch_size=2)
    data = CalibrationData(tmp_path / "c", pipe, steps=3)
    step, call = next(iter(data.unet_calls()))
    added = call["added_cond_kwargs"]
    assert added["text_embeds"].shape == (4, 32) and added["time_ids"].shape == (4, 6)
    text = encode_prompts(pipe, PROMPTS)
    assert torch.equal(added["text_embeds"], torch.cat([text.uncond_text_embeds, text.text_embeds]))
    assert torch.equal(call["encoder_hidden_states"], torch.cat([text.uncond, text.cond]))
    with torch.no_grad():
        pipe.unet(**call)  # a valid UNet call


def test_sdxl_state_into_an_sd_pipeline_is_refused(tmp_path):
    from pipeline.quant import QuantConfig, quantize_unet, save_quantized

    pipe = tiny_sdxl_pipeline(0)
    quantize_unet(pipe.unet, QuantConfig(w_bits=8, a_bits=8))
    save_quantized(pipe.unet, tmp_path / "q", extra={"method": "naive"})
    with pytest.raises(ValueError, match="SDXL"):
        load_quantized(tiny_pipeline(0).unet, tmp_path / "q")
