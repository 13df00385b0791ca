"""The command line: `python -m pipeline.fit <stage> [--config cfg.yaml] [--trainer.* flags] [stage flags]`.

Each stage is a config dataclass plus a function (`pipeline/stages/`); the
flags are generated from the dataclass fields (name, type, default, and the
docstring under each field as help), so each default and help text exists
once. `--trainer.*` are Lightning Trainer arguments. `--print_config` dumps a
YAML that `--config` takes. A user error prints one line and exits with 2;
`--debug` (or QLIP_DEBUG=1) shows the traceback instead."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import os
import re
import sys
import typing
from dataclasses import dataclass

import lightning
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

from pipeline.engine import flag_name, quiet_libraries
from pipeline.errors import USER_ERRORS, UserError


@dataclass(frozen=True)
class Stage:
    module: str
    function: str
    config: str
    help: str
    trainer: bool = True  # takes --trainer.* flags


STAGES = {
    "pretrain": Stage("pipeline.stages.pretrain", "pretrain", "PretrainConfig",
                      "train the embedded tiny text-to-image world into checkpoints/"),
    "calibrate": Stage("pipeline.stages.calibrate", "calibrate", "CalibrateConfig",
                       "calibrate a quantized UNet (naive | qdiff | ptqd, PCR options)"),
    "q2b": Stage("pipeline.stages.q2b", "q2b", "Q2BConfig",
                 "train QLIP's Q2B (quality -> layer- and step-wise bits) on a calibrated state"),
    "generate": Stage("pipeline.stages.generate", "generate", "GenerateConfig",
                      "generate images with the FP or a quantized UNet"),
    "evaluate": Stage("pipeline.stages.evaluate", "evaluate", "EvaluateConfig",
                      "QDiffBench: FID/sFID to FP, CLIP score, PSNR/SSIM, FAB, BitOPs, time"),
    "bitops": Stage("pipeline.stages.bitops", "bitops", "BitopsConfig",
                    "print BitOPs / FAB / size of a model at given bits (meta device)", trainer=False),
    "score": Stage("pipeline.stages.score", "score", "ScoreConfig",
                   "FP images of prompt splits + Inception features + GIQA scores (T2Q targets)"),
    "t2q": Stage("pipeline.stages.t2q", "t2q", "T2QConfig",
                 "train QLIP's T2Q (text -> predicted quality) on a scored set, or --predict"),
    "policy": Stage("pipeline.stages.policy", "policy", "PolicyConfig",
                    "a static control of QLIP at equal bits (uniform or random bits) as a quantized state",
                    trainer=False),
    "export": Stage("pipeline.stages.export", "export", "ExportConfig",
                    "export a calibrated state as a deployable integer UNet (packed weights, int8 kernels)",
                    trainer=False),
    "sensitivity": Stage("pipeline.stages.sensitivity", "sensitivity", "SensitivityConfig",
                         "MixDQ's per-layer sensitivity (one layer quantized, SSIM and SQNR to FP)"),
    "mixdq": Stage("pipeline.stages.mixdq", "mixdq", "MixDQConfig",
                   "MixDQ's bit allocation (integer program) from a sensitivity record: a mixed-precision state"),
    "demo": Stage("pipeline.demo", "demo", "DemoConfig",
                  "the README main job: quantize the default model, sample, report"),
}
TRAINER_SKIP = {"callbacks", "logger", "plugins", "profiler", "strategy", "model_registry"}


def field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field (its help text), base classes first."""
    docs = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            body = ast.parse(inspect.getsource(klass)).body[0].body
        except (OSError, TypeError, IndexError):
            continue
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def add_config_arguments(parser: ArgumentParser, cls) -> None:
    """One `--flag-name` per field of dataclass `cls` (dest: the field name)."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument(flag_name(f.name), dest=f.name, type=hints[f.name], default=default,
                            help=docs.get(f.name, ""))


def config_class(stage: Stage):
    return getattr(importlib.import_module(stage.module), stage.config)


def build_parser(stages=None) -> ArgumentParser:
    parser = ArgumentParser(prog="python -m pipeline.fit", description=__doc__.split("\n\n")[0], exit_on_error=False)
    parser.add_argument("--debug", type=bool, default=False, help="show tracebacks of user errors")
    sub = parser.add_subcommands(required=True, dest="stage")
    for name, stage in STAGES.items():
        sub_parser = ArgumentParser(description=stage.help, exit_on_error=False)
        if stages is None or name in stages:  # the others stay placeholders: --help lists them cheaply
            sub_parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these flags")
            add_config_arguments(sub_parser, config_class(stage))
            if stage.trainer:
                sub_parser.add_class_arguments(lightning.Trainer, "trainer", skip=TRAINER_SKIP,
                                               sub_configs=False)
                sub_parser.add_argument("--trainer.strategy", type=str, default="auto",
                                        help="auto | ddp | ddp_spawn | ...")
        sub.add_subcommand(name, sub_parser, help=stage.help)
    return parser


# jsonargparse's type names in a user's words
TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
              "list": "a list such as [a, b]", "NoneType": "null (the default)"}
TYPE_ERROR = re.compile(r"(--[\w.-]+): (?:Expected a <class '(\w+)'>\. Got value: (.*)|Does not validate against "
                        r"any of the Union subtypes Subtypes: \[((?:<class '\w+'>(?:, )?)+)\] .*Given value: (.*))$")


def plain_type_error(message: str) -> str:
    """'--steps: expected an integer or null (the default), got 2.5' for jsonargparse's type errors (a Union's
    lists every subtype's error); other messages unchanged."""
    m = TYPE_ERROR.match(message)
    kinds = [] if m is None else [m.group(2)] if m.group(2) else re.findall(r"'(\w+)'", m.group(4))
    if not kinds or any(k not in TYPE_WORDS for k in kinds):
        return message
    flag, got = m.group(1), m.group(3) if m.group(2) else m.group(5)
    words = " or ".join(TYPE_WORDS[k] for k in kinds)
    if got.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):  # YAML reads these as strings
        words = words.replace("a number", "a finite number")
    return f"{flag}: expected {words}, got {got}"


