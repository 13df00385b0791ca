"""The command line: `python -m pipeline.fit <stage> [--config cfg.yaml] [--trainer.* flags] [stage flags]`.

Every stage is a module in `pipeline/stages/` exposing `add_arguments(parser)`
(its own flags) and `run(cfg)`. Common flags (model, run directory, seed,
overwrite, YAML config, Lightning trainer flags) are added here, once, so all
stages read the same way. `--print_config` dumps a YAML that `--config` takes.
"""
from __future__ import annotations

import importlib
import sys

from jsonargparse import ActionConfigFile, ArgumentParser

# stage name -> (module, one-line help). Modules are imported only when used.
STAGES = {
    "pretrain": ("pipeline.stages.pretrain", "train the embedded tiny text-to-image world into checkpoints/"),
    "calibrate": ("pipeline.stages.calibrate", "calibrate a quantized UNet (naive | qdiff | ptqd, PCR options)"),
    "q2b": ("pipeline.stages.q2b", "train QLIP's Q2B (quality -> layer- and step-wise bits) on a calibrated state"),
    "generate": ("pipeline.stages.generate", "generate images with the FP or a quantized UNet"),
    "evaluate": ("pipeline.stages.evaluate", "QDiffBench: FID/sFID to FP, CLIP score, PSNR/SSIM, FAB, BitOPs, time"),
    "bitops": ("pipeline.stages.bitops", "print BitOPs / FAB / size of a model at given bits (meta device)"),
    "score": ("pipeline.stages.score", "FP images of prompt splits + Inception features + GIQA scores (T2Q targets)"),
    "t2q": ("pipeline.stages.t2q", "train QLIP's T2Q (text -> predicted quality) on a scored set, or --predict"),
    "demo": ("pipeline.stages.demo", "the README main job: quantize the default model, sample, report"),
}

TRAINER_SKIP = {"callbacks", "logger", "plugins", "profiler", "strategy", "model_registry"}


def add_common_arguments(parser: ArgumentParser, trainer: bool = True) -> None:
    from pipeline.models import default_model

    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these flags")
    parser.add_argument("--model", type=str, default=default_model(),
                        help="'embedded', 'tiny-random', a local diffusers folder, or a cached hub id")
    parser.add_argument("--allow-download", type=bool, default=False, help="let diffusers fetch a hub id")
    parser.add_argument("--run-dir", type=str, default="runs/default", help="where this stage writes its artifacts")
    parser.add_argument("--overwrite", type=bool, default=False, help="replace results already in --run-dir")
    parser.add_argument("--seed", type=int, default=0)
    if trainer:
        import lightning

        parser.add_class_arguments(lightning.Trainer, "trainer", skip=TRAINER_SKIP, sub_configs=False)
        parser.add_argument("--trainer.strategy", type=str, default="auto", help="auto | ddp | ddp_spawn | ...")


def build_parser(stages=None) -> ArgumentParser:
    parser = ArgumentParser(prog="python -m pipeline.fit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subcommands(required=True, dest="stage")
    for name, (module, help_) in STAGES.items():
        if stages is not None and name not in stages:
            sub_parser = ArgumentParser()  # a placeholder keeps --help listing every stage cheaply
        else:
            sub_parser = ArgumentParser(description=help_)
            mod = importlib.import_module(module)
            add_common_arguments(sub_parser, trainer=getattr(mod, "USES_TRAINER", True))
            mod.add_arguments(sub_parser)
        sub.add_subcommand(name, sub_parser, help=help_)
    return parser


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the chosen stage: SD-sized stages should not pay for the others.
    chosen = next((a for a in argv if a in STAGES), None)
    parser = build_parser(stages=set() if chosen is None else {chosen})
    cfg = parser.parse_args(argv)
    stage = cfg.stage
    module = importlib.import_module(STAGES[stage][0])
    module.run(getattr(cfg, stage))


if __name__ == "__main__":
    main()
