"""Watch the embedded world's UNet learn to follow its captions.

Every `every_n_steps` training steps the callback samples single-object test
captions with the EMA UNet and lets the render-trained attribute classifier
(`pipeline.world.judge`) judge shape and colour. It only observes: it runs
under a forked RNG, so the trained weights are the same with or without it.
"""
from __future__ import annotations

import time

import lightning as L
import torch

from data import world
from data.tokenizer import clip_tokenizer
from pipeline.models import SD_SCHEDULER_CONFIG
from pipeline.sampling import generate
from pipeline.world.judge import classifier_accuracy, render_single_objects, train_attribute_classifier


class WorldQualityMonitor(L.Callback):
    def __init__(self, vae, every_n_steps: int = 500, n: int = 40, richness: int = 2, steps: int = 20,
                 guidance: float = 5.0, seed: int = 11):
        self.vae, self.every, self.n, self.richness = vae, every_n_steps, n, richness
        self.steps, self.guidance, self.seed = steps, guidance, seed
        self.history: list[dict] = []
        self._judge = None

    def _setup(self):
        self._judge = train_attribute_classifier()
        _, self.shapes, self.colours, scenes = render_single_objects(self.n, seed=self.seed, split="test")
        self.prompts = [world.recaption(s, self.richness) for s in scenes]

    @torch.no_grad()
    def measure(self, pl_module) -> dict:
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        with torch.random.fork_rng():
            if self._judge is None:
                with torch.enable_grad():  # the judge trains once, on renders
                    self._setup()
            pipe = StableDiffusionPipeline(
                vae=self.vae.eval(), text_encoder=pl_module.text_encoder, tokenizer=clip_tokenizer(),
                unet=pl_module.ema.eval(), scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG), safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
            t0 = time.time()
            images = generate(pipe, self.prompts, list(range(self.n)), steps=self.steps, guidance=self.guidance,
                              batch_size=self.n, progress=False)
            shape, colour = classifier_accuracy(self._judge, images, self.shapes, self.colours)
        return {"world/shape_acc": shape, "world/colour_acc": colour, "world/sample_s": time.time() - t0}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every <= 0 or not (step % self.every == 0 or step == trainer.max_steps):
            return
        metrics = self.measure(pl_module)
        self.history.append({"step": step, **metrics})
        pl_module.log_dict({k: v for k, v in metrics.items() if k != "world/sample_s"})
        print(f"[world quality] step {step}: shape {metrics['world/shape_acc']:.2f} (chance 0.20), "
              f"colour {metrics['world/colour_acc']:.2f} (chance 0.125) on {self.n} generations", flush=True)
