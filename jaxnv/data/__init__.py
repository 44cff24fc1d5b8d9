"""Data: in-memory and file sources, the demo data sets, and step-indexed batching on grain.

Text corpora (docs/data.md) load on first use: `files_dataset` (`data.name=files`),
`load_tokenizer`; `jaxnv.data.prepare.prepare` is `jaxnv data prepare`.
"""

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

_LAZY = {  # modules that import pyarrow, tokenizers and array_record: loaded when first asked for
    "files_dataset": "jaxnv.data.text",
    "eval_rows": "jaxnv.data.text",
    "load_tokenizer": "jaxnv.data.tokenizers",
    "load_saved": "jaxnv.data.tokenizers",
    "Tokenizer": "jaxnv.data.tokenizers",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxnv.data' has no attribute {name!r}")
