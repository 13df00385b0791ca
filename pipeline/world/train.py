"""Pretraining the embedded tiny world: the LightningModules and the saving.

Three models, trained in order, in the classes Stable Diffusion uses:

1. ``WorldCLIP``: a tiny ``transformers.CLIPModel`` (text + vision towers,
   symmetric contrastive loss) on the real CLIP BPE tokenizer. Its text tower
   becomes the pipeline's ``text_encoder``; its vision tower and projections
   ship in ``clip/`` for the world's CLIP score.
2. ``WorldVAE``: a tiny ``diffusers.AutoencoderKL`` (32x32x3 -> 8x8x4),
   reconstruction (MSE + L1) plus a small KL term.
3. ``WorldUNet``: a tiny ``UNet2DConditionModel`` with cross-attention blocks,
   trained for epsilon prediction on VAE latents under the SD scaled-linear
   schedule, with 10% of captions dropped to the empty prompt (classifier-free
   guidance), min-SNR weighting and an EMA of the weights (the EMA ships).
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from data import world
from data.world import swap_shapes
from pipeline.artifacts import versions
from pipeline.engine import make_trainer
from pipeline.models import SD_SCHEDULER_CONFIG
from pipeline.world.io import _text_encoder_from_clip, folder_size, save_world_pipeline
from pipeline.world.judge import clip_zero_shot
from pipeline.world.models import (
    WORLD_SAMPLING,
    WORLD_TEXT_CONFIG,
    WORLD_VISION_CONFIG,
    tokenize,
    world_unet_config,
    world_vae_config,
)

# ---------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------


# Sampling defaults of the embedded world (also written to checkpoints/tiny-world/world.json).


def _warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))


class _Scheduled(L.LightningModule):
    """AdamW with linear warm-up and cosine decay over `total_steps`."""

    def configure_optimizers(self):
        h = self.hparams
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=h.lr, weight_decay=h.weight_decay)
        warm = max(1, int(0.05 * h.total_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _warmup_cosine(s, warm, h.total_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------
# 1. CLIP
# ---------------------------------------------------------------------------
class WorldCLIP(_Scheduled):
    """Symmetric contrastive loss; with `hard_negatives`, each image also competes against its
    own caption with the shapes swapped (``data.world.swap_shapes``), image-to-text side only."""

    def __init__(self, resolution: int = 32, lr: float = 1e-3, weight_decay: float = 0.05, total_steps: int = 1500,
                 hard_negatives: bool = False, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        from transformers import CLIPConfig, CLIPModel

        vision = dict(WORLD_VISION_CONFIG, image_size=resolution)
        config = CLIPConfig(text_config=WORLD_TEXT_CONFIG, vision_config=vision,
                            projection_dim=WORLD_TEXT_CONFIG["projection_dim"])
        self.clip = CLIPModel(config)

    def training_step(self, batch, _):
        captions = list(batch["caption"])
        n = len(captions)
        if self.hparams.hard_negatives:  # seeded per step, so a rerun draws the same negatives
            rng = np.random.default_rng([self.hparams.seed, self.global_step])
            captions += [swap_shapes(c, rng) for c in captions]
        ids = tokenize(captions, self.device, pad_to_longest=True)
        out = self.clip(input_ids=ids, pixel_values=batch["image"])
        target = torch.arange(n, device=self.device)
        loss_i2t = F.cross_entropy(out.logits_per_image, target)  # n x (n or 2n) texts
        loss_t2i = F.cross_entropy(out.logits_per_text[:n], target)  # the true captions only
        loss = 0.5 * (loss_i2t + loss_t2i)
        acc = (out.logits_per_image.argmax(-1) == target).float().mean()
        self.log_dict({"clip/loss": loss, "clip/acc": acc}, prog_bar=True)
        return loss

    def on_before_optimizer_step(self, optimizer):
        with torch.no_grad():  # CLIP clamps the learned temperature at 100
            self.clip.logit_scale.clamp_(0, math.log(100))


# ---------------------------------------------------------------------------
# 2. VAE
# ---------------------------------------------------------------------------
class WorldVAE(_Scheduled):
    def __init__(self, resolution: int = 32, lr: float = 1e-3, weight_decay: float = 0.0, total_steps: int = 1200,
                 kl_weight: float = 1e-6):
        super().__init__()
        self.save_hyperparameters()
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL(**world_vae_config(resolution))

    def training_step(self, batch, _):
        x = batch["image"]
        post = self.vae.encode(x).latent_dist
        rec = self.vae.decode(post.sample()).sample
        mse = F.mse_loss(rec, x)
        l1 = (rec - x).abs().mean()
        kl = post.kl().mean()
        loss = mse + 0.5 * l1 + self.hparams.kl_weight * kl
        self.log_dict({"vae/loss": loss, "vae/mse": mse, "vae/kl": kl}, prog_bar=True)
        return loss


# ---------------------------------------------------------------------------
# 3. UNet
# ---------------------------------------------------------------------------
class WorldUNet(_Scheduled):
    """Latent diffusion: epsilon prediction, SD scaled-linear schedule, CFG dropout, EMA."""

    def __init__(self, text_encoder, resolution: int = 32, lr: float = 1e-3, weight_decay: float = 0.01,
                 total_steps: int = 3500, cond_dropout: float = 0.1, ema_decay: float = 0.999,
                 min_snr_gamma: float = 5.0):
        super().__init__()
        self.save_hyperparameters(ignore=["text_encoder"])
        from diffusers import DDPMScheduler, UNet2DConditionModel

        self.unet = UNet2DConditionModel(**world_unet_config(resolution))
        self.ema = copy.deepcopy(self.unet).requires_grad_(False)
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.noise_scheduler = DDPMScheduler(**{k: v for k, v in SD_SCHEDULER_CONFIG.items()
                                                if k not in ("set_alpha_to_one",)})
        alphas = self.noise_scheduler.alphas_cumprod
        self.register_buffer("alphas_cumprod", alphas.clone(), persistent=False)
        self.register_buffer("empty_ids", tokenize([""]), persistent=False)

    def trainable_parameters(self):
        return list(self.unet.parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        self.text_encoder.eval()  # frozen, always in eval mode
        return self

    @torch.no_grad()
    def encode_text(self, captions) -> torch.Tensor:
        return self.text_encoder(tokenize(captions, self.device))[0]

    def training_step(self, batch, _):
        latents, captions = batch["latent"], list(batch["caption"])
        drop = torch.rand(len(captions)) < self.hparams.cond_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        ctx = self.encode_text(captions)
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(latents),), device=self.device)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        pred = self.unet(noisy, t, ctx).sample
        snr = a.view(-1) / (1 - a.view(-1))
        weight = torch.clamp(snr, max=self.hparams.min_snr_gamma) / snr  # min-SNR-gamma for epsilon targets
        per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (weight * per).mean()
        self.log_dict({"unet/loss": loss, "unet/mse": per.mean()}, prog_bar=True)
        return loss

    def on_train_batch_end(self, *_):
        n = self.global_step
        decay = min(self.hparams.ema_decay, (1 + n) / (10 + n))
        with torch.no_grad():
            for pe, p in zip(self.ema.parameters(), self.unet.parameters()):
                pe.lerp_(p, 1 - decay)


# ---------------------------------------------------------------------------
# Data helpers
# ---------------------------------------------------------------------------
class LatentDataset(torch.utils.data.Dataset):
    def __init__(self, latents: torch.Tensor, captions: list[str]):
        self.latents, self.captions = latents, captions

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return {"latent": self.latents[i], "caption": self.captions[i]}


@torch.no_grad()
def encode_latents(vae, images_uint8: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Posterior means of N x 3 x H x W uint8 images (unscaled)."""
    vae.eval()
    out = []
    for i in range(0, len(images_uint8), batch):
        x = images_uint8[i : i + batch].float() / 127.5 - 1.0
        out.append(vae.encode(x).latent_dist.mean)
    return torch.cat(out)


