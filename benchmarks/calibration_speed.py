"""Time to quality of AdaRound reconstruction: q-diffusion's own loop against the project's, side by side.

For each unit of the embedded world (one conv layer, one ResnetBlock2D, one BasicTransformerBlock), with the
same cached unit inputs/outputs (FP model on calibration prompts), the same batch size, the same 4-bit
per-channel min-max weight grid and the same torch threads, it records the held-out unit error (hard
rounding, alpha >= 0, on items of other prompts never used for fitting) against fitting wall time:

  qdiff          q-diffusion's classes, imported from the checkout at --qdiff-path (nothing of theirs is
                 copied): every nn.Conv2d/nn.Linear of a fresh FP copy of the unit becomes their
                 `qdiff.quant_layer.QuantModule` (weight params n_bits, channel_wise, scale_method 'max'), whose
                 `UniformAffineQuantizer` sets the grid on its first call; then their
                 `qdiff.adaptive_rounding.AdaRoundQuantizer` (round_mode 'learned_hard_sigmoid', soft targets
                 on) replaces it, their `LossFunction` (qdiff.block_recon for a block, qdiff.layer_recon for a
                 layer: lp_loss p=2 + 0.01 * rounding loss, LinearTempDecay beta 20 -> 2 after a 20% warm-up,
                 as their scripts call it) and `torch.optim.Adam(alphas)` (their default lr) drive the loop of
                 their `block_reconstruction`: a random batch of the cached samples per iteration
                 (randperm[:batch]), zero_grad, forward, loss, backward, step. Their function itself is not
                 called: it moves every batch to 'cuda' and reads its inputs through their ldm-style QuantModel;
                 this loop is its body on the given cache, on the CPU, with the diffusers block's signature.
  project-fp     the project's AdaRound (`reconstruction.fit_rounding`, init "fp": what calibrate runs by
                 default), a Lightning fit over the same items;
  project-gptq   the same with init "gptq" (`--adaround-init gptq`): GPTQ's closed-form rounding first
                 (its Hessian pass and solve are timed), then `--fast-iters` AdaRound iterations. The curve is
                 the raw AdaRound trajectory from that start (no `select`: calibrate also keeps the start's
                 decisions where they beat the end on the unit's held-out items, `fit_rounding(select=...)`).

speedup_at_equal_error = qdiff's wall time for --iters iterations / the time project-gptq first reaches
(at a checkpoint) the held-out error qdiff has after them. The checkpoints' own evaluation is not timed.

    python benchmarks/calibration_speed.py --qdiff-path /tmp/qdiff_ref      # ~5 min on 2 CPU threads
    python benchmarks/calibration_speed.py --iters 40 --fast-iters 10 --every 10 --cali-n 16   # smoke

Get the checkout with `git --git-dir=<mirror> archive HEAD | tar -x -C /tmp/qdiff_ref`; without it the qdiff
side is skipped (said so, and the JSON has no speedup)."""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.prompts import load_prompts  # noqa: E402
from pipeline.calibration.blocks import set_unit_act, unit_layers  # noqa: E402
from pipeline.calibration.data import CalibrationData, collect  # noqa: E402
from pipeline.calibration.qdiff import capture_unit_io  # noqa: E402
from pipeline.calibration.reconstruction import fit_rounding, hard_rounding_mse, rec_loss  # noqa: E402
from pipeline.models import load_pipeline  # noqa: E402
from pipeline.quant import QuantConfig, quantize_unet  # noqa: E402

UNITS = {"conv": "down_blocks.1.resnets.0.conv2", "resnet": "down_blocks.1.resnets.0",
         "transformer": "down_blocks.1.attentions.0.transformer_blocks.0"}


class Clock:
    """Fitting wall time and process CPU time, with the checkpoints' evaluation taken out. The CPU time is
    recorded too because this machine's cores are shared: wall time also counts other processes' load."""

    def __init__(self):
        self.t0, self.c0, self.paused, self.cpu_paused = time.perf_counter(), time.process_time(), 0.0, 0.0

    def point(self, it: int, err: float) -> dict:
        return {"iter": it, "seconds": time.perf_counter() - self.t0 - self.paused,
                "cpu_seconds": time.process_time() - self.c0 - self.cpu_paused, "held_out_error": err}

    def measure(self, fn):
        t, c = time.perf_counter(), time.process_time()
        value = fn()
        self.paused += time.perf_counter() - t
        self.cpu_paused += time.process_time() - c
        return value


# -- the project's side ------------------------------------------------------------------------------------
class Checkpoints(L.Callback):
    def __init__(self, unit, ctx, held, every: int, clock: Clock, curve: list):
        self.unit, self.ctx, self.held, self.every, self.clock, self.curve = unit, ctx, held, every, clock, curve

    def _record(self, it):
        err = self.clock.measure(lambda: hard_rounding_mse(self.unit, self.ctx, self.held))
        self.curve.append(self.clock.point(it, err))

    def on_train_start(self, trainer, module):
        self._record(0)  # after the start (GPTQ's solve included) and the Trainer's setup

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if (batch_idx + 1) % self.every == 0:
            self._record(batch_idx + 1)


