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
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from data.world import swap_shapes
from pipeline.models import SD_SCHEDULER_CONFIG
from pipeline.world.models import WORLD_TEXT_CONFIG, WORLD_VISION_CONFIG, tokenize, world_unet_config, world_vae_config

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


