"""Demo data sets that need no download: house prices, two moons, a teacher MLP, digits, text.

ds = make_dataset(DataConfig(name="house_prices"))
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

import numpy as np

from jaxnv.data.sources import Dataset, from_npz

if TYPE_CHECKING:  # the config is read by attribute; data imports nothing above it
    from jaxnv.config import DataConfig


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
        # how raw features become x and y becomes a price: an export compiles this in
        "preprocessing": {
            "input_mean": mean,
            "input_std": std,
            "output_mean": [price_mean],
            "output_std": [price_std],
        },
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
            "data.name=digits needs scikit-learn: pip install 'jaxnv[digits]' "
            "(in a checkout: pip install -e '.[digits]')"
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


def _split(x, y, num_train, in_features, out_features, task, info) -> Dataset:
    train = {"x": x[:num_train], "y": y[:num_train]}
    ev = {"x": x[num_train:], "y": y[num_train:]}
    return Dataset(train, ev, in_features, out_features, task, info)


DATASETS = {
    "house_prices": house_prices,
    "classification": two_moons,
    "regression": teacher_regression,
}
OTHER_DATASETS = ("digits", "text", "adding", "npz", "files")


def make_dataset(cfg: DataConfig) -> Dataset:
    """The data set named by `cfg.name`."""
    if cfg.name == "npz":
        return from_npz(cfg.path)
    if cfg.name == "files":
        raise ValueError("data.name=files batches itself: use jaxnv.data.text.files_dataset")
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
