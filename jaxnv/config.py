"""Typed experiment configs: dataclass sections, dotted `key=value` overrides, JSON round trips.

    cfg = Config()
    cfg = apply_overrides(cfg, ["train.steps=200", "optimizer.learning_rate=3e-3"])

Every override is type-checked against the field's annotation; an unknown key is refused with a
"did you mean". Sections: `model`, `data`, `optimizer`, `precision`, `train`, `mesh`,
`checkpoint`, `logging`.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

from jaxnv.core.optim import OptimizerConfig
from jaxnv.parallel.mesh import MeshConfig


@dataclasses.dataclass
class ModelConfig:
    """Which model to build and its shape; `features` are hidden widths (MLP)."""

    name: str = "linear"  # linear | mlp | cnn | lstm | transformer
    features: tuple[int, ...] = ()  # mlp: hidden widths; cnn: stage widths; lstm: layer widths
    activation: str = "relu"
    dropout: float = 0.0
    use_bias: bool = True
    norm: str = "batch"  # cnn: batch | group | none
    blocks_per_stage: int = 1  # cnn
    vocab_size: int = 0  # transformer / token lstm; 0: from the data
    num_layers: int = 4  # transformer
    num_heads: int = 4  # transformer
    embed_dim: int = 256  # transformer (and the token embedding of an lstm)
    mlp_dim: int = 0  # transformer; 0: the model's default
    max_seq_len: int = 0  # transformer; 0: data.seq_len
    tie_embeddings: bool = True  # transformer
    remat: str = "none"  # transformer: none | full | dots


@dataclasses.dataclass
class DataConfig:
    """Which built-in data set to use and how to generate or split it."""

    name: str = "house_prices"  # house_prices|classification|regression|digits|text|adding|npz
    num_train: int = 1000
    num_eval: int = 200
    noise: float = 0.1
    seed: int = 0  # generation seed; the shuffle seed is train.seed
    path: str = ""  # for name=npz: a .npz file with x_train, y_train, x_eval, y_eval
    seq_len: int = 128  # for sequence data (text, adding)


@dataclasses.dataclass
class PrecisionConfig:
    """Dtype policy (`fp32|bf16|fp16|auto|<jmp string>`) and loss scaling."""

    policy: str = "fp32"
    loss_scale: str = "auto"  # auto (from the policy) | none | static | dynamic
    init_scale: float = 2.0**15
    growth_interval: int = 2000


@dataclasses.dataclass
class TrainConfig:
    """The loop: steps, global batch, seed, evaluation cadence, loss."""

    steps: int = 500
    batch_size: int = 32  # global batch
    seed: int = 0
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batch_size: int = 256
    micro_batches: int = 1  # gradient accumulation inside one step
    max_device_batch: int = 0  # >0: more micro-batches when a device's share would exceed this
    loss: str = "mse"  # mse | bce | softmax_ce
    on_nonfinite: str = "skip"  # skip | stop | rollback (see jaxnv/train/nonfinite.py)
    best_metric: str = "loss"  # eval metric tracked for the best step ("" to disable)
    best_mode: str = "min"  # min | max


@dataclasses.dataclass
class CheckpointConfig:
    """Orbax checkpoints under `workdir/checkpoints`: every N steps and at the end."""

    every: int = 0  # 0: only at the end of training
    keep: int = 3  # newest checkpoints kept
    keep_best: int = 0  # also keep the K best by train.best_metric (each evaluation then saves)


@dataclasses.dataclass
class LoggingConfig:
    """Where and how often metrics are written."""

    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True
    mfu: bool = True  # report model FLOP utilisation (measures the device's matmul peak once)
    peak_flops: float = 0.0  # declared device peak in FLOP/s; 0: measure
    profile_steps: str = ""  # "a:b": a jax.profiler trace of steps a..b-1 into tensorboard/


@dataclasses.dataclass
class Config:
    """A whole experiment."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    precision: PrecisionConfig = dataclasses.field(default_factory=PrecisionConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the fix."""


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def all_keys(cfg: Config) -> list[str]:
    """Every dotted key of a config, e.g. `train.steps`."""
    return [
        f"{section}.{name}"
        for section, sec_type in _fields(type(cfg)).items()
        for name in _fields(sec_type)
    ]


def _type_name(tp) -> str:
    if typing.get_origin(tp) is tuple:
        return f"a comma-separated list of {typing.get_args(tp)[0].__name__}"
    return tp.__name__


