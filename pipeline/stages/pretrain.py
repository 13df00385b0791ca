"""Stage `pretrain`: train the embedded tiny world (CLIP, VAE, UNet) and save it
as a diffusers StableDiffusionPipeline folder (default checkpoints/tiny-world).

    python -m pipeline.fit pretrain                      # the shipped model (see docs/embedded_world.md for timings)
    python -m pipeline.fit pretrain --out /tmp/w --clip-steps 20 --vae-steps 20 --unet-steps 20 --n-train 512

Per-model step counts are the stage's own flags; `--trainer.max_steps N` caps
each of the three fits at N (handy for smoke runs). Single-process only: the
latent encoding and the saving between the fits run in this process.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

USES_TRAINER = True


def add_arguments(parser) -> None:
    from pipeline.models import EMBEDDED_DIR

    parser.add_argument("--out", type=str, default=str(EMBEDDED_DIR), help="pipeline folder to write")
    parser.add_argument("--resolution", type=int, default=32, help="world resolution (32 or 64)")
    parser.add_argument("--n-train", type=int, default=20000, help="rendered training scenes")
    parser.add_argument("--n-val", type=int, default=1024, help="rendered validation scenes")
    parser.add_argument("--clip-steps", type=int, default=4000, help="shape is learned late (docs/embedded_world.md)")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=2500)
    parser.add_argument("--clip-batch-size", type=int, default=64)
    parser.add_argument("--vae-batch-size", type=int, default=32)
    parser.add_argument("--unet-batch-size", type=int, default=64)
    parser.add_argument("--clip-lr", type=float, default=1e-3)
    parser.add_argument("--clip-hard-negatives", type=bool, default=True,
                        help="also contrast each image with its caption's shapes swapped")
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--cond-dropout", type=float, default=0.1, help="caption -> empty prompt rate (CFG)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (2 on an idle 2-core machine; 1 if other jobs share the cores)")
    parser.add_argument("--monitor-every", type=int, default=500,
                        help="judge shape/colour of 40 EMA generations every N UNet steps (0: never)")


def _trainer(cfg, steps: int, log_dir: Path, name: str, callbacks=()):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    kw = {k: v for k, v in vars(cfg.trainer).items() if v is not None}
    cap = kw.pop("max_steps", -1)
    steps = min(steps, cap) if cap and cap > 0 else steps
    for k in ("max_epochs", "min_epochs", "min_steps", "limit_val_batches", "num_sanity_val_steps"):
        kw.pop(k, None)
    kw.setdefault("log_every_n_steps", 25)
    kw["enable_checkpointing"] = False
    kw.setdefault("enable_model_summary", False)
    return L.Trainer(max_steps=steps, max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0,
                     logger=CSVLogger(str(log_dir), name=name, version=""), callbacks=list(callbacks), **kw), steps


def _loader(ds, batch_size: int, seed: int, shuffle: bool = True):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle, generator=g)


def _last(trainer, key: str) -> float | None:
    v = trainer.callback_metrics.get(key)
    return None if v is None else float(v)


def run(cfg) -> dict:
    import lightning as L

    from data import world
    from pipeline.world import train as P
    from pipeline.runs import prepare_artifact, versions, write_manifest

    torch.set_num_threads(max(1, cfg.threads))
    world.check_resolution(cfg.resolution)
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite true to retrain and replace it, "
                              f"or choose another --out")
    art = prepare_artifact(cfg.run_dir, "pretrain", cfg.overwrite)
    t_start = time.time()
    timings, metrics = {}, {}
    L.seed_everything(cfg.seed, workers=True)

    # -- data ---------------------------------------------------------------
    t0 = time.time()
    print(f"[pretrain] rendering {cfg.n_train} train + {cfg.n_val} val scenes at {cfg.resolution}px ...", flush=True)
    train = world.WorldDataset("train", cfg.n_train, cfg.seed, cfg.resolution)
    val = world.WorldDataset("val", cfg.n_val, cfg.seed, cfg.resolution)
    timings["render_s"] = time.time() - t0

    # -- 1. CLIP ------------------------------------------------------------
    t0 = time.time()
    L.seed_everything(cfg.seed)
    trainer, steps = _trainer(cfg, cfg.clip_steps, art, "clip")
    clip_mod = P.WorldCLIP(cfg.resolution, lr=cfg.clip_lr, total_steps=cfg.clip_steps,
                           hard_negatives=cfg.clip_hard_negatives, seed=cfg.seed)
    trainer.fit(clip_mod, _loader(train, cfg.clip_batch_size, cfg.seed))
    clip = clip_mod.clip.eval()
    metrics.update(clip_loss=_last(trainer, "clip/loss"), clip_train_acc=_last(trainer, "clip/acc"))
    with torch.no_grad():
        n = min(256, len(val))
        batch = [val[i] for i in range(n)]
        o = clip(input_ids=P.tokenize([b["caption"] for b in batch], pad_to_longest=True),
                 pixel_values=torch.stack([b["image"] for b in batch]), return_loss=True)
        metrics["clip_val_loss"] = float(o.loss)
        # retrieval among the val batch, counting any caption identical to the true one as correct
        caps = [b["caption"] for b in batch]
        pick = o.logits_per_image.argmax(-1).tolist()
        metrics["clip_val_i2t_acc"] = sum(caps[p] == caps[i] for i, p in enumerate(pick)) / n
    from pipeline.world.judge import clip_zero_shot

    zero_shot = clip_zero_shot(clip, seed=cfg.seed, resolution=cfg.resolution)
    metrics.update(clip_zero_shot_shape=zero_shot["shape"], clip_zero_shot_colour=zero_shot["colour"])
    timings["clip_s"] = time.time() - t0
    print(f"[pretrain] CLIP done in {timings['clip_s']:.0f}s: {metrics}", flush=True)

    # -- 2. VAE -------------------------------------------------------------
    t0 = time.time()
    L.seed_everything(cfg.seed + 1)
    trainer, _ = _trainer(cfg, cfg.vae_steps, art, "vae")
    vae_mod = P.WorldVAE(cfg.resolution, lr=cfg.vae_lr, total_steps=cfg.vae_steps)
    trainer.fit(vae_mod, _loader(train, cfg.vae_batch_size, cfg.seed + 1))
    vae = vae_mod.vae.eval()
    metrics["vae_loss"] = _last(trainer, "vae/loss")
    with torch.no_grad():
        x = val.images[:256].float() / 127.5 - 1
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        metrics["vae_val_mse"] = float(((rec - x) ** 2).mean())
        metrics["vae_val_psnr"] = float(10 * torch.log10(4.0 / ((rec - x) ** 2).mean()))
    latents = P.encode_latents(vae, train.images)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    metrics["vae_scaling_factor"] = scaling
    timings["vae_s"] = time.time() - t0
    print(f"[pretrain] VAE done in {timings['vae_s']:.0f}s: mse {metrics['vae_val_mse']:.4f}, "
          f"psnr {metrics['vae_val_psnr']:.1f} dB, scaling {scaling:.3f}", flush=True)

    # -- 3. UNet ------------------------------------------------------------
    t0 = time.time()
    L.seed_everything(cfg.seed + 2)
    from callbacks.world_quality import WorldQualityMonitor

    monitor = WorldQualityMonitor(vae, every_n_steps=cfg.monitor_every)
    trainer, _ = _trainer(cfg, cfg.unet_steps, art, "unet", callbacks=[monitor])
    unet_mod = P.WorldUNet(P._text_encoder_from_clip(clip), cfg.resolution, lr=cfg.unet_lr,
                           total_steps=cfg.unet_steps, cond_dropout=cfg.cond_dropout)
    trainer.fit(unet_mod, _loader(P.LatentDataset(latents * scaling, train.captions), cfg.unet_batch_size,
                                  cfg.seed + 2))
    metrics["unet_loss"] = _last(trainer, "unet/loss")
    metrics["unet_mse"] = _last(trainer, "unet/mse")
    metrics["quality_during_training"] = monitor.history
    with torch.no_grad():  # held-out epsilon MSE of the EMA weights, fixed noise and timesteps
        g = torch.Generator().manual_seed(cfg.seed)
        vl = P.encode_latents(vae, val.images[:256]) * scaling
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
        "world": "data.world", "resolution": cfg.resolution, "seed": cfg.seed, "n_train": cfg.n_train,
        "sampling": P.WORLD_SAMPLING, "shapes": list(world.SHAPES), "colours": list(world.COLOURS),
        "held_out_pairs": sorted(map(list, world.HELD_OUT_PAIRS)),
        "steps": {"clip": cfg.clip_steps, "vae": cfg.vae_steps, "unet": cfg.unet_steps}, "versions": versions(),
    }
    P.save_world_pipeline(out, clip, vae, unet_mod.ema, cfg.resolution, world_info, cfg.overwrite)
    metrics["checkpoint_bytes"] = P.folder_size(out)
    timings["total_s"] = time.time() - t_start

    # -- smoke check: reload through diffusers and sample -----------------------
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    prompts = [world.object_phrase(dict(shape=s, colour=c), 1) for s, c in
               zip(world.SHAPES + world.SHAPES[:3], ["red", "green", "blue", "yellow", "white", "cyan", "orange", "purple"])]
    t0 = time.time()
    imgs = pipe(prompts, generator=torch.Generator().manual_seed(cfg.seed), output_type="np", **P.WORLD_SAMPLING).images
    timings["sample_8_s"] = time.time() - t0
    from PIL import Image
    import numpy as np

    grid = (np.concatenate(list(imgs), axis=1) * 255).round().astype("uint8")
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(art / "samples.png")
    (art / "samples.txt").write_text("\n".join(prompts) + "\n")
    write_manifest(art, "pretrain", cfg, metrics, timings=timings, checkpoint=str(out))
    print(f"[pretrain] saved {out} ({metrics['checkpoint_bytes'] / 1e6:.1f} MB) in {timings['total_s'] / 60:.1f} min; "
          f"8 samples in {timings['sample_8_s']:.1f}s\n{json.dumps(metrics, indent=1)}", flush=True)
    return metrics
