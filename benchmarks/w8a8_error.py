"""Where the W8A8 error of the seeded tiny UNet comes from (issue: foundation).

Calibrates naive min-max ranges on random inputs, as tests/test_wrap.py does,
then reports the UNet output's relative error against FP for W8A8 and its
neighbours, and which single layer at 8-bit activations (all others at 16)
costs the most; whether the W8A8 error is the root-sum-square of those per-layer
contributions (independent rounding noise); and how many of the most sensitive
layers (ranked on other inputs) need 16-bit activations to bring W8A8 under 2%.
Prints a table and writes JSON.
With --embedded it also measures the trained embedded world UNet: naive
min-max calibration on 16 world train prompts (10 DDIM steps), and Q-Diffusion's
learned activation step sizes on the same prompts; noise-prediction error on
held-out calibration calls (8 test prompts, 5 steps, both CFG halves); and the
same sensitivity-ranked 16-bit layers (ranked on train-prompt calls).
Usage: python benchmarks/w8a8_error.py [--embedded] [--out runs/bench/w8a8_error.json]"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.prompts import load_prompts  # noqa: E402
from pipeline.calibration.analysis import eps_relative_error, mixed_a16, reference_outputs  # noqa: E402
from pipeline.calibration.data import CalibrationData, collect  # noqa: E402
from pipeline.calibration.naive import calibrate_naive  # noqa: E402
from pipeline.calibration.qdiff import calibrate_qdiff  # noqa: E402
from pipeline.models import load_pipeline, tiny_pipeline  # noqa: E402
from pipeline.quant import QuantConfig, act_banks, observing, quantize_unet, set_bit_policy  # noqa: E402

TARGET = 0.02


def random_inputs(seed: int, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 16, 16, generator=g), torch.tensor([500] * n), torch.randn(n, 77, 64, generator=g)


def calibrated(config: QuantConfig, act_init: str = "minmax"):
    unet = quantize_unet(tiny_pipeline(0).unet, config)
    with observing(unet), torch.no_grad():
        for i in range(4):
            unet(*random_inputs(i))
    for bank in act_banks(unet).values():
        bank.finalize(act_init)
    return unet


def embedded_errors(work: Path, steps: int = 10, iters_a: int = 200) -> tuple[dict[str, float], dict]:
    """W8A8 and neighbours on the embedded world: eps error on held-out FP calibration calls.

    Naive min-max rows, then Q-Diffusion's activation recipe at W8A8 (L_p range init + LSQ step
    sizes per unit, `iters_a` iterations; round-to-nearest weights: AdaRound matters at 4 bits, not 8),
    that recipe with conv_in's input at 16 bits (conv_in sees the raw latent x_t), and with the
    sensitivity-ranked layers at 16 bits (`mixed_a16`, whose full result is returned too)."""
    fp = load_pipeline("embedded")
    collect(fp, load_prompts("world", limit=8, split="test"), work, steps=steps, cali_st=5, guidance=5.0, seed=1)
    held = list(CalibrationData(work, fp, steps=steps).unet_calls())  # refuses data of another model
    held_refs = reference_outputs(fp.unet, held)
    prompts = load_prompts("world", limit=16, split="train")

    rows = {}
    quiet = {"enable_progress_bar": False}
    for w, a in ((8, 8), (16, 8), (8, 16)):
        pipe = load_pipeline("embedded")
        calibrate_naive(pipe, QuantConfig(w_bits=w, a_bits=a, n_steps=steps), prompts, steps, 5.0,
                        trainer_kwargs=quiet)
        rows[f"W{w}A{a}"] = eps_relative_error(pipe.unet, held, held_refs)
    cali = work.parent / (work.name + "_train")
    collect(fp, prompts, cali, steps=steps, cali_st=5, guidance=5.0, seed=0)  # reused when present
    pipe = load_pipeline("embedded")
    quantize_unet(pipe.unet, QuantConfig(w_bits=8, a_bits=8, a_bit_options=[8, 16], n_steps=steps, act_init="lp",
                                         weight_rounding="adaround"))
    calibrate_qdiff(pipe.unet, CalibrationData(cali), cali / "partial", iters_w=0, iters_a=iters_a,
                    trainer_kwargs=quiet)
    set_bit_policy(pipe.unet, 8)
    rows["W8A8, Q-Diffusion activations (L_p + LSQ)"] = eps_relative_error(pipe.unet, held, held_refs)
    set_bit_policy(pipe.unet, {"conv_in": 16})
    rows["W8A8, Q-Diffusion activations, conv_in input at 16 bits"] = eps_relative_error(pipe.unet, held,
                                                                                          held_refs)
    # Rank on a few train-prompt calls (one per calibrated step), judge on the held-out test-prompt calls.
    first_per_step = {}
    for step, call in CalibrationData(cali).unet_calls():
        first_per_step.setdefault(step, call)
    rank = list(first_per_step.items())
    rank_refs = reference_outputs(fp.unet, rank)
    mixed = mixed_a16(pipe.unet, lambda: eps_relative_error(pipe.unet, rank, rank_refs),
                      lambda: eps_relative_error(pipe.unet, held, held_refs), TARGET)
    rows["W8A8, Q-Diffusion activations, sensitive layers at A16"] = mixed["held_out_error"]
    return rows, mixed


def report_mixed(what: str, m: dict) -> None:
    worst = sorted(m["one_layer_at_a8"].items(), key=lambda kv: -kv[1])[:6]
    print(f"\n{what}: W8A8 {m['all_a8']:.4f}, root-sum-square of the {m['layers']} one-layer-at-A8 additions "
          f"{m['rss_prediction']:.4f} (W8A16 floor {m['a16_everywhere']:.4f}); worst single layers: " +
          ", ".join(f"{n} {e:.4f}" for n, e in worst))
    print(f"  {m['layers_at_a16']} of {m['layers']} layers at A16 -> held-out error {m['held_out_error']:.4f} "
          f"at FAB {m['fab']:.2f} (target < {TARGET})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench/w8a8_error.json")
    ap.add_argument("--embedded", action="store_true", help="also measure the trained embedded world UNet")
    args = ap.parse_args()
    calls = [(None, random_inputs(123))]  # one UNet call of the tiny UNet, its step left alone
    refs = reference_outputs(tiny_pipeline(0).unet, calls)
    settings = {"W8A8": (QuantConfig(w_bits=8, a_bits=8), "minmax"),
                "W8A8, L_p activation ranges": (QuantConfig(w_bits=8, a_bits=8), "lp"),
                "W8A8, L_p weights + activations": (QuantConfig(w_bits=8, a_bits=8, weight_init="lp"), "lp"),
                "W16A8": (QuantConfig(w_bits=16, a_bits=8), "minmax"),
                "W8A16": (QuantConfig(w_bits=8, a_bits=16), "minmax")}
    rows = {name: eps_relative_error(calibrated(cfg, init), calls, refs) for name, (cfg, init) in settings.items()}
    rows["W16A16 (range clipping only)"] = eps_relative_error(calibrated(QuantConfig(w_bits=16, a_bits=16)), calls,
                                                              refs)
    rank_calls = [(None, random_inputs(7))]
    rank_refs = reference_outputs(tiny_pipeline(0).unet, rank_calls)
    unet = calibrated(QuantConfig(w_bits=8, a_bits=8, a_bit_options=[8, 16]))
    mixed = mixed_a16(unet, lambda: eps_relative_error(unet, rank_calls, rank_refs),
                      lambda: eps_relative_error(unet, calls, refs), TARGET)
    rows["W8A8, sensitive layers at A16"] = mixed["held_out_error"]
    print("| setting | UNet output rel. error |\n|---|---|")
    for name, err in rows.items():
        print(f"| {name} | {err:.4f} |")
    report_mixed("tiny UNet (ranked on other random inputs)", mixed)
    embedded = embedded_mixed = None
    if args.embedded:
        embedded, embedded_mixed = embedded_errors(Path(args.out).parent / "w8a8_error_embedded_held")
        print("\nembedded world UNet, eps error on held-out calls: " +
              ", ".join(f"{k} {v:.4f}" for k, v in embedded.items()))
        report_mixed("embedded world, Q-Diffusion activations (ranked on train-prompt calls)", embedded_mixed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": rows, "mixed_a16": mixed, "embedded": embedded,
                               "embedded_mixed_a16": embedded_mixed}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
