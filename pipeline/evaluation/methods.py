"""What is evaluated: the FP model and quantized "methods".

An EvalMethod builds its pipeline and may set the UNet's bit policy before
every prompt batch (`before_batch`): a static PTQ state keeps the policy it
was calibrated with; a text-aware method (QLIP: T2Q -> Q2B) computes one from
the batch's prompts. The evaluation reads the policy in force after
`before_batch` for FAB and BitOPs, so a dynamic method is accounted per batch.
`before_batch` may return the batch's text conditioning (`encode_prompts`) when it
already encoded the prompts (QLIP's T2Q reads that pass): generation reuses them.

A quantized state folder names its kind in quant_config.json
(`extra.eval_method`, default "static"); a new kind plugs in with

    @register_method("my-kind")
    class MyMethod(StaticQuantState):
        def before_batch(self, pipe, prompts):
            set_bit_policy(pipe.unet, ...)

A q2b-stage folder (q2b.json) evaluates as "qlip": its calibrated state with
T2Q -> Q2B bits per batch (the max over the batch's prompts).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from pipeline.deploy.size import artifact_bytes
from pipeline.models import load_pipeline, load_quantized_pipeline
from pipeline.qlip.pipeline import QLIPPipeline, check_deployed_sampler
from pipeline.qlip.q2b import Q2B_FORMAT, follow_link, load_q2b
from pipeline.quant import get_bit_policy, quant_layers
from pipeline.quant.state import check_same_model, read_meta
from pipeline.sampling import Conditioning

METHOD_KINDS: dict[str, type] = {}


def register_method(kind: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        METHOD_KINDS[kind] = cls
        cls.kind = kind
        return cls
    return deco


def format_bits(w_bits: int | Sequence[int], a_bit_options: Sequence[int]) -> str:
    """W4A16, W4A{8,16,32}; a mixed weight allocation (MixDQ) lists its weight bits too: W{2,4,8}A{4,8,16}."""
    def one(bits):
        opts = sorted(set(int(b) for b in bits))
        return str(opts[0]) if len(opts) == 1 else "{" + ",".join(map(str, opts)) + "}"
    return f"W{one([w_bits] if isinstance(w_bits, int) else w_bits)}A{one(a_bit_options)}"


class EvalMethod:
    """Base: full precision. Subclasses override `load` / `before_batch`."""

    kind = "fp"
    is_reference = True
    text_aware = False  # True: before_batch sets bits from the prompts (the evaluation may split its batches)

    def __init__(self, label: str = "FP32"):
        self.label = label

    def load(self, model: str, load: dict | None = None):
        return load_pipeline(model, **(load or {}))

    def to(self, device) -> None:
        """Put what the method holds besides the pipeline (e.g. QLIP's quality source) on `device`."""

    def before_batch(self, pipe, prompts: Sequence[str]) -> Conditioning | None:
        """Set the bit policy for this prompt batch (no-op for static methods); return the
        prompts' (cond, uncond) embeddings if this already encoded them, else None."""
        return None

    def policy(self, pipe) -> torch.Tensor:
        """[n_policy_layers, n_steps] activation bits in force now."""
        return torch.full((len(self.policy_layers(pipe)), 1), 32, dtype=torch.int16)

    def policy_layers(self, pipe) -> list[str]:
        from torch import nn

        return [n for n, m in pipe.unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def weight_bits(self, pipe) -> dict[str, int]:
        return {}

    def artifact_bytes(self, pipe, model: str) -> tuple[int | None, str]:
        """(bytes on disk of what deploys this method, where they were measured); FP: its fp32 parameters."""
        return sum(p.numel() * 4 for p in pipe.unet.parameters()), "fp32 parameters"

    def bit_options(self) -> str:
        return "W32A32"

    def describe(self) -> dict:
        return {"label": self.label, "kind": self.kind, "bit_options": self.bit_options()}


FullPrecision = register_method("fp")(EvalMethod)


@register_method("static")
class StaticQuantState(EvalMethod):
    """A calibrate-stage output folder (quant_state.safetensors + quant_config.json)."""

    is_reference = False

    def __init__(self, path: str | Path, label: str | None = None, meta: dict | None = None):
        self.path = Path(path)
        self.meta = meta or read_meta(self.path)
        cfg = self.meta["quant_config"]
        self.w_bits, self.a_bit_options, self.n_steps = cfg["w_bits"], cfg["a_bit_options"], cfg["n_steps"]
        super().__init__(label or self.meta.get("extra", {}).get("method", "quant"))

    def check_model(self, unet) -> None:
        """Raise ValueError when the state belongs to another model."""

        check_same_model(self.meta, unet, self.path)

    def check_sampler(self, sampler: dict) -> None:
        """Raise ValueError when this method cannot be deployed under `sampler` (steps, guidance, scheduler)."""
        self.check_steps(sampler["steps"])

    def check_steps(self, steps: int) -> None:
        if self.n_steps > 1 and self.n_steps != steps:
            raise ValueError(f"quantized state {self.path} addresses {self.n_steps} sampling steps but --steps is "
                             f"{steps}; evaluate with --steps {self.n_steps}")

    def load(self, model: str, load: dict | None = None):
        return load_quantized_pipeline(model, self.path, **(load or {}))  # PTQD states with their correction

    def policy(self, pipe) -> torch.Tensor:
        return get_bit_policy(pipe.unet)

    def policy_layers(self, pipe) -> list[str]:
        return list(quant_layers(pipe.unet))

    def weight_bits(self, pipe) -> dict[str, int]:
        return {n: m.w_bits for n, m in quant_layers(pipe.unet).items()}

    def artifact_bytes(self, pipe, model: str) -> tuple[int | None, str]:
        return artifact_bytes(pipe.unet, self.path)

    def bit_options(self) -> str:
        if type(self).before_batch is EvalMethod.before_batch:  # static: the stored policy is what runs
            used = {self.a_bit_options[i] for steps in self.meta["policy"].values() for i in steps}
            w_used = set(self.meta.get("w_policy", {}).values()) or {self.w_bits}
            label = format_bits(w_used, used)  # W4A16, not the W4A{8,16,32} bank it was calibrated with
            avg = self.meta.get("extra", {}).get("averages")  # a mixed allocation (mixdq stage) records its own
            return label + (f" (avg W{avg['w']:.2f} A{avg['a']:.2f})" if avg and (len(w_used) > 1 or len(used) > 1)
                            else "")
        return format_bits(self.w_bits, self.a_bit_options)

    def describe(self) -> dict:
        return {**super().describe(), "path": str(self.path), "quant_config": self.meta["quant_config"],
                "extra": self.meta.get("extra", {}), "sha256": self.meta.get("sha256")}


@register_method("qlip")
class QLIPMethod(StaticQuantState):
    """A q2b-stage folder: its calibrated state, with each batch's bits chosen
    by T2Q -> Q2B (docs/q2b.md). Label: "<base method>+QLIP"."""

    text_aware = True

    def __init__(self, path: str | Path, label: str | None = None, meta: dict | None = None):
        self.q2b_path = Path(path)
        self.q2b = load_q2b(self.q2b_path, deployed=True)
        state = follow_link(self.q2b_path, self.q2b.meta["quant_state"])
        super().__init__(state, label)
        if label is None:
            self.label = f"{self.meta.get('extra', {}).get('method', 'quant')}+QLIP"
        qcfg = self.meta["quant_config"]
        self.q2b.check_layout(self.meta["layers"], qcfg["n_steps"], qcfg["a_bit_options"], f"quantized state {state}")
        # q is constant under the text-blind control: every prompt gets the same table, so batches need no splitting
        self.text_aware = self.q2b.meta.get("criterion") != "text-blind"
        self.qlip = None

    def load(self, model: str, load: dict | None = None):
        self.qlip = QLIPPipeline.from_pretrained(self.q2b_path, model=model, load=load)
        return self.qlip.pipe

    def check_sampler(self, sampler: dict) -> None:
        super().check_sampler(sampler)
        check_deployed_sampler(self.q2b.meta, self.q2b_path, sampler, "evaluate (--steps, --guidance, --scheduler)")

    def to(self, device) -> None:
        self.qlip.to(device)

    def before_batch(self, pipe, prompts: Sequence[str]) -> Conditioning | None:
        return self.qlip.prepare_batch(prompts)[1]  # `pipe` is self.qlip.pipe (from `load`)

    def bit_options(self) -> str:
        return format_bits(self.w_bits, self.q2b.bit_options)

    def artifact_bytes(self, pipe, model: str) -> tuple[int | None, str]:
        return artifact_bytes(pipe.unet, self.path, self.q2b_path, model)  # with the Q2B tables and T2Q head

    def describe(self) -> dict:
        m = self.q2b.meta
        return {**super().describe(), "q2b": str(self.q2b_path), "criterion": m.get("criterion"),
                "t2q": m.get("t2q"), "target_fab": m.get("target_fab"), "q2b_sha256": m.get("sha256")}


def method_from_state(path: str | Path, label: str | None = None, flag: str | None = None) -> EvalMethod:
    """The EvalMethod for a quantized-state folder, by its recorded kind (a
    q2b-stage folder: QLIP); `flag` names where the path came from, for the errors."""

    if (Path(path) / Q2B_FORMAT.meta).is_file():
        return METHOD_KINDS["qlip"](path, label=label)
    meta = read_meta(path, flag)
    kind = meta.get("extra", {}).get("eval_method", "static")
    if kind not in METHOD_KINDS or kind == "fp":
        raise ValueError(f"quantized state {path} asks for evaluation method {kind!r}, which is not registered "
                         f"(known: {sorted(k for k in METHOD_KINDS if k != 'fp')})")
    return METHOD_KINDS[kind](path, label=label, meta=meta)


def unique_labels(methods: Sequence[EvalMethod]) -> None:
    """Make colliding labels unique: first by adding the bit options
    ("naive" -> "naive W4A8"), then the state folder."""
    for suffix in (lambda m: m.bit_options(), lambda m: f"({m.path.parent.name}/{m.path.name})"):
        labels = [m.label for m in methods]
        for m in methods:
            if labels.count(m.label) > 1 and hasattr(m, "path"):
                m.label = f"{m.label} {suffix(m)}"
    labels = [m.label for m in methods]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(f"two evaluated methods share the label(s) {dupes}; pass --labels")
    if "FP32" in labels:
        raise ValueError("the label 'FP32' is reserved for the full-precision reference; pass other --labels")
