"""Metric-decoupled layer sensitivity (MixDQ Sec. 3.2): per layer and candidate bit-width, only that layer
quantized (its weights, or its input activations) and every other layer in full precision.

Two scores per measurement, both kept for every layer so that a coupled variant can be compared:
  ssim: SSIM of the final image to the FP image of the same prompt and seed (content layers' metric);
  sqnr: 10 log10(sum ||eps_fp||^2 / sum ||eps_q - eps_fp||^2) in dB of the UNet output, each call fed the FP
        trajectory's input (quality layers' metric), over every call of every probe prompt.
Higher is better for both. The attention processors (q/k/v/softmax banks) stay off throughout: the
measurement is of the Conv2d/Linear layer itself. Progress is kept per layer (resumable, `check_progress`)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import lightning as L
import torch

from pipeline.artifacts import check_progress, jsonable, write_json_atomic
from pipeline.metrics.cost import layer_stats
from pipeline.metrics.fidelity import as_nchw, ssim_kernel, to_unit
from pipeline.quant import get_bit_policy, get_weight_bits, quant_layers, set_bit_policy, set_quant_state, set_step
from pipeline.quant.config import parse_bits
from pipeline.quant.policy import set_weight_bits
from pipeline.sampling import encode_prompts, generate

KINDS = ("w", "a")  # weight bits, activation bits
MAX_SQNR_DB = 200.0  # an exact output (no measurable noise) scores this, not infinity


@dataclass
class Probe:
    """What each measurement generates: prompts with their fixed noise seeds, the schedule and guidance."""

    prompts: list[str]
    seeds: list[int]
    steps: int
    guidance: float

    def __post_init__(self):
        if not self.prompts or len(self.prompts) != len(self.seeds):
            raise ValueError(f"a sensitivity probe needs prompts with one seed each; got {len(self.prompts)} prompts "
                             f"and {len(self.seeds)} seeds")


def candidates(w_bits: Sequence[int], a_bits: Sequence[int]) -> list[tuple[str, int]]:
    """The (kind, bits) measured for every layer: 32 (full precision) is the reference, never a candidate."""
    return [("w", int(b)) for b in w_bits if b < 32] + [("a", int(b)) for b in a_bits if b < 32]


def check_candidates(unet, w_bits: Sequence[int], a_bits: Sequence[int]) -> None:
    """Every candidate bit must have a calibrated quantizer in the state."""
    cfg = unet.quant_config
    for kind, have, want in (("weight", cfg.w_bit_options, w_bits), ("activation", cfg.a_bit_options, a_bits)):
        missing = sorted(set(want) - set(have))
        if missing:
            flag = "--w-bit-options" if kind == "weight" else "--a-bit-options"
            raise ValueError(f"{kind} bits {missing} have no calibrated quantizer in the state (it has {have}); "
                             f"measure only those, or calibrate with {flag} including them")


def sqnr_db(signal: float, noise: float) -> float:
    if noise <= signal * 10 ** (-MAX_SQNR_DB / 10):
        return MAX_SQNR_DB
    return 10 * math.log10(signal / noise)


def ssim_to(fp, images) -> float:
    import piq

    x, y = to_unit(as_nchw(images)), to_unit(as_nchw(fp))
    return float(piq.ssim(x, y, data_range=1.0, kernel_size=ssim_kernel(*x.shape[-2:]), reduction="none").mean())


class Measurement:
    """The FP reference of a probe (images, and every UNet call's input and output), and `score(...)`: the two
    metrics of the UNet as it is now configured."""

    def __init__(self, pipe, probe: Probe, batch_size: int = 8):
        self.pipe, self.probe, self.batch_size = pipe, probe, batch_size
        self.text = encode_prompts(pipe, probe.prompts)
        unet = pipe.unet
        calls = []

        def record(module, args, kwargs, out):
            out = out[0] if isinstance(out, tuple) else out.sample
            calls.append((module.quant_context.step, args, kwargs, out.detach().clone()))

        set_quant_state(unet, weight=False, act=False)
        handle = unet.register_forward_hook(record, with_kwargs=True)
        try:
            self.fp_images = self._images()
        finally:
            handle.remove()
        self.calls = calls
        self.signal = float(sum(c[3].double().pow(2).sum() for c in calls))

    def _images(self):
        p = self.probe
        return generate(self.pipe, p.prompts, p.seeds, steps=p.steps, guidance=p.guidance,
                        batch_size=self.batch_size, progress=False, text=self.text)

    @torch.no_grad()
    def score(self) -> dict[str, float]:
        unet = self.pipe.unet
        noise = 0.0
        for step, args, kwargs, fp_out in self.calls:
            set_step(unet, step)
            out = unet(*args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out.sample
            noise += float((out.double() - fp_out.double()).pow(2).sum())
        return {"ssim": ssim_to(self.fp_images, self._images()), "sqnr": sqnr_db(self.signal, noise)}


def measure_sensitivity(pipe, probe: Probe, w_bits: Sequence[int], a_bits: Sequence[int],
                        progress_file: str | Path | None = None, signature: dict | None = None,
                        discard_stale: bool = False, layers: Sequence[str] | None = None,
                        on_measured: Callable[[str, str, int], None] | None = None, batch_size: int = 8,
                        reference: Measurement | None = None) -> dict:
    """{"layers", "candidates", "ssim": {layer: {"w2": ..}}, "sqnr": {...}} for `pipe.unet` (quantized, every
    candidate calibrated). `progress_file`: measured layers are kept there (under `signature`) and skipped by a
    rerun. `on_measured(layer, kind, bits)` is called after each measurement (progress bars, tests).
    `reference`: the probe's FP reference when the caller already has it (a process measuring its layers one
    call at a time builds it once). The UNet's weight bits, policy and quantization switches are restored
    afterwards."""
    unet = pipe.unet
    check_candidates(unet, w_bits, a_bits)
    cands = candidates(w_bits, a_bits)
    names = list(layers or quant_layers(unet))
    record = {"signature": signature or {}, "ssim": {}, "sqnr": {}}
    if progress_file is not None:
        record = check_progress(progress_file, record["signature"], "sensitivity progress", discard_stale) or record
    saved_w, saved_a = dict(get_weight_bits(unet)), get_bit_policy(unet)
    high_a = max(unet.quant_config.a_bit_options)
    try:
        all_layers = quant_layers(unet)
        for name in names:
            if name in record["ssim"]:
                continue
            measure = reference = reference or Measurement(pipe, probe, batch_size)  # only if a layer is left
            layer = all_layers[name]
            row_ssim, row_sqnr = {}, {}
            for kind, bits in cands:
                set_quant_state(unet, weight=False, act=False)
                if kind == "w":
                    set_weight_bits(unet, {name: bits})  # switches this layer's weight quantization on
                else:
                    set_bit_policy(unet, {name: bits})
                    layer.quant_act = True
                s = measure.score()
                row_ssim[f"{kind}{bits}"], row_sqnr[f"{kind}{bits}"] = s["ssim"], s["sqnr"]
                set_weight_bits(unet, {name: saved_w[name]})
                set_bit_policy(unet, {name: high_a})
                if on_measured is not None:
                    on_measured(name, kind, bits)
            record["ssim"][name], record["sqnr"][name] = row_ssim, row_sqnr
            if progress_file is not None:
                write_json_atomic(progress_file, record)  # a kill loses at most the layer being measured
    finally:
        set_weight_bits(unet, saved_w)
        set_bit_policy(unet, saved_a)
        set_quant_state(unet, weight=True, act=True)
    return {"layers": names, "candidates": [f"{k}{b}" for k, b in cands],
            "ssim": {n: record["ssim"][n] for n in names}, "sqnr": {n: record["sqnr"][n] for n in names}}


# A process's progress file in the progress folder: one per rank, so that processes never write the same file.
# `progress.json` (a single-process run before sharding existed) matches the pattern too and is reused.
PROGRESS_GLOB = "progress*.json"


def rank_progress_file(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"progress_rank{rank}.json"


def check_progress_folder(folder: str | Path, signature: dict, discard_stale: bool = False) -> None:
    """Rank 0, before any process measures: every progress file in `folder` was made under `signature`, or
    (`discard_stale`, --overwrite) the folder is discarded; otherwise the run is refused, naming what differs."""
    for f in sorted(Path(folder).glob(PROGRESS_GLOB)):
        if check_progress(f, signature, "sensitivity progress", discard_stale) is None:
            return  # discarded: the whole folder went


def measured_so_far(folder: str | Path, signature: dict) -> dict:
    """{"ssim": {layer: row}, "sqnr": {...}}: the union of every process's progress file in `folder` made under
    `signature` (a layer's scores do not depend on which process, or how many, measured it)."""
    done = {"ssim": {}, "sqnr": {}}
    sig = jsonable(signature)
    for f in sorted(Path(folder).glob(PROGRESS_GLOB)):
        try:
            rec = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # atomic writes cannot leave this; such a file's layers are measured again
        if rec.get("signature") == sig:
            for metric in done:
                done[metric].update(rec.get(metric, {}))
    return done


class LayerShard(L.LightningModule):
    """The sensitivity stage's predict loop: each batch is one layer name (dealt to the processes by
    `data.prompts.dealt_loader`); the process measures it unless some process's progress in `progress_dir`
    already holds it, and keeps it in its own file (`rank_progress_file`). The probe's FP reference is built
    once per process, at its first layer left to measure."""

    def __init__(self, pipe, probe: Probe, w_bits: Sequence[int], a_bits: Sequence[int], progress_dir: str | Path,
                 signature: dict, batch_size: int = 8):
        super().__init__()
        self.pipe, self.probe, self.w_bits, self.a_bits = pipe, probe, list(w_bits), list(a_bits)
        self.progress_dir, self.signature, self.batch_size = Path(progress_dir), signature, batch_size
        self.reference: Measurement | None = None
        self.measured: list[str] = []

    def on_predict_start(self) -> None:
        # rank 0 has refused or discarded another run's progress (check_progress_folder) before any process
        # reads it: under torchrun every process reaches this point at once
        self.trainer.strategy.barrier()
        self.done = measured_so_far(self.progress_dir, self.signature)
        self.file = rank_progress_file(self.progress_dir, self.trainer.global_rank)

    def predict_step(self, name, batch_idx):
        if name in self.done["ssim"]:
            return None  # measured by an earlier run (by any process)
        if self.reference is None:
            self.reference = Measurement(self.pipe, self.probe, self.batch_size)
        with torch.no_grad():
            measure_sensitivity(self.pipe, self.probe, self.w_bits, self.a_bits, self.file, self.signature,
                                layers=[name], reference=self.reference)
        self.measured.append(name)
        return None


SENSITIVITY_FORMAT = "qlip-sensitivity/1"
SENSITIVITY_FILE = "sensitivity.json"


class SensitivityMismatch(ValueError):
    """A sensitivity file measured on another model, state, step count or bit set than the one it is used with."""


class NonFiniteSensitivity(ValueError):
    """A sensitivity file holding NaN or infinite scores."""


def read_sensitivity(path: str | Path, flag: str = "--sensitivity") -> dict:
    """The sensitivity stage's record (folder or file), checked: its format, a score for every layer and
    candidate in both metrics, every score finite."""
    path = Path(path)
    file = path / SENSITIVITY_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{flag} {path}: no {SENSITIVITY_FILE} there; run `python -m pipeline.fit "
                                f"sensitivity --quant-state ...` first")
    try:
        rec = json.loads(file.read_text(), parse_constant=lambda c: float(c))  # NaN / Infinity: refused below
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{flag} {file} is corrupted ({e}); run the sensitivity stage again") from e
    if not isinstance(rec, dict) or rec.get("format") != SENSITIVITY_FORMAT:
        raise ValueError(f"{flag} {file} is not a sensitivity record (format {SENSITIVITY_FORMAT!r} expected)")
    for metric in ("ssim", "sqnr"):
        for layer in rec["layers"]:
            row = rec[metric].get(layer)
            if row is None or set(row) != set(rec["candidates"]):
                raise ValueError(f"{flag} {file}: {metric} of layer {layer} lacks candidates "
                                 f"{sorted(set(rec['candidates']) - set(row or {}))}; run the sensitivity stage again")
            bad = {c: v for c, v in row.items() if not (isinstance(v, (int, float)) and math.isfinite(v))}
            if bad:
                raise NonFiniteSensitivity(f"{flag} {file}: {metric} of layer {layer} is not finite at {bad}; "
                                           f"measure again (--overwrite true) rather than allocate bits from it")
    rec["path"] = str(file)
    return rec


def lowest_candidates(cands: Sequence[str]) -> list[str]:
    """The lowest weight and the lowest activation candidate among `cands` (e.g. ["w2", "a4"])."""
    return [min(mine, key=lambda c: int(c[1:])) for k in KINDS if (mine := [c for c in cands if c[0] == k])]


def probe_agreement(first: dict, second: dict) -> dict:
    """How well a sensitivity ranking carries over to other prompts: the Spearman rank correlation, across the
    layers, of two records measured on disjoint probe sets (sensitivity --probe-set 0 and 1), per metric at
    the lowest weight and the lowest activation candidate: {"w2": {"ssim": rho, "sqnr": rho}, "a4": {...},
    "layers": n}. rho is None where one side ranks nothing (every layer scored the same). MixDQ's claim
    (the issue's acceptance) is rho >= 0.8 at the lowest bit."""
    from scipy.stats import spearmanr

    if first["layers"] != second["layers"]:
        raise ValueError(f"the two sensitivity records measured different layers ({len(first['layers'])} and "
                         f"{len(second['layers'])}); measure both with the same --layers")
    shared = [c for c in first["candidates"] if c in second["candidates"]]
    if not shared:
        raise ValueError(f"the two sensitivity records share no candidate ({first['candidates']} and "
                         f"{second['candidates']}); measure both with the same --w/--a-bit-options")
    overlap = sorted(set(first["signature"]["prompts"]) & set(second["signature"]["prompts"]))
    if overlap:
        raise ValueError(f"the two probe sets share prompts ({overlap[:2]}): their agreement would not measure "
                         f"reproducibility across prompts; measure them with different --probe-set")
    out: dict = {"layers": len(first["layers"])}
    for cand in lowest_candidates(shared):
        out[cand] = {}
        for metric in ("ssim", "sqnr"):
            x = [first[metric][n][cand] for n in first["layers"]]
            y = [second[metric][n][cand] for n in first["layers"]]
            ranked = min(len(set(x)), len(set(y))) > 1
            out[cand][metric] = float(spearmanr(x, y).statistic) if ranked else None
    return out


def sensitivity_table(rec: dict) -> str:
    """Markdown: one row per layer (group, then SSIM and SQNR at every candidate)."""
    cands = rec["candidates"]
    head = "| layer | group | " + " | ".join(f"SSIM {c}" for c in cands) + " | " + \
        " | ".join(f"SQNR {c} (dB)" for c in cands) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(cands))]
    for n in rec["layers"]:
        lines.append(f"| {n} | {rec['groups'][n]} | " + " | ".join(f"{rec['ssim'][n][c]:.5f}" for c in cands)
                     + " | " + " | ".join(f"{rec['sqnr'][n][c]:.2f}" for c in cands) + " |")
    return "\n".join(lines) + "\n"


