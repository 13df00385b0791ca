"""Every stage on CUDA on the full SD v1.4 architecture (seeded random weights), with the time
and peak GPU memory of each; `scripts/gpu_check.sh` runs it. No hub is needed: the published
SD v1.4 UNet / VAE / CLIP ViT-L/14 text-encoder configs are written out here and the CLIP
tokenizer is built offline (data/tokenizer.py).

    scripts/gpu_check.sh                 # CUDA, 512x512, a few steps and iterations
    scripts/gpu_check.sh --dry-run       # the same stages on the CPU at tiny size (checks the script)

Writes benchmarks/results/gpu_check.json (--dry-run: gpu_check_dry_run.json; or --out): per stage
seconds, peak memory, the device."""
from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.tokenizer import clip_tokenizer  # noqa: E402
from pipeline import api, models as M  # noqa: E402
from pipeline.artifacts import write_json_atomic  # noqa: E402

SIZES = {  # model configs and the stages' settings: a few steps and iterations
    "sd14": dict(unet=M.SD14_UNET_CONFIG, vae=M.SD14_VAE_CONFIG, text=M.CLIP_L_TEXT_CONFIG, steps=4, cali_n=4, iters=4,
                 score_n=16, n_reference=8, t2q_epochs=2, q2b_n=4, eval_n=4),
    "tiny": dict(unet=M.TINY_UNET_CONFIG, vae=M.TINY_VAE_CONFIG, text=M.TINY_TEXT_CONFIG, steps=2, cali_n=2, iters=2,
                 score_n=16, n_reference=8, t2q_epochs=1, q2b_n=2, eval_n=2),
}


