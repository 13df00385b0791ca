"""Real low-bit inference against FP and fake-quant (issue 20): whole-UNet latency (median of --repeats calls) and
peak memory, batch 2 (CFG), --threads threads, per model and row:

  fp32, bf16 (FP weights; also `bf16_channels_last`, channels-last weights, the faster bf16 layout here), fake
  W8A8 (pipeline/quant), real W8A8, real W8sA8 (symmetric 8-bit weights: no zero-point correction,
  docs/deploy.md#w8), real W4A8, real W4A16 (weight-only, the QLIP comparison), real QLIP (a per-(layer, step)
  table over 8/16 bits, with its share of MACs at <= 8 bits);
  each real row again as `..._drop16`: loaded with fine_grids="drop" (16-bit grids left out: SDPA attention,
  float inputs on the weight-only path), faster, but no longer the fake-quant arithmetic (docs/deploy.md), and as
  `..._bf16`: the bf16 runtime (load_unet(dtype="bf16"): int8 kernels writing bf16, everything else in bf16).
Every quantize pass runs as the fused kernel (pipeline/quant/kernels.py; `machine.fused_quantize`); the head to
head `real_w8sa8_bf16_eager_quantize_vs_bf16` times the same model with the eager passes. `head_to_head` also
times the QLIP table against W4A16 (one model, its policy switched) in each runtime.

Models: the embedded world (also the end-to-end `generate` time per image, FP against real W8A8), and the
BK-SDM-Tiny and SD v1.4 UNet architectures with seeded random weights (published configs in pipeline/models.py).
Quantized rows are calibrated (min-max) on the timing input itself: timing, not quality. Rows alternate call by
call so that background load hits each alike. Also the artifact size against the FP32 UNet.

  python benchmarks/deploy.py                        # the acceptance setting (256 px, 9 repeats, 2 threads)
  python benchmarks/deploy.py --models embedded --repeats 3 --out /tmp/deploy.json   # a quick check

Writes benchmarks/results/deploy.json (`machine_shared`: say whether other jobs shared the cores)."""
from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

import torch
from diffusers import UNet2DConditionModel
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.artifacts import write_json_atomic  # noqa: E402
from pipeline.deploy import export_unet, load_unet  # noqa: E402
from pipeline.models import REFERENCE_UNET_CONFIGS, load_pipeline, unet_example_inputs  # noqa: E402
from pipeline.quant import QuantConfig, act_banks, kernels, observing, quant_layers, quantize_unet, set_bit_policy  # noqa: E402
from pipeline.sampling import generate  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "deploy.json"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory while the block runs (polled every 2 ms), minus the resident memory before it."""

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.delta = self.peak - self.base


def module_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def layer_macs(unet: nn.Module, args, kwargs) -> dict[str, int]:
    """Multiply-accumulates of each quantized layer in one call (from the shapes the call produces)."""
    macs, hooks = {}, []
    for name, layer in quant_layers(unet).items():
        def hook(m, a, out, name=name):
            kernel = m.parts[0][3][2:] if m.parts else m.weight.shape[2:]  # [] for a Linear
            macs[name] = macs.get(name, 0) + out.numel() * m.in_features * math.prod(kernel)
        hooks.append(layer.register_forward_hook(hook))
    with torch.no_grad():
        unet(*args, **kwargs)
    for h in hooks:
        h.remove()
    return macs


def quantized(fp: nn.Module, w_bits: int, args, kwargs, symmetric: bool = False) -> nn.Module:
    unet = quantize_unet(copy.deepcopy(fp), QuantConfig(w_bits=w_bits, a_bits=8, a_bit_options=[8, 16],
                                                        weight_symmetric=symmetric))
    with observing(unet), torch.no_grad():
        unet(*args, **kwargs)
    for bank in act_banks(unet).values():
        bank.finalize("minmax")
    return unet


def qlip_table(unet: nn.Module, share8: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = len(quant_layers(unet))
    return torch.where(torch.rand(n, 1, generator=g) < share8, 8, 16).to(torch.int64)


def with_policy(unet: nn.Module, policy):
    """A row's `cast` that first sets `unet`'s bit policy (rows that share one model)."""
    def cast(a):
        set_bit_policy(unet, policy)
        return a
    return cast


def time_rows(rows: dict, args, kwargs, repeats: int) -> dict:
    """Median and all times of each row's UNet call, the rows interleaved call by call."""
    times = {k: [] for k in rows}
    peaks = {k: 0 for k in rows}
    with torch.no_grad():
        for name, (unet, cast) in rows.items():  # warm-up: oneDNN primitive creation, caches
            unet(*cast(args), **kwargs)
        for _ in range(repeats):
            for name, (unet, cast) in rows.items():
                a = cast(args)
                with PeakRSS() as peak:
                    t = time.perf_counter()
                    unet(*a, **kwargs)
                    times[name].append(time.perf_counter() - t)
                peaks[name] = max(peaks[name], peak.delta)
    return {k: {"median_s": statistics.median(v), "times_s": v, "peak_rss_delta_mib": peaks[k] / 2**20,
                "model_mib": module_bytes(rows[k][0]) / 2**20} for k, v in times.items()}