def parse_value(key: str, text: str, tp) -> Any:
    """Parse `text` as the annotated type `tp` of `key`; one-line ConfigError otherwise."""
    text = text.strip()
    try:
        if tp is bool:
            low = text.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
        if typing.get_origin(tp) is tuple:
            (elem,) = typing.get_args(tp)[:1]
            body = text.strip("()[] ")
            return tuple(elem(p) for p in body.split(",") if p.strip()) if body else ()
    except ValueError:
        pass
    raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {text!r}")


def _check_type(key: str, value: Any, tp) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(tp) is tuple and isinstance(value, list | tuple):
        elem = typing.get_args(tp)[0]
        if all(isinstance(v, elem) and not isinstance(v, bool) for v in value):
            return tuple(value)
    elif (
        isinstance(tp, type)
        and isinstance(value, tp)
        and (tp is bool or not isinstance(value, bool))
    ):
        return value
    raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")


def _unknown_key(key: str, cfg: Config) -> ConfigError:
    keys = all_keys(cfg)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:  # try matching the last part only: `steps` -> `train.steps`
        tail = {k.split(".", 1)[1]: k for k in keys}
        close = [tail[m] for m in difflib.get_close_matches(key.split(".")[-1], list(tail), n=1)]
    hint = (
        f"did you mean '{close[0]}'?"
        if close
        else "run `jaxnv train NAME --print-config` to list the keys"
    )
    return ConfigError(f"unknown config key '{key}': {hint}")


def set_value(cfg: Config, key: str, value: Any) -> Config:
    """A copy of `cfg` with dotted `key` set to `value` (type-checked; strings are parsed)."""
    section, _, name = key.partition(".")
    sections = _fields(type(cfg))
    if section not in sections or name not in _fields(sections[section]):
        raise _unknown_key(key, cfg)
    tp = _fields(sections[section])[name]
    value = parse_value(key, value, tp) if isinstance(value, str) else _check_type(key, value, tp)
    sub = dataclasses.replace(getattr(cfg, section), **{name: value})
    return dataclasses.replace(cfg, **{section: sub})


def apply_overrides(cfg: Config, overrides: typing.Iterable[str]) -> Config:
    """Apply `key=value` strings in order, e.g. `["train.steps=100"]`."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not KEY=VALUE: write it like train.steps=100")
        cfg = set_value(cfg, key.strip(), value)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """A JSON-ready nested dict."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any], base: Config | None = None) -> Config:
    """Rebuild a Config from `to_dict` output; unknown keys and wrong types are errors."""
    cfg = base or Config()
    for section, values in data.items():
        if section not in _fields(type(cfg)):
            raise _unknown_key(section, cfg)
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping of keys to values")
        for name, value in values.items():
            cfg = set_value(cfg, f"{section}.{name}", value)
    return cfg


def validate(cfg: Config) -> Config:
    """Check cross-field constraints that a single override cannot; returns cfg."""
    t = cfg.train
    for key, value in [
        ("train.steps", t.steps),
        ("train.batch_size", t.batch_size),
        ("train.micro_batches", t.micro_batches),
        ("train.eval_batch_size", t.eval_batch_size),
        ("logging.log_every", cfg.logging.log_every),
    ]:
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if t.batch_size % t.micro_batches:
        raise ConfigError(
            f"train.batch_size={t.batch_size} does not divide into train.micro_batches="
            f"{t.micro_batches}: choose a batch size that is a multiple of it"
        )
    if cfg.checkpoint.keep_best < 0:
        raise ConfigError(f"checkpoint.keep_best must be >= 0, got {cfg.checkpoint.keep_best}")
    if cfg.checkpoint.keep_best and not t.best_metric:
        raise ConfigError("checkpoint.keep_best needs train.best_metric (e.g. loss)")
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep < 1:
        raise ConfigError("checkpoint.every must be >= 0 (0: at the end) and checkpoint.keep >= 1")
    if t.max_device_batch < 0:
        raise ConfigError(
            f"train.max_device_batch must be >= 0 (0: no limit), got {t.max_device_batch}"
        )
    if t.on_nonfinite not in ("skip", "stop", "rollback"):
        raise ConfigError(
            f"train.on_nonfinite must be skip, stop or rollback, got {t.on_nonfinite!r}"
        )
    if t.best_mode not in ("min", "max"):
        raise ConfigError(f"train.best_mode must be min or max, got {t.best_mode!r}")
    if t.eval_every < 0:
        raise ConfigError(f"train.eval_every must be >= 0 (0: only at the end), got {t.eval_every}")
    return cfg