def write_model(out: Path, size: str, seed: int = 0) -> tuple[Path, Path]:
    """A seeded random SD v1.4-architecture pipeline folder (safetensors), PNDM as SD v1.4 ships,
    and the CLIPTextModelWithProjection folder T2Q reads (the same text weights plus a projection)."""
    cfg = SIZES[size]
    torch.manual_seed(seed)
    clip = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text"]))
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text"]))
    text_encoder.load_state_dict(clip.text_model.state_dict())  # the same text weights (QLIP shares the pass)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**cfg["vae"]), text_encoder=text_encoder, tokenizer=clip_tokenizer(),
        unet=UNet2DConditionModel(**cfg["unet"]),
        scheduler=PNDMScheduler(**M.SD14_SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    model, clip_dir = out / "model", out / "clip"
    pipe.save_pretrained(model, safe_serialization=True)
    clip.save_pretrained(clip_dir, safe_serialization=True)
    clip_tokenizer().save_pretrained(clip_dir)  # with tokenizer_config.json (model_max_length 77)
    return model, clip_dir


def write_reference(out: Path, n: int, side: int, seed: int = 0) -> Path:
    """GIQA reference images for the score stage: seeded smooth colour fields (no dataset needed)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = rng.uniform(0, 255, (4, 4, 3))
        img = np.asarray(Image.fromarray(low.astype(np.uint8)).resize((side, side), Image.BICUBIC))
        Image.fromarray(img).save(out / f"ref_{i:03d}.png")
    return out


def run_stages(model: Path, clip: Path, reference: Path, run: Path, size: str, trainer: dict) -> list[dict]:
    cfg, cuda = SIZES[size], torch.cuda.is_available() and trainer.get("accelerator") == "gpu"
    common = dict(model=str(model), prompts="builtin", seed=0, overwrite=True)
    steps, iters = cfg["steps"], cfg["iters"]
    naive, ptqd = run / "naive", run / "ptqd"
    stages = [
        ("calibrate naive --progressive (PCR)", api.calibrate, api.CalibrateConfig(
            **common, method="naive", w_bits=8, a_bits=8, a_bit_options="8,16", progressive=True, steps=steps,
            cali_n=cfg["cali_n"], batch_size=2, run_dir=str(naive))),
        ("calibrate ptqd (qdiff + PTQD)", api.calibrate, api.CalibrateConfig(
            **common, method="ptqd", w_bits=8, a_bits=8, steps=steps, cali_n=cfg["cali_n"], batch_size=2,
            cali_st=2, iters_w=iters, iters_a=iters, run_dir=str(ptqd))),
        ("score", api.score, api.ScoreConfig(
            model=str(model), prompts="builtin", seed=0, overwrite=True, limit=cfg["score_n"], steps=steps,
            guidance=7.5, shard_size=4, reference=str(reference), n_reference=cfg["n_reference"], gmm_components=1,
            pca_dim=4, inception_batch=8, run_dir=str(run))),
        ("t2q", api.t2q, api.T2QConfig(model=str(model), seed=0, overwrite=True, clip=str(clip),
                                       epochs=cfg["t2q_epochs"], batch_size=4, richness=False, run_dir=str(run))),
        ("q2b", api.q2b, api.Q2BConfig(
            **common, quant_state=str(naive / "quant"), criterion="t2q", t2q=str(run / "t2q"), n=cfg["q2b_n"],
            val_n=2, batch_size=2, epochs=1, target_fab=12.0, run_dir=str(run))),
        ("generate FP", api.generate, api.GenerateConfig(**common, n=2, steps=steps, batch_size=2, run_dir=str(run),
                                                         name="images_fp")),
        ("generate QLIP", api.generate, api.GenerateConfig(**common, q2b=str(run / "q2b"), n=2, steps=steps,
                                                           batch_size=2, run_dir=str(run), name="images_qlip")),
        ("evaluate", api.evaluate, api.EvaluateConfig(
            model=str(model), seed=0, overwrite=True, quant_states=[str(ptqd / "quant"), str(run / "q2b")],
            in_domain="builtin", n=cfg["eval_n"], steps=steps, batch_size=2, fid=False, sfid=False, clip="none",
            lpips=False, run_dir=str(run))),
    ]
    rows = []
    for name, fn, stage_cfg in stages:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn(stage_cfg, trainer)
        if cuda:
            torch.cuda.synchronize()
        row = {"stage": name, "seconds": round(time.perf_counter() - t0, 2),
               "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None}
        rows.append(row)
        peak = f"{row['peak_memory_bytes'] / 2**30:.2f} GiB" if cuda else "n/a (CPU)"
        print(f"[gpu_check] {name}: {row['seconds']:.1f} s, peak GPU memory {peak}", flush=True)
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: checks the script itself")
    p.add_argument("--precision", default=None, help="--trainer.precision (default bf16-mixed on CUDA, 32-true on "
                                                     "the CPU)")
    p.add_argument("--work", default="runs/gpu_check", help="model folders and run outputs (replaced)")
    p.add_argument("--out", default=None, help="JSON results (default benchmarks/results/gpu_check.json; "
                                               "gpu_check_dry_run.json with --dry-run, never taken for a GPU result)")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); run it on a GPU "
                 "machine, or pass --dry-run for the tiny CPU check of the script")
    size = "tiny" if args.dry_run else "sd14"
    precision = args.precision or ("32-true" if args.dry_run else "bf16-mixed")
    trainer = {"accelerator": "cpu" if args.dry_run else "gpu", "devices": 1, "precision": precision,
               "enable_progress_bar": False}
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    model, clip = write_model(work, size)
    side = SIZES[size]["unet"]["sample_size"] * 2 ** (len(SIZES[size]["vae"]["block_out_channels"]) - 1)
    reference = write_reference(work / "reference", SIZES[size]["n_reference"], side)
    setup = time.perf_counter() - t0
    rows = run_stages(model, clip, reference, work / "run", size, trainer)
    device = torch.cuda.get_device_name(0) if not args.dry_run else f"cpu ({platform.processor() or 'cpu'})"
    result = {"size": size, "architecture": "SD v1.4 UNet/VAE/CLIP ViT-L/14 text (seeded random weights)"
              if size == "sd14" else "tiny seeded SD-family pipeline", "resolution": side, "device": device,
              "trainer": trainer, "torch": torch.__version__, "setup_seconds": round(setup, 2), "stages": rows,
              "total_seconds": round(time.perf_counter() - t0, 2)}
    name = "gpu_check_dry_run.json" if args.dry_run else "gpu_check.json"
    out = Path(args.out or ROOT / "benchmarks/results" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    print(f"[gpu_check] {len(rows)} stages on {device} in {result['total_seconds']:.0f} s -> {out}")
    return result


if __name__ == "__main__":
    main()
