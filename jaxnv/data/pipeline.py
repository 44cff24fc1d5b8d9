"""Built-in data sets (no download) and step-indexed batching on grain.

    ds = make_dataset(DataConfig(name="house_prices"))
    batches = StepBatches(ds.train, batch_size=32, seed=0)
    batch = batches[step]          # a pure function of (data, seed, step)

The batch for step `s` depends only on the data, the seed and `s` (shuffled per epoch), so a
resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import threading
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np

from jaxnv.config import DataConfig

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


# House prices: raw features, their population mean / std, and the generating weights.
HOUSE_FEATURES = ("area_m2", "rooms", "age_years", "distance_km")
HOUSE_WEIGHTS = np.array([1.5, 10.0, -0.8, -3.0])  # price (k$) per unit of each feature
HOUSE_BIAS = 50.0
_HOUSE_LOW = np.array([40.0, 1.0, 0.0, 0.0])
_HOUSE_HIGH = np.array([250.0, 6.0, 80.0, 30.0])


def _house_population():
    mean = (_HOUSE_LOW + _HOUSE_HIGH) / 2
    std = (_HOUSE_HIGH - _HOUSE_LOW) / np.sqrt(12)
    std[1] = np.sqrt((6**2 - 1) / 12)  # rooms: discrete uniform on 1..6
    price_mean = HOUSE_BIAS + HOUSE_WEIGHTS @ mean
    price_std = float(np.sqrt(np.sum((HOUSE_WEIGHTS * std) ** 2)))
    return mean, std, price_mean, price_std


def house_prices(num_train: int, num_eval: int, noise: float, seed: int) -> Dataset:
    """Synthetic house prices from known weights plus noise, standardized.

    `x` is standardized with the population mean/std; `y = (price - mean) / std` with Gaussian
    noise of std `noise` (in those units). `info["weights"]` are the generating weights in the
    standardized space, `info["raw_weights"]` in k$ per unit.
    """
    rng = np.random.default_rng(seed)
    n = num_train + num_eval
    raw = rng.uniform(_HOUSE_LOW, _HOUSE_HIGH, size=(n, 4))
    raw[:, 1] = rng.integers(1, 7, size=n)
    mean, std, price_mean, price_std = _house_population()
    price = HOUSE_BIAS + raw @ HOUSE_WEIGHTS + rng.normal(0, noise * price_std, size=n)
    x = ((raw - mean) / std).astype(np.float32)
    y = ((price - price_mean) / price_std).astype(np.float32)[:, None]
    info = {
        "features": HOUSE_FEATURES,
        "weights": HOUSE_WEIGHTS * std / price_std,
        "bias": 0.0,
        "raw_weights": HOUSE_WEIGHTS,
        "raw_bias": HOUSE_BIAS,
        "feature_mean": mean,
        "feature_std": std,
        "price_mean": price_mean,
        "price_std": price_std,
    }
    return _split(x, y, num_train, 4, 1, "regression", info)


def two_moons(num_train: int, num_eval: int, noise: float, seed: int) -> Dataset:
    """Two interleaving half circles (labels 0/1 as float `(N, 1)`), Gaussian noise `noise`."""
    rng = np.random.default_rng(seed)
    n = num_train + num_eval
    label = rng.integers(0, 2, size=n)
    angle = rng.uniform(0, np.pi, size=n)
    x = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    x[label == 1] = np.stack([1 - np.cos(angle), 0.5 - np.sin(angle)], axis=1)[label == 1]
    x = x + rng.normal(0, noise, size=x.shape)
    x = (x - np.array([0.5, 0.25])) / np.array([0.85, 0.5])  # roughly standardized
    return _split(
        x.astype(np.float32), label[:, None].astype(np.float32), num_train, 2, 1, "binary", {}
    )


def teacher_regression(num_train: int, num_eval: int, noise: float, seed: int) -> Dataset:
    """x ~ N(0, 1)^10, y from a random 10 -> 5 -> 1 ReLU teacher, unit variance, plus noise."""
    rng = np.random.default_rng(seed)
    n = num_train + num_eval
    x = rng.normal(size=(n, 10))
    w1, b1 = rng.normal(size=(10, 5)) / np.sqrt(10), rng.normal(size=5) * 0.1
    w2 = rng.normal(size=(5, 1)) / np.sqrt(5)
    y = np.maximum(x @ w1 + b1, 0) @ w2
    y = (y - y.mean()) / y.std() + rng.normal(0, noise, size=y.shape)
    return _split(x.astype(np.float32), y.astype(np.float32), num_train, 10, 1, "regression", {})


def digits(num_eval: int = 360, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits: images `(N, 8, 8, 1)` in [0, 1], labels int32.

    The split is fixed (a permutation from `seed`; the last `num_eval` images are the test set),
    so results are comparable across runs. Needs the `digits` extra (scikit-learn).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "data.name=digits needs scikit-learn: pip install -e '.[digits]'"
        ) from None
    bunch = load_digits()
    order = np.random.default_rng(seed).permutation(len(bunch.target))
    x = (bunch.images[order, :, :, None] / 16.0).astype(np.float32)
    y = bunch.target[order].astype(np.int32)
    return _split(x, y, len(y) - num_eval, 1, 10, "multiclass", {"image_shape": (8, 8, 1)})


def text_corpus() -> str:
    """The text of Python's bundled help topics (`pydoc_data.topics`), in a fixed order."""
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics))