# the W8A8 rows whose speed-ups the deploy issue sets bars for, also timed against each baseline alone
HEAD_TO_HEAD = ("real_w8a8", "real_w8a8_drop16", "real_w8sa8_drop16", "real_w8sa8_bf16")
# bf16 with channels-last weights (`unet.to(memory_format=torch.channels_last)`): oneDNN's bf16 convs run 10-25%
# faster on this CPU than in the default layout, so it is the stronger bf16 baseline
BASELINES = ("fp32", "bf16", "bf16_channels_last")


def head_to_head(base: tuple, row: tuple, args, kwargs, repeats: int) -> dict:
    """`row` against `base` alone, alternating call by call: in the full table each row follows another (after
    the 1.3 s fp32 call, bf16's call measured 10% slower in a side test), which moves the ratios by that much."""
    timed = time_rows({"base": base, "row": row}, args, kwargs, repeats)
    b, r = timed["base"]["median_s"], timed["row"]["median_s"]
    return {"base_median_s": b, "row_median_s": r, "speedup": b / r}


VARIANTS = {"keep": ("", "keep", "fp32"), "drop16": ("_drop16", "drop", "fp32"), "bf16": ("_bf16", "drop", "bf16")}


def measure(model: str, resolution: int | None, repeats: int, share8: float, tmp: Path,
            variants=tuple(VARIANTS)) -> dict:
    if model == "embedded":
        pipe = load_pipeline("embedded")
        fp = pipe.unet.eval()
    else:
        torch.manual_seed(0)
        pipe, fp = None, UNet2DConditionModel(**REFERENCE_UNET_CONFIGS[model]).eval()
    args, kwargs = unet_example_inputs(fp, batch=2, resolution=resolution if model != "embedded" else None,
                                       device="cpu")
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(args[0].shape, generator=g), args[1], torch.randn(args[2].shape, generator=g))
    fp_bytes = sum(p.numel() * 4 for p in fp.parameters())
    real, sizes = {}, {}
    # a fake model is about twice the fp32 UNet: each is exported and freed before the next is built; the last,
    # fake (asymmetric) W8, is also a timed row
    for key, w_bits, symmetric in (("4", 4, False), ("8s", 8, True), ("8", 8, False)):
        source = quantized(fp, w_bits, args, kwargs, symmetric)
        folder = tmp / f"{model}_w{key}"
        export_unet(copy.deepcopy(source) if key == "8" else source, folder)
        sizes[f"W{key}"] = (folder / "unet.safetensors").stat().st_size / fp_bytes
        real[key] = folder
    fake8 = source
    del source
    same = lambda a: a  # noqa: E731
    bf16 = lambda a: tuple(t.bfloat16() if torch.is_tensor(t) and t.is_floating_point() else t for t in a)  # noqa: E731
    rows = {"fp32": (fp, same), "bf16": (copy.deepcopy(fp).bfloat16(), bf16),
            "bf16_channels_last": (copy.deepcopy(fp).bfloat16().to(memory_format=torch.channels_last), bf16),
            "fake_w8a8": (fake8, same)}
    for suffix, grids, dtype in (VARIANTS[v] for v in variants):  # how each real model is loaded
        # W4A16 and the QLIP table share one model (its dequantized-weight cache is the size of the fp32 UNet);
        # each row sets its policy before its call, outside the timed region
        load = dict(fine_grids=grids, dtype=dtype)
        qlip = load_unet(real["4"], "onednn", **load)
        table = qlip_table(qlip, share8)
        rows.update({f"real_w8a8{suffix}": (load_unet(real["8"], "onednn", **load), same),
                     f"real_w8sa8{suffix}": (load_unet(real["8s"], "onednn", **load), same),
                     f"real_w4a8{suffix}": (load_unet(real["4"], "onednn", **load), same),
                     f"real_w4a16{suffix}": (qlip, with_policy(qlip, 16)),
                     f"real_qlip_w4{suffix}": (qlip, with_policy(qlip, table))})
    set_bit_policy(qlip, table)
    macs = layer_macs(qlip, args, kwargs)
    bits = dict(zip(quant_layers(qlip), table[:, 0].tolist()))
    share = sum(v for k, v in macs.items() if bits[k] <= 8) / sum(macs.values())
    result = {"resolution": resolution if model != "embedded" else fp.config.sample_size * 8,
              "fp32_unet_mib": fp_bytes / 2**20, "artifact_size_ratio": sizes,
              "rows": time_rows(rows, args, kwargs, repeats), "qlip_mac_share_le8": share}
    r = result["rows"]
    for row in list(r):
        r[row]["speedup_vs_fp32"] = r["fp32"]["median_s"] / r[row]["median_s"]
        r[row]["speedup_vs_bf16"] = r["bf16"]["median_s"] / r[row]["median_s"]
        r[row]["speedup_vs_bf16_channels_last"] = r["bf16_channels_last"]["median_s"] / r[row]["median_s"]
    result["head_to_head"] = {
        f"{row}_vs_{base}": head_to_head(rows[base], rows[row], args, kwargs, repeats)
        for row in HEAD_TO_HEAD if row in rows for base in BASELINES}
    for suffix in ("", "_drop16", "_bf16"):  # the QLIP table against W4A16 (the same model) in each runtime
        if f"real_qlip_w4{suffix}" in rows:
            result["head_to_head"][f"real_qlip_w4{suffix}_vs_real_w4a16{suffix}"] = head_to_head(
                rows[f"real_w4a16{suffix}"], rows[f"real_qlip_w4{suffix}"], args, kwargs, repeats)
    if "real_w8sa8_bf16" in rows and kernels.unavailable() is None:  # what the fused quantize pass buys
        with mock.patch.dict(os.environ, {"QLIP_FUSED_KERNELS": "0"}):  # the eager passes (kernels.py)
            result["head_to_head"]["real_w8sa8_bf16_eager_quantize_vs_bf16"] = head_to_head(
                rows["bf16"], rows["real_w8sa8_bf16"], args, kwargs, repeats)
    if pipe is not None:  # end to end: text encoder, 20 steps, VAE
        prompts = ["a red circle", "a blue star"]
        per_image = {}
        real_row = next(r for r in ("real_w8a8", "real_w8a8_drop16", "real_w8a8_bf16") if r in rows)
        for name, unet in (("fp32", fp), (real_row, rows[real_row][0])):
            pipe.unet = unet
            t = time.perf_counter()
            generate(pipe, prompts, steps=20, progress=False)
            per_image[name] = (time.perf_counter() - t) / len(prompts)
        result["generate_s_per_image"] = per_image
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="bk-sdm-tiny,sd-v1-4,embedded")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--qlip-share", type=float, default=0.5, help="fraction of layers the QLIP table puts at 8")
    parser.add_argument("--machine-shared", default="unknown",
                        help="whether other jobs shared the cores during the run (yes / no): timings are noisy if so")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="how the real rows are loaded, comma-separated: keep (the fake-quant arithmetic), "
                             "drop16 (fine_grids='drop'), bf16 (the bf16 runtime); fewer: fewer models in memory "
                             "(SD v1.4 on 24 GiB)")
    parser.add_argument("--out", default=str(OUT))
    a = parser.parse_args(argv)
    variants = a.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants {a.variants!r}: choose among {', '.join(VARIANTS)}")
    torch.set_num_threads(a.threads)
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                           "threads": a.threads, "cores": os.cpu_count(), "machine_shared": a.machine_shared,
                           "load_average": os.getloadavg(), "fused_quantize": kernels.unavailable() or "on"},
               "repeats": a.repeats, "batch": 2, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for model in a.models.split(","):
            results["models"][model] = measure(model, a.resolution, a.repeats, a.qlip_share, Path(tmp), variants)
            rows = results["models"][model]["rows"]
            print(model, " ".join(f"{k} {v['median_s'] * 1e3:.1f}ms ({v['speedup_vs_fp32']:.2f}x)"
                                  for k, v in rows.items()), flush=True)
            print(model, "head to head:", " ".join(f"{k} {v['speedup']:.2f}x" for k, v in
                                                   results["models"][model]["head_to_head"].items()), flush=True)
            bk = results["models"].get("bk-sdm-tiny")
            if bk:
                results["bk_sdm_tiny_real_w8a8"] = {  # head to head (the table's own ratios are in "rows")
                    row: {f"speedup_vs_{base}": bk["head_to_head"][f"{row}_vs_{base}"]["speedup"]
                          for base in BASELINES}
                    for row in HEAD_TO_HEAD if f"{row}_vs_fp32" in bk["head_to_head"]}
            write_json_atomic(Path(a.out), results)  # after every model: a later model's crash keeps these
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
