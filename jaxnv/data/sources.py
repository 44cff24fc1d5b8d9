"""In-memory data sets: the `Dataset` that `train` reads, and `.npz` files of arrays."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

Arrays = dict[str, np.ndarray]


@dataclasses.dataclass
class Dataset:
    """Train and eval arrays (`x`, `y`) plus what a model needs to know about them."""

    train: Arrays
    eval: Arrays
    in_features: int
    out_features: int
    task: str  # regression | binary | multiclass
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def from_npz(path: str) -> Dataset:
    """Arrays from a `.npz` with `x_train`, `y_train`, `x_eval`, `y_eval` (no pickle)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.path={path!r} is not a file: give a .npz with x_train, ...")
    with np.load(path, allow_pickle=False) as f:
        missing = {"x_train", "y_train", "x_eval", "y_eval"} - set(f.files)
        if missing:
            raise ValueError(f"{path} lacks arrays {sorted(missing)}: save them with np.savez")
        try:
            tr = {"x": f["x_train"], "y": f["y_train"]}
            ev = {"x": f["x_eval"], "y": f["y_eval"]}
        except ValueError:  # numpy refuses object arrays without pickle
            raise ValueError(
                f"{path} holds object arrays, which need pickle (refused for safety): save "
                "numeric arrays (np.asarray(x, dtype=np.float32)) instead"
            ) from None
    for split, arrays in (("train", tr), ("eval", ev)):
        if len(arrays["x"]) != len(arrays["y"]):
            raise ValueError(
                f"{path}: x_{split} has {len(arrays['x'])} rows but y_{split} has "
                f"{len(arrays['y'])}: give both the same number of examples"
            )
    task = "multiclass" if np.issubdtype(tr["y"].dtype, np.integer) else "regression"
    out = int(tr["y"].max()) + 1 if task == "multiclass" else int(np.prod(tr["y"].shape[1:]))
    return Dataset(tr, ev, int(np.prod(tr["x"].shape[1:])), out, task)