def char_text(seq_len: int, eval_fraction: float = 0.1) -> Dataset:
    """Character language modelling on `text_corpus()`: `x` (N, T) tokens, `y` = x shifted by one.

    The vocabulary is the corpus's sorted characters. Train windows start every `seq_len // 2`
    characters of the first 90 % of the text; validation windows tile the last 10 %.
    `info` has `vocab` (a string), `unigram_entropy` (nats per character) and the corpus length.
    """
    text = text_corpus()
    vocab = "".join(sorted(set(text)))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = np.fromiter((lookup[c] for c in text), np.int32, len(text))
    cut = int(len(ids) * (1 - eval_fraction))

    def windows(part, stride):
        starts = np.arange(0, len(part) - seq_len - 1, stride)
        idx = starts[:, None] + np.arange(seq_len + 1)[None, :]  # (N, T + 1)
        w = part[idx]
        return {"x": w[:, :-1], "y": w[:, 1:]}

    counts = np.bincount(ids, minlength=len(vocab)) / len(ids)
    entropy = float(-(counts * np.log(counts)).sum())
    info = {"vocab": vocab, "unigram_entropy": entropy, "chars": len(ids)}
    train, ev = windows(ids[:cut], max(1, seq_len // 2)), windows(ids[cut:], seq_len)
    return Dataset(train, ev, seq_len, len(vocab), "lm", info)


def adding_problem(num_train: int, num_eval: int, seq_len: int, seed: int) -> Dataset:
    """The adding problem (Hochreiter & Schmidhuber, 1997): sum the two marked values.

    `x` is (N, T, 2): a value in [0, 1) and a 0/1 marker, with one marker in each half of the
    sequence; `y` (N, 1) is the sum of the two marked values. Predicting the mean (1.0) scores an
    mse of 1/6; a model must remember values across up to T steps to do better.
    """
    rng = np.random.default_rng(seed)
    n, half = num_train + num_eval, seq_len // 2
    values = rng.uniform(0, 1, size=(n, seq_len))
    marks = np.zeros((n, seq_len))
    first, second = rng.integers(0, half, size=n), rng.integers(half, seq_len, size=n)
    marks[np.arange(n), first] = 1.0
    marks[np.arange(n), second] = 1.0
    x = np.stack([values, marks], axis=-1).astype(np.float32)
    y = (values * marks).sum(axis=1, keepdims=True).astype(np.float32)
    return _split(x, y, num_train, 2, 1, "regression", {"baseline_mse": 1.0 / 6.0})


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


def _split(x, y, num_train, in_features, out_features, task, info) -> Dataset:
    train = {"x": x[:num_train], "y": y[:num_train]}
    ev = {"x": x[num_train:], "y": y[num_train:]}
    return Dataset(train, ev, in_features, out_features, task, info)


DATASETS = {
    "house_prices": house_prices,
    "classification": two_moons,
    "regression": teacher_regression,
}
OTHER_DATASETS = ("digits", "text", "adding", "npz")


def make_dataset(cfg: DataConfig) -> Dataset:
    """The data set named by `cfg.name`."""
    if cfg.name == "npz":
        return from_npz(cfg.path)
    if cfg.name == "digits":
        return digits()
    if cfg.name == "text":
        return char_text(cfg.seq_len)
    if cfg.name == "adding":
        return adding_problem(cfg.num_train, cfg.num_eval, cfg.seq_len, cfg.seed)
    if cfg.name not in DATASETS:
        names = [*DATASETS, *OTHER_DATASETS]
        close = difflib.get_close_matches(cfg.name, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown data.name {cfg.name!r}: use one of {', '.join(names)}{hint}")
    if cfg.num_train < 1 or cfg.num_eval < 1:
        raise ValueError("data.num_train and data.num_eval must be >= 1")
    return DATASETS[cfg.name](cfg.num_train, cfg.num_eval, cfg.noise, cfg.seed)


class StepBatches:
    """Random-access training batches: `batches[step]` is the global batch for `step`.

    Examples are shuffled per epoch from (`seed`, epoch) with numpy's generator (random access to
    grain's per-element shuffle cost 24 us an example here, 6 ms for a batch of 256); a batch may
    straddle two epochs. Background threads (grain) prepare batches ahead of the loop. With
    `process_count > 1` each process materialises only its contiguous slice of the global batch
    (`local(step)`), and the slices of all processes concatenate to `batches[step]`.
    """

    # `iterate` prepares runs of consecutive steps together when batches are small: grain's
    # per-element cost (~45 us) and jax.device_put's per-call cost (~35 us an array) are paid
    # once a chunk instead of once a step (on the reference 2-core CPU, host CPU time per batch
    # of 256 fell from ~95 us to ~30 us). A chunk holds at most this many steps and bytes.
    chunk_steps: int = 16
    chunk_bytes: int = 1 << 20

    def __init__(
        self,
        arrays: Arrays,
        batch_size: int,
        seed: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ):
        sizes = {k: len(v) for k, v in arrays.items()}
        n = next(iter(sizes.values()))
        if len(set(sizes.values())) != 1:
            raise ValueError(f"data arrays differ in length {sizes}: give every array N rows")
        if batch_size % process_count:
            raise ValueError(
                f"train.batch_size={batch_size} does not split over {process_count} processes: "
                "use a multiple of the process count"
            )
        self.arrays = arrays
        self.batch_size = batch_size
        self.seed, self.num_examples = seed, n
        self.process_index, self.process_count = process_index, process_count
        self._epochs: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # the prefetch threads share the permutation cache

    def _permutation(self, epoch: int) -> np.ndarray:
        """The example order of `epoch`: a pure function of (seed, epoch), cached."""
        perm = self._epochs.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            with self._lock:
                while len(self._epochs) >= 4:
                    self._epochs.pop(min(self._epochs))
                self._epochs[epoch] = perm
        return perm

    def _positions(self, begin: int, end: int) -> np.ndarray:
        """Example indices at positions `begin, ..., end - 1` of the endless shuffled stream."""
        n = self.num_examples
        parts = []
        for epoch in range(begin // n, (end - 1) // n + 1):  # one or two epochs per batch
            lo, hi = max(begin, epoch * n) - epoch * n, min(end, (epoch + 1) * n) - epoch * n
            parts.append(self._permutation(epoch)[lo:hi])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def indices(self, step: int) -> np.ndarray:
        """Example indices of the global batch for `step` (batch_size,)."""
        b = self.batch_size
        return self._positions(int(step) * b, (int(step) + 1) * b)

    def _gather(self, idx: np.ndarray) -> Arrays:
        return {k: np.take(v, idx, axis=0) for k, v in self.arrays.items()}

    def __getitem__(self, step: int) -> Arrays:
        return self._gather(self.indices(step))  # (batch_size, ...) global batch

    def local(self, step: int) -> Arrays:
        """This process's rows of the global batch for `step`."""
        return self._local_run(step, step + 1)[0]

    def _local_run(self, start: int, stop: int) -> list[Arrays]:
        """`[local(s) for s in range(start, stop)]`, gathered at once (one take per array)."""
        b, k = self.batch_size, stop - start
        idx = self._positions(start * b, stop * b)  # (k * batch_size,)
        per = b // self.process_count
        if self.process_count > 1:  # this process's rows of each step: (k, per) -> (k * per,)
            lo = self.process_index * per
            idx = idx.reshape(k, b)[:, lo : lo + per].reshape(-1)
        rows = self._gather(idx)  # (k * per, ...); each step's batch is a contiguous view
        return [{key: v[i * per : (i + 1) * per] for key, v in rows.items()} for i in range(k)]

    def _local_stack(self, start: int, stop: int) -> Arrays:
        """The batches of `_local_run(start, stop)` stacked on a last axis: `(per, ..., k)`."""
        b, k = self.batch_size, stop - start
        per = b // self.process_count
        idx = self._positions(start * b, stop * b).reshape(k, b)
        idx = idx[:, self.process_index * per : (self.process_index + 1) * per]
        return {
            key: np.moveaxis(np.take(v, idx.T, axis=0), 1, -1) for key, v in self.arrays.items()
        }

    def _steps_per_chunk(self) -> int:
        per = self.batch_size // self.process_count
        row = sum(v[:1].nbytes for v in self.arrays.values())
        return max(1, min(self.chunk_steps, self.chunk_bytes // max(1, per * row)))

    def iterate(self, start: int, stop: int, *, prefetch: int = 2, put=None) -> Iterator[Arrays]:
        """This process's batches for steps `start, ..., stop - 1`, prepared by `prefetch`
        background threads (grain) while the device runs earlier steps.

        `put` (e.g. a host-to-device copy) runs in those threads too. It must map a pytree of
        host arrays, batch axis first, to the same pytree placed (`jax.device_put`,
        `parallel.put_batch`); it may be given several batches at once (a list, or the batches
        stacked on a last axis, which the threads then split on the device), so that its
        per-call cost is shared.
        """
        if stop <= start:
            return iter(())
        k = min(self._steps_per_chunk(), stop - start)
        stacked = put is not None and k > 1 and jax.process_count() == 1

        def chunk(first: int) -> list:
            last = min(first + k, stop)
            if put is None:
                return self._local_run(first, last)
            if stacked and last - first == k:  # one copy per array, split on the device
                return _split_last_axis(put(self._local_stack(first, last)), k)
            return list(put(self._local_run(first, last)))

        chunks = grain.MapDataset.range(start, stop, k).map(chunk)
        if prefetch > 0:
            options = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=2 * prefetch)
            chunks = chunks.to_iter_dataset(options)
        return (batch for run in iter(chunks) for batch in run)


@functools.lru_cache(maxsize=32)
def _splitter(k: int, shardings: tuple) -> Any:
    """A compiled `leaves -> [[leaf[..., i] for leaf in leaves] for i in range(k)]`; each slice
    keeps its stack's sharding (the stacked axis is last, so no device gives up any rows)."""

    def split(leaves):
        return [[x[..., i] for x in leaves] for i in range(k)]

    return jax.jit(split, out_shardings=[list(shardings)] * k)


def _split_last_axis(tree, k: int) -> list:
    """`[tree[..., i] for i in range(k)]`, in one device computation for placed arrays."""
    leaves, treedef = jax.tree.flatten(tree)
    if all(isinstance(x, jax.Array) for x in leaves):
        parts = _splitter(k, tuple(x.sharding for x in leaves))(leaves)
    else:
        parts = [[x[..., i] for x in leaves] for i in range(k)]
    return [jax.tree.unflatten(treedef, p) for p in parts]


def eval_batches(arrays: Arrays, batch_size: int) -> Iterator[tuple[Arrays, int]]:
    """`(batch, n)` slices in order; the last may be partial (never dropped)."""
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in arrays.items()}
        yield batch, len(batch["x"]) if "x" in batch else len(next(iter(batch.values())))
