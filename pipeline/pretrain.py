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
from pipeline.models import SD_SCHEDULER_CONFIG, clip_tokenizer

# ---------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------
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


# Sampling defaults of the embedded world (also written to checkpoints/tiny-world/world.json).
WORLD_SAMPLING = {"num_inference_steps": 25, "guidance_scale": 5.0}


def tokenize(captions, device=None, pad_to_longest: bool = False) -> torch.Tensor:
    """Token ids padded to 77 as the pipeline does (or to the longest caption: the causal
    text tower gives the same outputs at the real positions, for less compute)."""
    ids = clip_tokenizer()(list(captions), padding="longest" if pad_to_longest else "max_length", max_length=77,
                           truncation=True, return_tensors="pt").input_ids
    return ids if device is None else ids.to(device)


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
    state = {k: v.detach().float().contiguous() for k, v in clip.state_dict().items() if not k.startswith("text_model.")}
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

    from pipeline.models import write_clip_tokenizer_files

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

    from pipeline.models import EMBEDDED_DIR, ModelNotFoundError, _check_safetensors

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
