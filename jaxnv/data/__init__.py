"""Data: in-memory and file sources, the demo data sets, and step-indexed batching on grain."""

from jaxnv.data.builtin import (
    DATASETS,
    HOUSE_BIAS,
    HOUSE_FEATURES,
    HOUSE_WEIGHTS,
    adding_problem,
    char_text,
    digits,
    house_prices,
    make_dataset,
    teacher_regression,
    text_corpus,
    two_moons,
)
from jaxnv.data.pipeline import StepBatches, eval_batches
from jaxnv.data.sources import Arrays, Dataset, from_npz

__all__ = [
    "DATASETS",
    "HOUSE_BIAS",
    "HOUSE_FEATURES",
    "HOUSE_WEIGHTS",
    "Arrays",
    "Dataset",
    "StepBatches",
    "adding_problem",
    "char_text",
    "digits",
    "eval_batches",
    "from_npz",
    "house_prices",
    "make_dataset",
    "teacher_regression",
    "text_corpus",
    "two_moons",
]