# ---------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# The recipe: render, then CLIP, VAE and UNet in order, save, reload and sample
# ---------------------------------------------------------------------------
@dataclass
class WorldRecipe:
    """How the embedded world is trained (the pretrain stage's flags)."""

    resolution: int = 32
    """world resolution (32 or 64)"""
    n_train: int = 20000
    """rendered training scenes"""
    n_val: int = 1024
    """rendered validation scenes"""
    clip_steps: int = 4000
    """CLIP steps (shape is learned late, docs/embedded_world.md)"""
    vae_steps: int = 1500
    """VAE steps"""
    unet_steps: int = 2500
    """UNet steps"""
    clip_batch_size: int = 64
    """CLIP batch"""
    vae_batch_size: int = 32
    """VAE batch"""
    unet_batch_size: int = 64
    """UNet batch"""
    clip_lr: float = 1e-3
    """CLIP learning rate"""
    clip_hard_negatives: bool = True
    """also contrast each image with its caption's shapes swapped"""
    vae_lr: float = 2e-3
    """VAE learning rate"""
    unet_lr: float = 1e-3
    """UNet learning rate"""
    cond_dropout: float = 0.1
    """caption -> empty prompt rate (CFG)"""
    threads: int = 2
    """torch CPU threads (2 on an idle 2-core machine; 1 if other jobs share the cores)"""
    monitor_every: int = 500
    """judge shape/colour of 40 EMA generations every N UNet steps (0: never)"""


