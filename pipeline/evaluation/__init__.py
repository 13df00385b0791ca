"""QDiffBench evaluation (PCR's benchmark, docs/evaluation.md#metrics): FP and quantized
models on in-domain and prompt-generalization splits with identical seeds.
`python -m pipeline.fit evaluate`; see docs/evaluation.md."""
from pipeline.evaluation.methods import (
    METHOD_KINDS,
    EvalMethod,
    FullPrecision,
    StaticQuantState,
    method_from_state,
    register_method,
)
from pipeline.evaluation.reference import FPReference, PromptMismatchError
from pipeline.evaluation.runner import run_evaluation, validate
from pipeline.evaluation.settings import EvalSettings
from pipeline.evaluation.splits import Split, global_batches, load_split

__all__ = ["METHOD_KINDS", "EvalMethod", "EvalSettings", "FPReference", "FullPrecision", "PromptMismatchError",
           "Split", "StaticQuantState", "global_batches", "load_split", "method_from_state", "register_method",
           "run_evaluation", "validate"]
