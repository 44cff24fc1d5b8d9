"""The training loop (`loop`) and what runs beside it: writers, profiling and MFU, non-finite
handling and the compilation cache."""

from jaxnv.train.loop import (
    Callback,
    Run,
    TrainResult,
    build,
    evaluate,
    evaluate_workdir,
    micro_batches_for,
    train,
)

__all__ = [
    "Callback",
    "Run",
    "TrainResult",
    "build",
    "evaluate",
    "evaluate_workdir",
    "micro_batches_for",
    "train",
]