def _trainer(trainer: dict | None, steps: int, log_dir: Path, name: str, callbacks=()):
    """One fit of `steps` steps; --trainer.max_steps N caps each of the three fits at N."""
    kw = {k: v for k, v in (trainer or {}).items() if v is not None}
    cap = kw.pop("max_steps", -1)
    steps = min(steps, cap) if cap and cap > 0 else steps
    for k in ("max_epochs", "min_epochs", "min_steps", "limit_val_batches", "num_sanity_val_steps"):
        kw.pop(k, None)
    fitter = make_trainer(kw, progress=True, defaults={"log_every_n_steps": 25},
                          forced={"max_steps": steps, "max_epochs": -1, "limit_val_batches": 0,
                                  "num_sanity_val_steps": 0, "enable_checkpointing": False,
                                  "logger": CSVLogger(str(log_dir), name=name, version=""),
                                  "callbacks": list(callbacks)})
    return fitter, steps


def loader(ds, batch_size: int, seed: int, shuffle: bool = True):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle, generator=g)


def _last(trainer, key: str) -> float | None:
    v = trainer.callback_metrics.get(key)
    return None if v is None else float(v)


def train_world(recipe: WorldRecipe, out: Path, art: Path, trainer: dict | None = None, seed: int = 0,
                overwrite: bool = False, unet_callbacks: Callable[[torch.nn.Module], list] | None = None) -> dict:
    """Train the world into the pipeline folder `out` (logs, samples in `art`); returns the metrics.
    `unet_callbacks(vae)`: Callbacks that watch the UNet fit (they may decode with the trained VAE)."""
    torch.set_num_threads(max(1, recipe.threads))
    world.check_resolution(recipe.resolution)
    t_start = time.time()
    timings, metrics = {}, {}
    L.seed_everything(seed, workers=True)

    # -- data ---------------------------------------------------------------
    t0 = time.time()
    print(f"[pretrain] rendering {recipe.n_train} train + {recipe.n_val} val scenes at {recipe.resolution}px ...",
          flush=True)
    train = world.WorldDataset("train", recipe.n_train, seed, recipe.resolution)
    val = world.WorldDataset("val", recipe.n_val, seed, recipe.resolution)
    timings["render_s"] = time.time() - t0

    # -- 1. CLIP ------------------------------------------------------------
    t0 = time.time()
    L.seed_everything(seed)
    fit, steps = _trainer(trainer, recipe.clip_steps, art, "clip")
    clip_mod = WorldCLIP(recipe.resolution, lr=recipe.clip_lr, total_steps=recipe.clip_steps,
                           hard_negatives=recipe.clip_hard_negatives, seed=seed)
    fit.fit(clip_mod, loader(train, recipe.clip_batch_size, seed))
    clip = clip_mod.clip.eval()
    metrics.update(clip_loss=_last(fit, "clip/loss"), clip_train_acc=_last(fit, "clip/acc"))
    with torch.no_grad():
        n = min(256, len(val))
        batch = [val[i] for i in range(n)]
        o = clip(input_ids=tokenize([b["caption"] for b in batch], pad_to_longest=True),
                 pixel_values=torch.stack([b["image"] for b in batch]), return_loss=True)
        metrics["clip_val_loss"] = float(o.loss)
        # retrieval among the val batch, counting any caption identical to the true one as correct
        caps = [b["caption"] for b in batch]
        pick = o.logits_per_image.argmax(-1).tolist()
        metrics["clip_val_i2t_acc"] = sum(caps[p] == caps[i] for i, p in enumerate(pick)) / n
    zero_shot = clip_zero_shot(clip, seed=seed, resolution=recipe.resolution)
    metrics.update(clip_zero_shot_shape=zero_shot["shape"], clip_zero_shot_colour=zero_shot["colour"])
    timings["clip_s"] = time.time() - t0
    print(f"[pretrain] CLIP done in {timings['clip_s']:.0f}s: {metrics}", flush=True)

    # -- 2. VAE -------------------------------------------------------------
    t0 = time.time()
    L.seed_everything(seed + 1)
    fit, _ = _trainer(trainer, recipe.vae_steps, art, "vae")
    vae_mod = WorldVAE(recipe.resolution, lr=recipe.vae_lr, total_steps=recipe.vae_steps)
    fit.fit(vae_mod, loader(train, recipe.vae_batch_size, seed + 1))
    vae = vae_mod.vae.eval()
    metrics["vae_loss"] = _last(fit, "vae/loss")
    with torch.no_grad():
        x = val.images[:256].float() / 127.5 - 1
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        metrics["vae_val_mse"] = float(((rec - x) ** 2).mean())
        metrics["vae_val_psnr"] = float(10 * torch.log10(4.0 / ((rec - x) ** 2).mean()))
    latents = encode_latents(vae, train.images)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    metrics["vae_scaling_factor"] = scaling
    timings["vae_s"] = time.time() - t0
    print(f"[pretrain] VAE done in {timings['vae_s']:.0f}s: mse {metrics['vae_val_mse']:.4f}, "
          f"psnr {metrics['vae_val_psnr']:.1f} dB, scaling {scaling:.3f}", flush=True)

    # -- 3. UNet ------------------------------------------------------------
    t0 = time.time()
    L.seed_everything(seed + 2)
    watchers = unet_callbacks(vae) if unet_callbacks else []
    fit, _ = _trainer(trainer, recipe.unet_steps, art, "unet", callbacks=watchers)
    unet_mod = WorldUNet(_text_encoder_from_clip(clip), recipe.resolution, lr=recipe.unet_lr,
                           total_steps=recipe.unet_steps, cond_dropout=recipe.cond_dropout)
    fit.fit(unet_mod, loader(LatentDataset(latents * scaling, train.captions), recipe.unet_batch_size,
                                  seed + 2))
    metrics["unet_loss"] = _last(fit, "unet/loss")
    metrics["unet_mse"] = _last(fit, "unet/mse")
    with torch.no_grad():  # held-out epsilon MSE of the EMA weights, fixed noise and timesteps
        g = torch.Generator().manual_seed(seed)
        vl = encode_latents(vae, val.images[:256]) * scaling
        noise = torch.randn(vl.shape, generator=g)
        t = torch.randint(0, 1000, (len(vl),), generator=g)
        a = unet_mod.alphas_cumprod[t].view(-1, 1, 1, 1)
        ctx = unet_mod.encode_text(val.captions[:256])
        pred = unet_mod.ema.eval()(a.sqrt() * vl + (1 - a).sqrt() * noise, t, ctx).sample
        metrics["unet_val_mse_ema"] = float(((pred - noise) ** 2).mean())
    timings["unet_s"] = time.time() - t0
    print(f"[pretrain] UNet done in {timings['unet_s']:.0f}s: val eps-MSE (EMA) {metrics['unet_val_mse_ema']:.4f}",
          flush=True)

    # -- save -----------------------------------------------------------------
    world_info = {
        "world": "data.world", "resolution": recipe.resolution, "seed": seed, "n_train": recipe.n_train,
        "sampling": WORLD_SAMPLING, "shapes": list(world.SHAPES), "colours": list(world.COLOURS),
        "held_out_pairs": sorted(map(list, world.HELD_OUT_PAIRS)),
        "steps": {"clip": recipe.clip_steps, "vae": recipe.vae_steps, "unet": recipe.unet_steps},
        "versions": versions(),
    }
    save_world_pipeline(out, clip, vae, unet_mod.ema, recipe.resolution, world_info, overwrite)
    metrics["checkpoint_bytes"] = folder_size(out)
    timings["total_s"] = time.time() - t_start

    # -- smoke check: reload through diffusers and sample -----------------------
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    prompts = [world.object_phrase(dict(shape=s, colour=c), 1) for s, c in
               zip(world.SHAPES + world.SHAPES[:3],
                   ["red", "green", "blue", "yellow", "white", "cyan", "orange", "purple"])]
    t0 = time.time()
    imgs = pipe(prompts, generator=torch.Generator().manual_seed(seed), output_type="np", **WORLD_SAMPLING).images
    timings["sample_8_s"] = time.time() - t0
    grid = (np.concatenate(list(imgs), axis=1) * 255).round().astype("uint8")
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(art / "samples.png")
    (art / "samples.txt").write_text("\n".join(prompts) + "\n")
    metrics["timings"] = timings
    print(f"[pretrain] saved {out} ({metrics['checkpoint_bytes'] / 1e6:.1f} MB) in {timings['total_s'] / 60:.1f} min; "
          f"8 samples in {timings['sample_8_s']:.1f}s\n{json.dumps(metrics, indent=1)}", flush=True)
    return metrics
