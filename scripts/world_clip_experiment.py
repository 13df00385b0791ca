"""Experiment behind docs/embedded_world.md's "The UNet follows shape once the CLIP sees it".

CLIP 4000 steps with shape-swap hard negatives, the shipped VAE, a fresh UNet for 2000 steps judged by
the world-quality monitor every 500 steps. Writes runs/world-v4exp/{clip.safetensors, result.json}.
    python scripts/world_clip_experiment.py      # ~40 min at 2 threads on an idle 2-core CPU (estimate)
"""
import argparse
import json
import sys
import time
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "world-v4exp"
sys.path.insert(0, str(ROOT))

from callbacks.world_quality import WorldQualityMonitor  # noqa: E402
from data import world as W  # noqa: E402
from pipeline.models import load_pipeline  # noqa: E402
from pipeline.world import train as P  # noqa: E402
from pipeline.world.io import _text_encoder_from_clip  # noqa: E402
from pipeline.world.judge import clip_zero_shot  # noqa: E402


def main(argv=None) -> dict:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    out = {}
    L.seed_everything(0)
    train = W.WorldDataset("train", 20000, 0, 32)
    L.seed_everything(0)
    clip_mod = P.WorldCLIP(32, lr=1e-3, total_steps=4000, hard_negatives=True)
    t0 = time.time()
    L.Trainer(max_steps=4000, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(clip_mod, P.loader(train, 64, 0))
    clip = clip_mod.clip.eval()
    out["clip_s"] = time.time() - t0
    out["clip_zero_shot"] = clip_zero_shot(clip)
    print(out, flush=True)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(OUT / "clip.safetensors"))
    vae = load_pipeline("embedded").vae.eval()
    latents = P.encode_latents(vae, train.images) * vae.config.scaling_factor
    L.seed_everything(2)
    monitor = WorldQualityMonitor(vae, every_n_steps=500)
    unet_mod = P.WorldUNet(_text_encoder_from_clip(clip), 32, lr=1e-3, total_steps=2000)
    t0 = time.time()
    L.Trainer(max_steps=2000, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[monitor]).fit(
        unet_mod, P.loader(P.LatentDataset(latents, train.captions), 64, 2))
    out["unet_s"] = time.time() - t0
    out["history"] = monitor.history
    print(json.dumps(out, indent=1), flush=True)
    (OUT / "result.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
