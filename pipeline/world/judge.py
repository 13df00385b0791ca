"""Measuring the embedded world: an attribute classifier trained on renders and
the world CLIP's zero-shot accuracy. Inception features are pipeline.metrics.inception's,
FID pipeline/metrics/frechet.py, GMM-GIQA pipeline/metrics/giqa.py.

The classifier never sees a generated image: it learns shape and colour of
single-object renders (with blur / noise / colour jitter so that it tolerates
the autoencoder's softness) and then judges whether generations show what
their caption asks for.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import world
from pipeline.world.models import tokenize


# ---------------------------------------------------------------------------
# Attribute classifier
# ---------------------------------------------------------------------------
class AttributeClassifier(nn.Module):
    """Small CNN: 3 x 32 x 32 image in [0, 1] -> (shape logits, colour logits)."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
                                 nn.MaxPool2d(2))

        # 32 -> 16 -> 8 -> 4, then a global max: about 3 M multiply-adds per image
        self.features = nn.Sequential(block(3, w), block(w, 2 * w), block(2 * w, 4 * w),
                                      nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.shape_head = nn.Linear(4 * w, len(world.SHAPES))
        self.colour_head = nn.Linear(4 * w, len(world.COLOURS))

    def forward(self, x):
        if x.shape[-1] != 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        h = self.features(x * 2 - 1)
        return self.shape_head(h), self.colour_head(h)

    @torch.no_grad()
    def predict(self, images_uint8: np.ndarray | torch.Tensor, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Predicted (shape index, colour index) of N x H x W x 3 uint8 images."""
        self.eval()
        x = torch.as_tensor(np.asarray(images_uint8)).permute(0, 3, 1, 2).float() / 255.0
        shapes, colours = [], []
        for i in range(0, len(x), batch):
            s, c = self(x[i : i + batch])
            shapes.append(s.argmax(-1))
            colours.append(c.argmax(-1))
        return torch.cat(shapes).numpy(), torch.cat(colours).numpy()


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur (a random mix with a 3x3 box blur), brightness jitter and pixel noise; x in [0, 1]."""
    n = len(x)
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    a = torch.rand(n, 1, 1, 1, generator=g)
    x = a * blur + (1 - a) * x
    x = x * (1 + 0.1 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5))
    x = x + 0.03 * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1)


def render_single_objects(n: int, seed: int, split: str = "train", resolution: int = 32):
    """n single-object scenes: (uint8 images, shape labels, colour labels, scenes)."""
    images, scenes = world.render_split(split, n, seed, resolution, n_objects=1)
    shapes = np.array([world.shape_index(s.objects[0]["shape"]) for s in scenes])
    colours = np.array([world.colour_index(s.objects[0]["colour"]) for s in scenes])
    return images, shapes, colours, scenes


def train_attribute_classifier(n_train: int = 4000, steps: int = 600, batch_size: int = 64, seed: int = 1234,
                               resolution: int = 32, progress: bool = False) -> AttributeClassifier:
    """Train on renders of the train split (a seed apart from the models' training data)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    images, shapes, colours, _ = render_single_objects(n_train, seed, "train", resolution)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    ys, yc = torch.from_numpy(shapes), torch.from_numpy(colours)
    model = AttributeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(steps), desc="attribute classifier", disable=not progress, leave=False):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        s, c = model(_augment(x[idx], g))
        loss = F.cross_entropy(s, ys[idx]) + F.cross_entropy(c, yc[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def classifier_accuracy(model: AttributeClassifier, images: np.ndarray, shapes: np.ndarray,
                        colours: np.ndarray) -> tuple[float, float]:
    ps, pc = model.predict(images)
    return float((ps == shapes).mean()), float((pc == colours).mean())


@torch.no_grad()
def clip_zero_shot(clip, n: int = 200, seed: int = 0, resolution: int = 32) -> dict[str, float]:
    """Zero-shot attribute accuracy of the world CLIP on single-object test renders.

    Shape: the image against "a <its colour> <shape>" for every shape; colour the
    same way over colours. A text tower that cannot tell shapes apart here cannot
    steer the UNet to the asked shape either."""

    def features(fn, **kw):
        f = fn(**kw)
        return F.normalize(getattr(f, "pooler_output", f), dim=-1)

    images, shapes, colours, scenes = render_single_objects(n, seed, "test", resolution)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    img = features(clip.get_image_features, pixel_values=x)
    names = list(world.COLOURS)
    shape_txt = features(clip.get_text_features, input_ids=tokenize(
        [f"a {c} {s}" for c in names for s in world.SHAPES])).view(len(names), len(world.SHAPES), -1)
    colour_txt = shape_txt.transpose(0, 1)  # [shape, colour, dim]
    ps = torch.einsum("nd,nsd->ns", img, shape_txt[torch.from_numpy(colours)]).argmax(-1).numpy()
    pc = torch.einsum("nd,ncd->nc", img, colour_txt[torch.from_numpy(shapes)]).argmax(-1).numpy()
    return {"shape": float((ps == shapes).mean()), "colour": float((pc == colours).mean())}


def timed(fn, *args, **kw):
    t = time.time()
    out = fn(*args, **kw)
    return out, time.time() - t
