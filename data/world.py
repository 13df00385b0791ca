"""The embedded tiny world: procedurally rendered, captioned scenes.

A scene holds 1 to 3 objects, each with a shape, a colour, a size, a position
(one cell of a 3x3 grid) and a texture, drawn over a plain background. Scene
``i`` of split ``s`` is a pure function of ``(seed, s, i)``: the renderer draws
every random choice from a ``numpy`` generator seeded with exactly that triple,
so a scene can be re-rendered anywhere, in any order, in any process.

Captions come in five richness levels (the number of attribute kinds they
name grows with the level)::

    0  a circle                                   shape
    1  a red circle                               + colour
    2  a large red circle                         + size
    3  a large red circle on the left             + position
    4  a large striped red circle on the left     + texture and background
       on a gray background

Splits: ``train``, ``val`` and ``test`` share one distribution; ``unseen``
holds out five colour-shape pairs and three phrasing templates that the other
splits never use (every unseen scene has at least one held-out pair and a
held-out template), to measure prompt generalization.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

# ---------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle", "cross", "star")
COLOURS = {
    "red": (0.90, 0.12, 0.12),
    "orange": (0.98, 0.55, 0.08),
    "yellow": (0.95, 0.90, 0.15),
    "green": (0.15, 0.75, 0.20),
    "cyan": (0.15, 0.85, 0.90),
    "blue": (0.15, 0.30, 0.95),
    "purple": (0.60, 0.20, 0.85),
    "white": (0.97, 0.97, 0.97),
}
BACKGROUNDS = {
    "black": (0.04, 0.04, 0.04),
    "gray": (0.45, 0.45, 0.45),
    "brown": (0.40, 0.25, 0.12),
    "navy": (0.05, 0.07, 0.30),
}
SIZES = {"small": 0.15, "medium": 0.21, "large": 0.28}  # half-extent, in image widths
TEXTURES = ("solid", "striped", "dotted")
# 3x3 grid cells: name -> (row, col); the phrase each cell gets in a caption.
POSITIONS = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
POSITION_PHRASES = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}
CELL_CENTERS = (0.27, 0.5, 0.73)

RESOLUTIONS = (32, 64)
RICHNESS_LEVELS = (0, 1, 2, 3, 4)
SPLITS = ("train", "val", "test", "unseen")
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "unseen": 3}

# Held out of train/val/test; every `unseen` scene contains at least one.
HELD_OUT_PAIRS = frozenset({
    ("red", "triangle"), ("green", "square"), ("blue", "star"), ("yellow", "cross"), ("purple", "circle"),
})
# Sentence templates. `{objs}` is the object list, `{bg}` the background (level 4 only).
SEEN_TEMPLATES = ("{objs}", "a picture of {objs}", "an image of {objs}", "a scene with {objs}")
SEEN_BG_TEMPLATES = ("{objs} on a {bg} background", "a {bg} background with {objs}",
                     "an image of {objs} on a {bg} background")
UNSEEN_TEMPLATES = ("a drawing of {objs}", "there is {objs}")
UNSEEN_BG_TEMPLATES = ("{objs} against a {bg} backdrop",)

OBJECT_COUNT_PROBS = (0.5, 0.3, 0.2)  # 1, 2, 3 objects
MULTI_OBJECT_SIZES = ("small", "medium")  # large objects would cover their neighbours' cells


@dataclass
class Scene:
    """One rendered scene: the image (H x W x 3 float32 in [0, 1]), its caption and attributes."""

    image: np.ndarray
    caption: str
    richness: int
    objects: list[dict]
    background: str
    template: str
    split: str
    index: int
    seed: int
    attributes: dict = field(init=False)

    def __post_init__(self):
        self.attributes = {"objects": self.objects, "background": self.background, "richness": self.richness}


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------
def check_resolution(resolution: int) -> int:
    if resolution not in RESOLUTIONS:
        raise ValueError(f"unsupported world resolution {resolution!r}; supported: {list(RESOLUTIONS)}")
    return int(resolution)


def check_richness(richness: int) -> int:
    if richness not in RICHNESS_LEVELS:
        raise ValueError(f"caption richness must be one of {list(RICHNESS_LEVELS)}, got {richness!r}")
    return int(richness)


def check_split(split: str) -> str:
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown world split {split!r}; choose one of {list(SPLITS)}")
    return split


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of scene `index` of `split`: a pure function of the triple."""
    if index < 0:
        raise ValueError(f"scene index must be >= 0, got {index}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_IDS[check_split(split)], int(index)]))


# ---------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------
def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def object_phrase(obj: dict, richness: int) -> str:
    """'a circle' ... 'a large striped red circle on the left' (background is sentence-level)."""
    check_richness(richness)
    words = []
    if richness >= 2:
        words.append(obj["size"])
    if richness >= 4:
        words.append(obj["texture"])
    if richness >= 1:
        words.append(obj["colour"])
    words.append(obj["shape"])
    phrase = _article(" ".join(words))
    if richness >= 3:
        phrase += " " + POSITION_PHRASES[obj["position"]]
    return phrase


def join_objects(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def make_caption(objects: list[dict], background: str, richness: int, template: str) -> str:
    objs = join_objects([object_phrase(o, richness) for o in objects])
    return template.format(objs=objs, bg=background)


_SHAPE_RE = re.compile(r"\b(" + "|".join(SHAPES) + r")\b")
_POS_RE = re.compile(
    r"^\s*(" + "|".join(re.escape(p) for p in sorted(POSITION_PHRASES.values(), key=len, reverse=True)) + r")")
_BG_RE = re.compile(r"\b(" + "|".join(BACKGROUNDS) + r") (?:background|backdrop)\b")


def parse_caption(caption: str) -> dict:
    """Recover the attributes a caption names (the inverse of `make_caption`).

    Returns {"objects": [{shape, colour?, size?, texture?, position?}, ...],
    "background": name or None}; attributes a caption does not name are absent."""
    bg = _BG_RE.search(caption)
    text = _BG_RE.sub("", caption)
    objects, start = [], 0
    phrase_to_pos = {v: k for k, v in POSITION_PHRASES.items()}
    for m in _SHAPE_RE.finditer(text):
        obj = {"shape": m.group(1)}
        before = re.split(r",| and ", text[start : m.start()])[-1].split()
        for w in before:
            if w in COLOURS:
                obj["colour"] = w
            elif w in SIZES:
                obj["size"] = w
            elif w in TEXTURES:
                obj["texture"] = w
        start = m.end()
        pos = _POS_RE.match(text[start:])
        if pos:
            obj["position"] = phrase_to_pos[pos.group(1)]
            start += pos.end()
        objects.append(obj)
    return {"objects": objects, "background": bg.group(1) if bg else None}


def swap_shapes(caption: str, rng: np.random.Generator) -> str:
    """The caption with every shape word replaced by another shape: a hard negative.

    Contrastive training on whole scenes learns colour and position first, since
    they already tell a batch's scenes apart; captions that differ from the true
    one only in shape force the towers to see shape too."""
    def other(m: re.Match) -> str:
        choices = [s for s in SHAPES if s != m.group(1)]
        return choices[int(rng.integers(len(choices)))]

    return _SHAPE_RE.sub(other, caption)


def named_attributes(objects: list[dict], background: str, richness: int) -> dict:
    """What a caption of `richness` should name about these attributes (for checks)."""
    check_richness(richness)
    keys = ["shape", "colour", "size", "position", "texture"][: richness + 1]
    return {"objects": [{k: o[k] for k in keys} for o in objects], "background": background if richness == 4 else None}


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------
_SUPERSAMPLE = 4


def _polygon_mask(x: np.ndarray, y: np.ndarray, vx: np.ndarray, vy: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorized over the pixel grid."""
    inside = np.zeros(x.shape, dtype=bool)
    j = len(vx) - 1
    for i in range(len(vx)):
        crosses = (vy[i] > y) != (vy[j] > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = (vx[j] - vx[i]) * (y - vy[i]) / (vy[j] - vy[i] + 1e-12) + vx[i]
        inside ^= crosses & (x < xint)
        j = i
    return inside


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Mask of `shape` centred at the origin with half-extent r (dy grows downwards)."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.82 * r
    if shape == "triangle":
        vx = np.array([0.0, r, -r])
        vy = np.array([-r, 0.8 * r, 0.8 * r])
        return _polygon_mask(dx, dy, vx, vy)
    if shape == "cross":
        w = 0.36 * r
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    if shape == "star":
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, 1.1 * r, 0.45 * r)
        return _polygon_mask(dx, dy + 0.08 * r, rad * np.cos(ang), rad * np.sin(ang))
    raise ValueError(f"unknown shape {shape!r}; choose one of {list(SHAPES)}")


def texture_mask(texture: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Where the texture darkens the object (coordinates in image widths)."""
    if texture == "solid":
        return np.zeros(x.shape, dtype=bool)
    if texture == "striped":
        return np.floor(y * 8.0) % 2 == 1  # 8 stripe periods per image
    if texture == "dotted":
        gx, gy = (x * 7.0) % 1.0 - 0.5, (y * 7.0) % 1.0 - 0.5
        return gx * gx + gy * gy <= 0.28 ** 2
    raise ValueError(f"unknown texture {texture!r}; choose one of {list(TEXTURES)}")


def render(objects: list[dict], background: str, resolution: int = 32) -> np.ndarray:
    """Draw the objects (in order, later on top) over the background: H x W x 3 float32 in [0, 1]."""
    resolution = check_resolution(resolution)
    n = resolution * _SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n
    x, y = np.meshgrid(coords, coords)
    img = np.empty((n, n, 3), dtype=np.float32)
    img[:] = np.asarray(BACKGROUNDS[background], dtype=np.float32)
    for obj in objects:
        cx, cy = obj["center"]
        r = SIZES[obj["size"]]
        # work on the object's bounding box only (every shape fits in 1.2 r)
        x0, x1 = max(0, int((cx - 1.2 * r) * n)), min(n, int((cx + 1.2 * r) * n) + 1)
        y0, y1 = max(0, int((cy - 1.2 * r) * n)), min(n, int((cy + 1.2 * r) * n) + 1)
        bx, by, box = x[y0:y1, x0:x1], y[y0:y1, x0:x1], img[y0:y1, x0:x1]
        mask = shape_mask(obj["shape"], bx - cx, by - cy, r)
        colour = np.asarray(obj["rgb"], dtype=np.float32)
        box[mask] = colour
        box[mask & texture_mask(obj["texture"], bx, by)] = colour * 0.35
    # box-filter the supersampled image down: anti-aliased edges
    img = img.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(img, 0.0, 1.0)


# ---------------------------------------------------------------------------
# Sampling scenes
# ---------------------------------------------------------------------------
_ALL_PAIRS = [(c, s) for c in COLOURS for s in SHAPES]
_SEEN_PAIRS = [p for p in _ALL_PAIRS if p not in HELD_OUT_PAIRS]
_HELD_PAIRS = sorted(HELD_OUT_PAIRS)


def sample_attributes(rng: np.random.Generator, split: str, n_objects: int | None = None,
                      richness: int | None = None) -> tuple[list[dict], str, int, str]:
    """Draw (objects, background, richness, template) for one scene of `split`."""
    check_split(split)
    # Draw every choice unconditionally so forcing one attribute leaves the others unchanged.
    n_draw = int(rng.choice(3, p=OBJECT_COUNT_PROBS)) + 1
    r_draw = int(rng.integers(0, 5))
    n = n_draw if n_objects is None else int(n_objects)
    if n not in (1, 2, 3):
        raise ValueError(f"a world scene has 1 to 3 objects, got {n_objects!r}")
    richness = r_draw if richness is None else check_richness(richness)
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    cells = rng.choice(len(POSITIONS), size=n, replace=False)
    unseen = split == "unseen"
    objects = []
    for k in range(n):
        pool = _HELD_PAIRS if (unseen and k == 0) else (_ALL_PAIRS if unseen else _SEEN_PAIRS)
        colour, shape = pool[int(rng.integers(len(pool)))]
        sizes = list(SIZES) if n == 1 else list(MULTI_OBJECT_SIZES)
        size = sizes[int(rng.integers(len(sizes)))]
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        position = list(POSITIONS)[int(cells[k])]
        row, col = POSITIONS[position]
        jitter = rng.uniform(-0.03, 0.03, size=2)
        tint = rng.uniform(-0.04, 0.04, size=3)
        rgb = np.clip(np.asarray(COLOURS[colour]) + tint, 0.0, 1.0)
        objects.append(dict(shape=shape, colour=colour, size=size, texture=texture, position=position,
                            center=(float(CELL_CENTERS[col] + jitter[0]), float(CELL_CENTERS[row] + jitter[1])),
                            rgb=tuple(float(v) for v in rgb)))
    if unseen:
        templates = UNSEEN_BG_TEMPLATES if richness == 4 else UNSEEN_TEMPLATES
    else:
        templates = SEEN_BG_TEMPLATES if richness == 4 else SEEN_TEMPLATES
    template = templates[int(rng.integers(len(templates)))]
    return objects, background, richness, template


def make_scene(seed: int, split: str, index: int, resolution: int = 32, *, n_objects: int | None = None,
               richness: int | None = None) -> Scene:
    """Scene `index` of `split`: a pure function of (seed, split, index) and the forced options."""
    check_resolution(resolution)
    if richness is not None:
        check_richness(richness)
    rng = scene_rng(seed, split, index)
    objects, background, richness, template = sample_attributes(rng, split, n_objects, richness)
    caption = make_caption(objects, background, richness, template)
    image = render(objects, background, resolution)
    return Scene(image=image, caption=caption, richness=richness, objects=objects, background=background,
                 template=template, split=split, index=index, seed=seed)


def recaption(scene: Scene, richness: int) -> str:
    """The caption of the same scene at another richness level (same template family)."""
    check_richness(richness)
    if (richness == 4) == (scene.richness == 4):
        template = scene.template
    else:
        unseen = scene.split == "unseen"
        family = (UNSEEN_BG_TEMPLATES if richness == 4 else UNSEEN_TEMPLATES) if unseen else \
                 (SEEN_BG_TEMPLATES if richness == 4 else SEEN_TEMPLATES)
        template = family[scene.index % len(family)]
    return make_caption(scene.objects, scene.background, richness, template)


def render_split(split: str, n: int, seed: int = 0, resolution: int = 32, *, start: int = 0,
                 n_objects: int | None = None, richness: int | None = None) -> tuple[np.ndarray, list[Scene]]:
    """Scenes start..start+n-1 of a split: (N x H x W x 3 uint8 images, scenes without their images)."""
    images = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    scenes = []
    for k in range(n):
        s = make_scene(seed, split, start + k, resolution, n_objects=n_objects, richness=richness)
        images[k] = np.round(s.image * 255.0).astype(np.uint8)
        s.image = None  # keep the metadata light; the pixels live in `images`
        scenes.append(s)
    return images, scenes


def shape_index(name: str) -> int:
    return SHAPES.index(name)


def colour_index(name: str) -> int:
    return list(COLOURS).index(name)


# ---------------------------------------------------------------------------
# torch / Lightning access
# ---------------------------------------------------------------------------
import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402


class WorldDataset(Dataset):
    """Scenes 0..n-1 of a split, rendered once at construction.

    Items are {"image": 3 x H x W float tensor in [-1, 1], "caption": str,
    "richness": int, "index": int}."""

    def __init__(self, split: str = "train", n: int = 1000, seed: int = 0, resolution: int = 32, *,
                 n_objects: int | None = None, richness: int | None = None):
        self.split, self.seed, self.resolution = check_split(split), seed, check_resolution(resolution)
        images, self.scenes = render_split(split, n, seed, resolution, n_objects=n_objects, richness=richness)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 N x 3 x H x W
        self.captions = [s.caption for s in self.scenes]

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i].float() / 127.5 - 1.0, "caption": self.captions[i],
                "richness": self.scenes[i].richness, "index": i}


class WorldDataModule(L.LightningDataModule):
    """Train/val loaders over the rendered world (the test and unseen splits on request)."""

    def __init__(self, n_train: int = 20000, n_val: int = 512, batch_size: int = 64, seed: int = 0,
                 resolution: int = 32, num_workers: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if self.train_set is None:
            self.train_set = WorldDataset("train", h.n_train, h.seed, h.resolution)
            self.val_set = WorldDataset("val", h.n_val, h.seed, h.resolution)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          generator=g, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)

    def split_dataloader(self, split: str, n: int, **kw) -> DataLoader:
        ds = WorldDataset(split, n, self.hparams.seed, self.hparams.resolution, **kw)
        return DataLoader(ds, batch_size=self.hparams.batch_size)
