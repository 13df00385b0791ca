"""Where the W8A8 error of the seeded tiny UNet comes from (issue: foundation).

Calibrates naive min-max ranges on random inputs, as tests/test_wrap.py does,
then reports the UNet output's relative error against FP for W8A8 and its
neighbours, and which single layer at 8-bit activations (all others at 16)
costs the most. Prints a table and writes JSON.
Usage: python benchmarks/w8a8_error.py [--out runs/bench/w8a8_error.json]"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.models import tiny_pipeline  # noqa: E402
from pipeline.quant import QuantConfig, act_banks, observing, quantize_unet, set_bit_policy  # noqa: E402
from pipeline.quant.policy import quant_layers  # noqa: E402


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


def rel_error(unet, inputs, ref) -> float:
    with torch.no_grad():
        return float((unet(*inputs).sample - ref).norm() / ref.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench/w8a8_error.json")
    args = ap.parse_args()
    inputs = random_inputs(123)
    with torch.no_grad():
        ref = tiny_pipeline(0).unet(*inputs).sample
    settings = {"W8A8": (QuantConfig(w_bits=8, a_bits=8), "minmax"),
                "W8A8, L_p activation ranges": (QuantConfig(w_bits=8, a_bits=8), "lp"),
                "W8A8, L_p weights + activations": (QuantConfig(w_bits=8, a_bits=8, weight_init="lp"), "lp"),
                "W16A8": (QuantConfig(w_bits=16, a_bits=8), "minmax"),
                "W8A16": (QuantConfig(w_bits=8, a_bits=16), "minmax")}
    rows = {name: rel_error(calibrated(cfg, init), inputs, ref) for name, (cfg, init) in settings.items()}
    unet = calibrated(QuantConfig(w_bits=16, a_bits=16, a_bit_options=[8, 16]))
    set_bit_policy(unet, 16)
    all16 = rel_error(unet, inputs, ref)
    per_layer = {}
    for name in quant_layers(unet):
        set_bit_policy(unet, {name: 8})
        per_layer[name] = rel_error(unet, inputs, ref)
        set_bit_policy(unet, {name: 16})
    worst = sorted(per_layer.items(), key=lambda kv: -kv[1])[:8]
    print("| setting | UNet output rel. error |\n|---|---|")
    for name, err in rows.items():
        print(f"| {name} | {err:.4f} |")
    print(f"\nW16A16 (range clipping only): {all16:.4f}; one layer at A8, the rest at A16:")
    for name, err in worst:
        print(f"  {err:.4f}  {name}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": rows, "w16a16": all16, "one_layer_at_a8": per_layer}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
