"""The pipeline's stages as Python functions: the public API for notebooks,
benchmarks and scripts (the CLI `python -m pipeline.fit <stage>` calls the same).

    from pipeline.api import CalibrateConfig, calibrate
    state = calibrate(CalibrateConfig(method="qdiff", w_bits=4, run_dir="runs/x"), trainer={"devices": 1})

Every function takes its config dataclass (and, where it trains or predicts,
`trainer`: Lightning Trainer arguments) and returns the folder it wrote
(bitops: the table; t2q --predict: the predictions; pretrain: the metrics).
Benchmarks and scripts import stages from here only, never from
`pipeline.stages.*`, whose modules are the CLI's wiring."""
from pipeline.demo import DemoConfig, demo
from pipeline.stages.bitops import BitopsConfig, bitops
from pipeline.stages.calibrate import CalibrateConfig, calibrate
from pipeline.stages.evaluate import EvaluateConfig, evaluate
from pipeline.stages.export import ExportConfig, export
from pipeline.stages.generate import GenerateConfig, generate
from pipeline.stages.mixdq import MixDQConfig, mixdq
from pipeline.stages.policy import PolicyConfig, policy
from pipeline.stages.pretrain import PretrainConfig, pretrain
from pipeline.stages.q2b import Q2BConfig, q2b
from pipeline.stages.score import ScoreConfig, score
from pipeline.stages.sensitivity import SensitivityConfig, sensitivity
from pipeline.stages.t2q import T2QConfig, t2q

__all__ = ["BitopsConfig", "CalibrateConfig", "DemoConfig", "EvaluateConfig", "ExportConfig", "GenerateConfig",
           "MixDQConfig", "PolicyConfig", "PretrainConfig", "Q2BConfig", "ScoreConfig", "SensitivityConfig",
           "T2QConfig", "bitops", "calibrate", "demo", "evaluate", "export", "generate", "mixdq", "policy", "pretrain",
           "q2b", "score", "sensitivity", "t2q"]
