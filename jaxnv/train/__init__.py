"""The training loop (`loop`), its Python entry point (`fit`), hooks (`callbacks`) and what runs
beside it: writers, profiling and MFU, non-finite handling and the compilation cache."""

from jaxnv.train.callbacks import Callback, EarlyStopping, StepInfo
from jaxnv.train.evaluate import evaluate
from jaxnv.train.fit import fit
from jaxnv.train.loop import (
    Run,
    TrainResult,
    build,
    evaluate_workdir,
    micro_batches_for,
    train,
)

__all__ = [
    "Callback",
    "EarlyStopping",
    "Run",
    "StepInfo",
    "TrainResult",
    "build",
    "evaluate",
    "evaluate_workdir",
    "fit",
    "micro_batches_for",
    "train",
]