def main(argv=None):
    """Parse `argv` and run the stage; errors propagate (see `cli` for the one-line form)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    argv = [a for a in argv if a not in ("--debug", "--debug=true")]
    # Import only the chosen stage: SD-sized stages should not pay for the others.
    chosen = next((a for a in argv if a in STAGES), None)
    parser = build_parser(stages=set() if chosen is None else {chosen})
    try:
        ns = parser.parse_args(argv)
    except ArgumentError as e:
        hint = f"python -m pipeline.fit {chosen} --help" if chosen else "python -m pipeline.fit --help"
        message = re.sub(r'Parser key "([\w.]+)"', lambda m: "--" + m.group(1).replace("_", "-")
                         if "." not in m.group(1) else "--" + m.group(1), " ".join(str(e).split()))
        raise UserError(f"{plain_type_error(message)}; see `{hint}`") from None
    stage = STAGES[ns.stage]
    args = vars(getattr(ns, ns.stage)).copy()
    args.pop("config", None)
    trainer = args.pop("trainer", None)
    cfg = config_class(stage)(**args)
    quiet_libraries()
    fn = getattr(importlib.import_module(stage.module), stage.function)
    if stage.trainer:
        return fn(cfg, trainer={k: v for k, v in vars(trainer).items() if v is not None})
    return fn(cfg)


def cli(argv=None) -> None:
    """`main` for people: a user error is one line on stderr and exit status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or "--debug=true" in argv or os.environ.get("QLIP_DEBUG", "") not in ("", "0")
    try:
        main(argv)
    except USER_ERRORS as e:
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}  (--debug shows the traceback)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