def run_project(unet, name, unit, train, held, iters, every, init, seed) -> list[dict]:
    ctx = unet.quant_context
    for p in unit.parameters():
        p.requires_grad_(False)
    for layer in unit_layers(unit):
        layer.quant_weight = True
    set_unit_act(unit, False)  # the weight phase, as qdiff._reconstruct runs it
    curve: list[dict] = []
    clock = Clock()
    cb = Checkpoints(unit, ctx, held, every, clock, curve)
    fit_rounding(unit, ctx, train, iters, 1e-3, {"callbacks": [cb], "enable_progress_bar": False}, seed, name, init)
    return curve


# -- q-diffusion's side --------------------------------------------------------------------------------------
def stack_items(items) -> tuple[list, dict, torch.Tensor]:
    """The cached items as one pool of samples: every batched tensor concatenated along the batch."""
    batch = items[0]["out"].shape[0]
    cat = lambda vals: torch.cat(vals) if torch.is_tensor(vals[0]) and vals[0].shape[:1] == (batch,) else vals[0]  # noqa: E731
    args = [cat([it["args"][i] for it in items]) for i in range(len(items[0]["args"]))]
    kwargs = {k: cat([it["kwargs"][k] for it in items]) for k in items[0]["kwargs"]}
    return args, kwargs, torch.cat([it["out"] for it in items])


def pick(x, idx, n):
    return x[idx] if torch.is_tensor(x) and x.shape[:1] == (n,) else x


def run_qdiff(qd, fp_unit, is_layer, train, held, iters, every, w_bits, batch, seed) -> list[dict]:
    QuantModule = qd["QuantModule"]
    torch.manual_seed(seed)
    clock = Clock()
    unit = copy.deepcopy(fp_unit)
    for p in unit.parameters():
        p.requires_grad_(False)
    wq_params = {"n_bits": w_bits, "channel_wise": True, "scale_method": "max"}
    if is_layer:
        unit = QuantModule(unit, wq_params, {"n_bits": 8})
    else:
        for mname, m in list(unit.named_modules()):
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                parent, _, child = mname.rpartition(".")
                setattr(unit.get_submodule(parent) if parent else unit, child, QuantModule(m, wq_params, {"n_bits": 8}))
    modules = [m for m in unit.modules() if isinstance(m, QuantModule)]
    for m in modules:
        m.set_quant_state(True, False)
        m.weight_quantizer(m.weight)  # their UniformAffineQuantizer sets its grid on its first call
        m.weight_quantizer = qd["AdaRoundQuantizer"](uaq=m.weight_quantizer, round_mode="learned_hard_sigmoid",
                                                     weight_tensor=m.org_weight.data)
        m.weight_quantizer.soft_targets = True
    optimizer = torch.optim.Adam([m.weight_quantizer.alpha for m in modules])
    loss_func = (qd["LayerLoss"] if is_layer else qd["BlockLoss"])(
        unit, round_loss="relaxation", weight=0.01, max_count=iters, rec_loss="mse", b_range=(20, 2),
        decay_start=0, warmup=0.2, p=2.0)
    args, kwargs, outs = stack_items(train)
    n = outs.shape[0]
    held_pool = [(it["args"], it["kwargs"], it["out"]) for it in held]

    def error():
        for m in modules:
            m.weight_quantizer.soft_targets = False
        with torch.no_grad():
            total = 0.0
            for a, k, o in held_pool:
                out = unit(*a, **k)
                total += float(rec_loss(out[0] if isinstance(out, tuple) else out, o))
        for m in modules:
            m.weight_quantizer.soft_targets = True
        return total / len(held_pool)

    curve = [clock.point(0, clock.measure(error))]
    for i in range(iters):  # the body of their block_reconstruction's loop, on the CPU
        idx = torch.randperm(n)[:batch]
        optimizer.zero_grad()
        out = unit(*[pick(a, idx, n) for a in args], **{k: pick(v, idx, n) for k, v in kwargs.items()})
        err = loss_func(out[0] if isinstance(out, tuple) else out, outs[idx])
        err.backward(retain_graph=True)
        optimizer.step()
        if (i + 1) % every == 0:
            curve.append(clock.point(i + 1, clock.measure(error)))
    return curve


def import_qdiff(path: str | None):
    """q-diffusion's classes from the checkout at `path`, or None (said why)."""
    if not path or not (Path(path) / "qdiff" / "block_recon.py").is_file():
        print(f"note: no q-diffusion checkout at --qdiff-path {path!r} (qdiff/block_recon.py missing): its side is "
              f"skipped; get it with `git --git-dir=<mirror> archive HEAD | tar -x -C DIR`")
        return None
    sys.path.insert(0, str(Path(path).resolve()))
    # their package, from the checkout (importable only once the path is known)
    from qdiff.adaptive_rounding import AdaRoundQuantizer
    from qdiff.block_recon import LossFunction as BlockLoss
    from qdiff.layer_recon import LossFunction as LayerLoss
    from qdiff.quant_layer import QuantModule

    return {"QuantModule": QuantModule, "AdaRoundQuantizer": AdaRoundQuantizer, "BlockLoss": BlockLoss,
            "LayerLoss": LayerLoss}