def layer_sizes(unet) -> dict:
    """What the allocator weighs each quantized layer by: weight elements (the size budget) and input-activation
    elements of one CFG call (FAB), from a meta-device trace; every layer's, measured or not (a layer left
    unmeasured keeps its bits, and its cost still counts)."""
    stats = layer_stats(unet)
    every = list(quant_layers(unet))
    return {"weight_numel": {n: stats[n].weight_numel for n in every},
            "act_numel": {n: stats[n].in_numel for n in every}}


def check_same_measurement(rec: dict, meta: dict, state, steps: int | None = None) -> None:
    """Refuse a record measured on another model, state or step count than `meta` (a quant state's JSON)."""
    sig, file = rec["signature"], rec["path"]
    if sig.get("model") != meta["model"]["weights_sha256"]:
        raise SensitivityMismatch(f"--sensitivity {file} was measured on another model (weights "
                                  f"{str(sig.get('model'))[:12]}) than --quant-state {state} "
                                  f"({meta['model']['weights_sha256'][:12]}); measure it on this state")
    if sig.get("quant_state") != meta.get("sha256"):
        raise SensitivityMismatch(f"--sensitivity {file} was measured on another quantized state than "
                                  f"--quant-state {state} (its tensors differ); pass the state it was measured on, "
                                  f"or run the sensitivity stage on this one")
    if steps is not None and steps != sig.get("steps"):
        raise SensitivityMismatch(f"--steps {steps}: --sensitivity {file} was measured with {sig.get('steps')} "
                                  f"sampling steps; measure it again with --steps {steps}, or drop --steps")


def pick_bits(rec: dict, kind: str, text: str | None, have: Sequence[int]) -> list[int]:
    """The candidate bits of `kind` ("w"/"a") to allocate among: `text` (a --w/a-bit-options flag) or every
    measured one. Each must have a quantizer in the state and a measurement in the record."""
    flag = "--w-bit-options" if kind == "w" else "--a-bit-options"
    measured = sorted(int(c[1:]) for c in rec["candidates"] if c[0] == kind)
    bits = sorted(parse_bits(text, flag) or measured)
    lacking = [b for b in bits if b not in have]
    if lacking:
        raise ValueError(f"{flag}: bits {lacking} have no quantizer in the state (it has {sorted(have)}); "
                         f"calibrate with {flag} including them")
    unmeasured = [b for b in bits if b not in measured]
    if unmeasured:
        raise SensitivityMismatch(f"{flag}: bits {unmeasured} were not measured in --sensitivity {rec['path']} "
                                  f"(it has {kind} candidates {measured}); measure them, or choose among those")
    if not bits:
        raise SensitivityMismatch(f"--sensitivity {rec['path']} measured no {'weight' if kind == 'w' else 'activation'}"
                                  f" candidates; run the sensitivity stage with {flag}")
    return bits
