"""The embedded world's architectures (tiny CLIP, AutoencoderKL and
UNet2DConditionModel configs), its tokenization and its sampling defaults."""
from __future__ import annotations

import torch

from data.tokenizer import clip_tokenizer

WORLD_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=77, projection_dim=64, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)


WORLD_VISION_CONFIG = dict(
    hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=32,
    patch_size=4, num_channels=3, projection_dim=64,
)


def world_vae_config(resolution: int = 32) -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=resolution,
    )


def world_unet_config(resolution: int = 32) -> dict:
    return dict(
        sample_size=resolution // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WORLD_TEXT_CONFIG["hidden_size"], attention_head_dim=4, norm_num_groups=16,
    )


# The sampler every stage uses on the embedded world (world.json declares it: pipeline.models.sampling_defaults).
WORLD_SAMPLING = {"num_inference_steps": 20, "guidance_scale": 5.0}


def tokenize(captions, device=None, pad_to_longest: bool = False) -> torch.Tensor:
    """Token ids padded to 77 as the pipeline does (or to the longest caption: the causal
    text tower gives the same outputs at the real positions, for less compute)."""
    ids = clip_tokenizer()(list(captions), padding="longest" if pad_to_longest else "max_length", max_length=77,
                           truncation=True, return_tensors="pt").input_ids
    return ids if device is None else ids.to(device)
