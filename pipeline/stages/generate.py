"""`python -m pipeline.fit generate`: images from the FP or a quantized UNet.

Writes <run-dir>/<name>/{images/*.png, grid.png, manifest.json}."""
from __future__ import annotations

USES_TRAINER = False


def add_arguments(parser) -> None:
    parser.add_argument("--prompts", type=str, default="world", help="'world', a .txt/.jsonl file")
    parser.add_argument("--n", type=int, default=8, help="number of prompts")
    parser.add_argument("--quant-state", type=str | None, default=None, help="a calibrate output folder")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--name", type=str, default="images")


def load_quantized_pipeline(model: str, quant_state: str | None, allow_download: bool = False):
    from pipeline.models import load_pipeline
    from pipeline.quant import load_quantized

    pipe = load_pipeline(model, allow_download=allow_download)
    if quant_state:
        _, _, extra = load_quantized(pipe.unet, quant_state)
        if "ptqd_k" in extra:  # PTQD states carry their noise correction
            from pipeline.calibration.ptqd import apply_ptqd

            apply_ptqd(pipe.unet, extra)
    return pipe


def run(cfg):
    from PIL import Image

    from callbacks.images import save_grid
    from data.prompts import load_prompts
    from pipeline.runs import prepare_artifact, write_manifest
    from pipeline.sampling import generate

    prompts = load_prompts(cfg.prompts, limit=cfg.n, split="val", seed=cfg.seed)
    pipe = load_quantized_pipeline(cfg.model, cfg.quant_state, cfg.allow_download)
    if cfg.quant_state and pipe.unet.quant_config.n_steps > 1 and pipe.unet.quant_config.n_steps != cfg.steps:
        raise ValueError(f"--steps {cfg.steps} differs from the {pipe.unet.quant_config.n_steps} steps the "
                         f"quantized state was calibrated for")
    out = prepare_artifact(cfg.run_dir, cfg.name, cfg.overwrite)
    seeds = [cfg.seed + i for i in range(len(prompts))]
    images = generate(pipe, prompts, seeds, steps=cfg.steps, guidance=cfg.guidance, batch_size=cfg.batch_size)
    (out / "images").mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(out / "images" / f"{i:05d}.png")
    save_grid([images], out / "grid.png", scale=4 if images.shape[1] <= 64 else 1)
    write_manifest(out, "generate", cfg, prompts=prompts, seeds=seeds)
    print(f"{len(images)} images -> {out}")
    return out