def first_reaching(curve, target):
    return next((p for p in curve if p["held_out_error"] <= target), None)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qdiff-path", default=None, help="a q-diffusion checkout (its qdiff/ package)")
    ap.add_argument("--iters", type=int, default=1000, help="AdaRound iterations of qdiff and project-fp")
    ap.add_argument("--fast-iters", type=int, default=200, help="AdaRound iterations after the GPTQ start")
    ap.add_argument("--every", type=int, default=50, help="iterations between held-out checkpoints")
    ap.add_argument("--units", default="conv,resnet,transformer")
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cali-n", type=int, default=64)
    ap.add_argument("--held-n", type=int, default=32)
    ap.add_argument("--cali-st", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16, help="prompts per calibration batch (UNet batch: twice)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/bench/calibration_speed")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "calibration_speed.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    load = os.getloadavg()[0]  # other processes on a shared machine slow the wall clock of both sides
    qd = import_qdiff(a.qdiff_path)
    work = Path(a.work)
    fp = load_pipeline("embedded")
    collect(fp, load_prompts("world", limit=a.cali_n, split="train"), work / "cali", steps=a.steps,
            cali_st=a.cali_st, batch_size=a.batch)
    collect(fp, load_prompts("world", limit=a.held_n, split="test"), work / "held", steps=a.steps,
            cali_st=a.cali_st, batch_size=a.batch, seed=1)
    pipe = load_pipeline("embedded")
    quantize_unet(pipe.unet, QuantConfig(w_bits=a.w_bits, a_bits=8, weight_rounding="adaround"))
    unet = pipe.unet
    results = {}
    for case in a.units.split(","):
        name = UNITS[case]
        unit = unet.get_submodule(name)
        train = capture_unit_io(unet, unit, CalibrationData(work / "cali"))
        held = capture_unit_io(unet, unit, CalibrationData(work / "held"))
        row = {"unit": name, "type": type(fp.unet.get_submodule(name)).__name__, "layers": len(unit_layers(unit)),
               "fit_samples": sum(it["out"].shape[0] for it in train),
               "held_out_samples": sum(it["out"].shape[0] for it in held), "curves": {}}
        if qd is not None:
            row["curves"]["qdiff"] = run_qdiff(qd, fp.unet.get_submodule(name), case == "conv", train, held, a.iters,
                                               a.every, a.w_bits, train[0]["out"].shape[0], a.seed)
        row["curves"]["project-fp"] = run_project(unet, name, unit, train, held, a.iters, a.every, "fp", a.seed)
        row["curves"]["project-gptq"] = run_project(unet, name, unit, train, held, a.fast_iters, a.every, "gptq",
                                                    a.seed)
        row["rtn_error"] = row["curves"]["project-fp"][0]["held_out_error"]
        if qd is not None:
            ref = row["curves"]["qdiff"][-1]
            hit = first_reaching(row["curves"]["project-gptq"], ref["held_out_error"])
            row["target"] = {"held_out_error": ref["held_out_error"], "qdiff_seconds": ref["seconds"],
                             "qdiff_iters": ref["iter"]}
            row["project_gptq_reaches"] = hit
            row["speedup_at_equal_error"] = ref["seconds"] / hit["seconds"] if hit else None
            row["speedup_at_equal_error_cpu"] = ref["cpu_seconds"] / hit["cpu_seconds"] if hit else None
            hit_fp = first_reaching(row["curves"]["project-fp"], ref["held_out_error"])
            row["project_fp_speedup"] = ref["seconds"] / hit_fp["seconds"] if hit_fp else None
        results[case] = row
        print(f"\n{case}: {name} ({row['type']}, {row['layers']} quantized layers), RTN held-out error "
              f"{row['rtn_error']:.5g}")
        print("| implementation | iter | wall s | CPU s | held-out error |\n|---|---|---|---|---|")
        for impl, curve in row["curves"].items():
            for p in curve:
                print(f"| {impl} | {p['iter']} | {p['seconds']:.2f} | {p['cpu_seconds']:.2f} | "
                      f"{p['held_out_error']:.5g} |")
        if qd is not None:
            s = row["speedup_at_equal_error"]
            print(f"{case}: qdiff reaches {ref['held_out_error']:.5g} in {ref['seconds']:.1f} s ({ref['iter']} "
                  f"iterations); project-gptq " + (f"at {hit['seconds']:.2f} s ({hit['iter']} iterations): "
                                                   f"speedup {s:.1f}x" if hit else "never (speedup: none)"),
                  flush=True)
    out = {"torch_threads": torch.get_num_threads(), "args": vars(a), "units": results,
           "load_average_start_end": [load, os.getloadavg()[0]]}
    blocks = [r["speedup_at_equal_error"] for k, r in results.items() if k != "conv" and "speedup_at_equal_error" in r]
    if blocks:
        out["speedup_at_equal_error"] = None if None in blocks else min(blocks)  # the block case: the worse block
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"\nspeedup_at_equal_error (block case, the lower of the two blocks): {out.get('speedup_at_equal_error')}")
    return out


if __name__ == "__main__":
    main()
