"""CLIP score (torchmetrics CLIPScore) with a local transformers CLIPModel
folder: the embedded world's own CLIP (checkpoints/tiny-world/clip) or any
user-given one.

torchmetrics only loads hub CLIPs by name, so the model and processor are
handed over through its callable hook. Two adaptations:
  - transformers >= 5 returns a ModelOutput from get_image_features /
    get_text_features, where torchmetrics 1.9 expects the projected
    embedding tensor: `_ProjectedCLIP` returns `.pooler_output` (the
    projection, equal to CLIPModel's image_embeds / text_embeds before
    normalization);
  - a folder without processor files gets a processor built from the model
    config (CLIP resize/crop to its image_size, OpenAI CLIP mean/std) and the
    project's offline CLIP BPE tokenizer."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from torchmetrics.multimodal.clip_score import CLIPScore

from data.tokenizer import clip_tokenizer
from pipeline.models import EMBEDDED_DIR
from pipeline.world.io import load_world_clip

AUTO, NONE = "auto", "none"


class ClipUnavailable(Exception):
    """The CLIP score is skipped; the message says why."""


def world_clip_path() -> Path:
    return EMBEDDED_DIR / "clip"


def resolve_clip(option: str | None) -> Path:
    """'auto' -> the embedded world's CLIP; 'none' -> skip; else a folder."""
    if option in (None, NONE, ""):
        raise ClipUnavailable("CLIP score disabled (--clip none)")
    if option == AUTO:
        path = world_clip_path()
        if not (path / "config.json").is_file():
            raise ClipUnavailable(
                f"CLIP score skipped: {path} is absent (the embedded world's CLIP ships with checkpoints/tiny-world; "
                f"pass --clip PATH to a transformers CLIPModel folder)")
        return path
    path = Path(option).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--clip {option}: {path / 'config.json'} is missing; pass a transformers "
                                f"CLIPModel folder (save_pretrained output), 'auto' or 'none'")
    return path


class _ProjectedCLIP(nn.Module):
    """A CLIPModel whose get_*_features return the projected embedding tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out):
        return out if torch.is_tensor(out) else out.pooler_output

    def get_image_features(self, pixel_values, **kwargs):
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values, **kwargs))

    def get_text_features(self, input_ids, attention_mask=None, **kwargs):
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask,
                                                         **kwargs))


def _processor_for(path: Path, model, norm: dict | None = None):
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    try:
        return CLIPProcessor.from_pretrained(str(path), local_files_only=True)
    except Exception:
        pass
    side = model.config.vision_config.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                         **(norm or {}))
    # transformers 5 "loads" a folder without tokenizer files as a 2-token tokenizer: check the files first
    tokenizer = None
    if (path / "vocab.json").is_file() or (path / "tokenizer.json").is_file():
        tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer is None:
        tokenizer = clip_tokenizer(model.config.text_config.max_position_embeddings)
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


@lru_cache(maxsize=4)
def load_clip(path: str):
    """(model, processor) for CLIPScore's callable hook, loaded once per process."""
    import json

    from transformers import CLIPModel

    norm = None
    try:
        info = json.loads((Path(path) / "config.json").read_text())
        if "clip_config" in info:  # the embedded world's CLIP: its text tower is the pipeline's text encoder

            model, info = load_world_clip(Path(path).parent)
            norm = {"image_mean": info["image_mean"], "image_std": info["image_std"]}
        else:
            model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    except Exception as e:
        raise ValueError(f"{path} is not a loadable transformers CLIPModel folder ({type(e).__name__}: {e})") from e
    model.requires_grad_(False)
    return _ProjectedCLIP(model), _processor_for(Path(path), model, norm)


def clip_score_metric(path: str | Path, **kwargs) -> CLIPScore:
    """torchmetrics CLIPScore (mean over images of 100 * cosine, the mean clipped at 0)
    with the CLIP in `path`; update(uint8 images [N, 3, H, W], prompts)."""
    model, processor = load_clip(str(path))
    return CLIPScore(model_name_or_path=lambda: (model, processor), **kwargs)
