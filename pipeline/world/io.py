"""Saving and loading the embedded world: the diffusers pipeline folder, its
real-BPE tokenizer files and the world CLIP (for the world's CLIP score)."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from data.tokenizer import clip_tokenizer, write_clip_tokenizer_files
from pipeline.models import EMBEDDED_DIR, SD_SCHEDULER_CONFIG, ModelNotFoundError, _check_safetensors
from pipeline.world.models import tokenize


def _text_encoder_from_clip(clip) -> "torch.nn.Module":
    from transformers import CLIPTextConfig, CLIPTextModel

    te = CLIPTextModel(CLIPTextConfig(**clip.config.text_config.to_dict()))
    inner = getattr(te, "text_model", te)  # transformers < 5 wraps the transformer in .text_model
    inner.load_state_dict(clip.text_model.state_dict())
    return te.eval()


def save_world_pipeline(out: Path, clip, vae, unet, resolution: int, world_info: dict, overwrite: bool) -> Path:
    """Write the diffusers StableDiffusionPipeline folder plus clip/ and world.json.

    The text encoder's weights are stored in fp16 (its 49408 x 64 token
    embedding dominates the size) with ``dtype: float32`` in its config, so it
    loads as fp32; everything else is stored in fp32."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite true to replace it")
    tmp = out.parent / (out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    text_encoder = _text_encoder_from_clip(clip)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet.eval(),
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    # transformers 5 saves only the 3.5 MB tokenizer.json; vocab.json + merges.txt of the real
    # CLIP BPE (1.5 MB) load to the same tokenizer, so ship those instead.
    write_tokenizer_files(tmp / "tokenizer")
    # fp16 storage for the text encoder (config dtype float32, so it loads as fp32).
    te_dir = tmp / "text_encoder"
    shutil.rmtree(te_dir)
    copy.deepcopy(text_encoder).to(torch.float16).save_pretrained(te_dir, safe_serialization=True)
    cfg = json.loads((te_dir / "config.json").read_text())
    cfg["dtype"] = "float32"
    cfg.pop("torch_dtype", None)
    (te_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    # The CLIP vision tower and projections (the text tower is text_encoder/).
    clip_dir = tmp / "clip"
    clip_dir.mkdir()
    state = {k: v.detach().float().contiguous() for k, v in clip.state_dict().items()
             if not k.startswith("text_model.")}
    save_file(state, str(clip_dir / "model.safetensors"), metadata={"format": "pt"})
    (clip_dir / "config.json").write_text(json.dumps({
        "clip_config": clip.config.to_dict(), "text_tower": "../text_encoder",
        "image_size": resolution, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    }, indent=1, default=str))
    (tmp / "world.json").write_text(json.dumps(world_info, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def write_tokenizer_files(tok_dir: Path) -> None:
    """vocab.json + merges.txt (the real CLIP BPE) in place of tokenizer.json; checks the round trip."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(tok_dir)
    (Path(tok_dir) / "tokenizer.json").unlink(missing_ok=True)
    probe = "a large striped red circle on the left on a gray background"
    loaded = CLIPTokenizer.from_pretrained(str(tok_dir))
    if loaded.vocab_size != 49408 or loaded(probe).input_ids != clip_tokenizer()(probe).input_ids:
        raise RuntimeError(f"the tokenizer written to {tok_dir} does not reload as the CLIP BPE tokenizer")


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def load_world_clip(path: str | Path | None = None):
    """The world's CLIPModel: text tower from text_encoder/, the rest from clip/. Returns (model, info)."""
    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPModel

    root = Path(path or EMBEDDED_DIR)
    cfg_path, w_path, te_path = root / "clip" / "config.json", root / "clip" / "model.safetensors", \
        root / "text_encoder" / "model.safetensors"
    for f in (cfg_path, w_path, te_path):
        if not f.is_file():
            raise ModelNotFoundError(f"{f} is missing: the world CLIP needs it (run `python -m pipeline.fit pretrain`)")
    for f in (w_path, te_path):
        _check_safetensors(f)
    info = json.loads(cfg_path.read_text())
    model = CLIPModel(CLIPConfig(**info["clip_config"]))
    state = {k: v.float() for k, v in load_file(str(w_path)).items()}
    state.update({(k if k.startswith("text_model.") else "text_model." + k): v.float()
                  for k, v in load_file(str(te_path)).items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise ModelNotFoundError(f"{root} does not hold a complete world CLIP: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
    return model.eval(), info


@torch.no_grad()
def world_clip_score(model, images: torch.Tensor, captions, info: dict | None = None) -> torch.Tensor:
    """100 * cosine(image, text) per pair (torchmetrics' CLIPScore convention, clamped at 0).

    `images`: N x 3 x H x W in [0, 1] at the world resolution."""
    mean = torch.tensor((info or {}).get("image_mean", [0.5] * 3)).view(1, 3, 1, 1)
    std = torch.tensor((info or {}).get("image_std", [0.5] * 3)).view(1, 3, 1, 1)
    img = model.get_image_features(pixel_values=(images.float() - mean) / std)
    txt = model.get_text_features(input_ids=tokenize(captions))
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    return (100 * F.cosine_similarity(img, txt, dim=-1)).clamp(min=0)
