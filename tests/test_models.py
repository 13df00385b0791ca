"""Model loading, the offline CLIP tokenizer, and the published configs."""
import shutil

import pytest

from data.tokenizer import clip_tokenizer
from pipeline.models import REFERENCE_UNET_PARAMS, ModelNotFoundError, load_pipeline, meta_unet, tiny_pipeline


def test_tokenizer_is_the_real_clip_bpe():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    # ids of the original openai/clip-vit-large-patch14 tokenizer
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    long = tok(" ".join(["word"] * 100), truncation=True, max_length=77).input_ids
    assert len(long) == 77


@pytest.mark.parametrize("name", sorted(REFERENCE_UNET_PARAMS))
def test_published_configs_match_parameter_counts(name):
    unet = meta_unet(name)
    assert sum(p.numel() for p in unet.parameters()) == REFERENCE_UNET_PARAMS[name]


def test_tiny_pipeline_is_seeded_and_generates():
    a, b = tiny_pipeline(3), tiny_pipeline(3)
    assert all((p == q).all() for p, q in zip(a.unet.parameters(), b.unet.parameters()))
    img = a("a red circle", num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 32, 32, 3)


def test_unknown_models_fail_fast_with_the_fix():
    with pytest.raises(ModelNotFoundError, match="--model DIR"):
        load_pipeline("CompVis/stable-diffusion-v1-4")
    with pytest.raises(ModelNotFoundError, match="unknown model"):
        load_pipeline("definitely not a model")
    with pytest.raises(ModelNotFoundError, match="unknown reference UNet"):
        meta_unet("sd-v9")


def test_local_pipeline_round_trip_and_corruption(tmp_path):
    pipe = tiny_pipeline(0)
    pipe.save_pretrained(tmp_path / "p")
    loaded = load_pipeline(str(tmp_path / "p"))
    assert type(loaded.unet).__name__ == "UNet2DConditionModel"
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "p", broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
    with pytest.raises(ModelNotFoundError, match="unet/diffusion_pytorch_model.safetensors is corrupted"):
        load_pipeline(str(broken))
    shutil.copy(tmp_path / "p" / "unet" / "diffusion_pytorch_model.safetensors", broken / "unet")
    (broken / "vae" / "config.json").unlink()
    with pytest.raises(ModelNotFoundError, match="vae/config.json is missing"):
        load_pipeline(str(broken))
