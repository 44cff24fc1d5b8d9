"""Typed experiment configs: dataclass sections, dotted `key=value` overrides, JSON round trips.

    cfg = Config()
    cfg = apply_overrides(cfg, ["train.steps=200", "optimizer.learning_rate=3e-3"])

Every override is type-checked against the field's annotation; an unknown key is refused with a
"did you mean". Sections: `model`, `data`, `optimizer`, `precision`, `train`, `mesh`,
`checkpoint`, `logging`.

The `model` section is a tagged union: `model.name` picks one dataclass per model family
(`LinearConfig`, `MLPConfig`, `CNNConfig`, `LSTMConfig`, `TransformerConfig`, registered in
`MODEL_CONFIGS`), which holds only that model's fields. `ModelConfig(name="cnn", ...)` builds the
family's dataclass, and the override `model.name=cnn` switches the section to `CNNConfig()`'s
defaults before the other overrides apply.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

from jaxnv.config.sections import (  # noqa: F401  (the sections are part of this module's API)
    MODEL_CONFIGS,
    CheckpointConfig,
    CNNConfig,
    Config,
    ConfigError,
    DataConfig,
    LinearConfig,
    LoggingConfig,
    LoRAConfig,
    LSTMConfig,
    MLPConfig,
    ModelConfig,
    PrecisionConfig,
    TrainConfig,
    TransformerConfig,
    _unknown_model_key,
    model_config_class,
)
from jaxnv.core.optim import OptimizerConfig  # noqa: F401  (config_lib.OptimizerConfig)
from jaxnv.parallel.mesh import MeshConfig  # noqa: F401  (config_lib.MeshConfig)


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _sections(cfg: Config) -> dict[str, Any]:
    """Each section's name and current value (the `model` section's class is the chosen one)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def all_keys(cfg: Config) -> list[str]:
    """Every dotted key of a config, e.g. `train.steps`; `model.*` are the chosen model's."""
    return [
        f"{section}.{name}"
        for section, value in _sections(cfg).items()
        for name in _fields(type(value))
    ]


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp) -> str:
    if typing.get_origin(tp) is tuple:
        return f"a comma-separated list of {typing.get_args(tp)[0].__name__}"
    if _is_union(tp):
        return " or ".join(t.__name__ for t in typing.get_args(tp))
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
        if _is_union(tp):  # e.g. int | float: the first type that parses
            for option in typing.get_args(tp):
                try:
                    return parse_value(key, text, option)
                except ConfigError:
                    pass
    except ValueError:
        pass
    raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {text!r}")


def _check_type(key: str, value: Any, tp) -> Any:
    if _is_union(tp):  # keeps the JSON type: 50 stays an int, 0.05 a float
        if not isinstance(value, bool) and isinstance(value, typing.get_args(tp)):
            return value
        raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
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
    if key.startswith("model.") and "." not in key[6:]:
        return _unknown_model_key(key, type(cfg.model))
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


def _switch_model(model: ModelConfig, name: Any) -> ModelConfig:
    """`model` itself when it already is `name`'s family, else that family's defaults."""
    if not isinstance(name, str):
        raise ConfigError(f"config key 'model.name' expects str, got {name!r}")
    name = name.strip()
    return model if model.name == name else model_config_class(name)()


def set_value(cfg: Config, key: str, value: Any) -> Config:
    """A copy of `cfg` with dotted `key` set to `value` (type-checked; strings are parsed).

    `model.name` switches the `model` section to that family's dataclass with its defaults (and
    keeps the section as it is when it already is that family).
    """
    section, _, name = key.partition(".")
    if key == "model.name":
        return dataclasses.replace(cfg, model=_switch_model(cfg.model, value))
    sections = _sections(cfg)
    if section not in sections or name not in _fields(type(sections[section])):
        raise _unknown_key(key, cfg)
    tp = _fields(type(sections[section]))[name]
    value = parse_value(key, value, tp) if isinstance(value, str) else _check_type(key, value, tp)
    sub = dataclasses.replace(sections[section], **{name: value})
    return dataclasses.replace(cfg, **{section: sub})


def apply_overrides(cfg: Config, overrides: typing.Iterable[str]) -> Config:
    """Apply `key=value` strings in order, e.g. `["train.steps=100"]`.

    A `model.name=...` among them (the last one, if several) is applied first, so
    `["model.features=8", "model.name=mlp"]` sets the MLP's features.
    """
    pairs = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not KEY=VALUE: write it like train.steps=100")
        pairs.append((key.strip(), value))
    names = [value for key, value in pairs if key == "model.name"]
    if names:
        cfg = set_value(cfg, "model.name", names[-1])
    for key, value in pairs:
        if key != "model.name":
            cfg = set_value(cfg, key, value)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """A JSON-ready nested dict; the `model` section holds `name` and that model's fields."""
    return dataclasses.asdict(cfg)


# The `model` section before it was split by family held every field below. A legacy config.json
# still loads: a field the chosen model lacks is dropped when it holds this old default, which no
# model read.
_LEGACY_MODEL_DEFAULTS = {
    "features": (),
    "activation": "relu",
    "dropout": 0.0,
    "use_bias": True,
    "norm": "batch",
    "blocks_per_stage": 1,
    "vocab_size": 0,
    "num_layers": 4,
    "num_heads": 4,
    "embed_dim": 256,
    "mlp_dim": 0,
    "max_seq_len": 0,
    "tie_embeddings": True,
    "remat": "none",
}


def _legacy_default(name: str, value: Any) -> bool:
    value = tuple(value) if isinstance(value, list) else value
    return name in _LEGACY_MODEL_DEFAULTS and value == _LEGACY_MODEL_DEFAULTS[name]


def _legacy_cnn_norm(model: ModelConfig, name: str, value: Any, section: dict) -> bool:
    """The flat section of old config.json files held the cnn's `norm="batch"` for every model;
    the transformer's own `norm` (rms | layer) came later and must not read it."""
    flat = "blocks_per_stage" in section  # only the old flat section holds cnn keys elsewhere
    return flat and model.name == "transformer" and name == "norm" and value == "batch"


def from_dict(data: dict[str, Any], base: Config | None = None) -> Config:
    """Rebuild a Config from `to_dict` output; unknown keys and wrong types are errors.

    Sections and keys left out keep `base`'s values (default: `Config()`). A `model.name` that
    differs from `base`'s starts the section from that model's defaults.
    """
    cfg = base or Config()
    for section, values in data.items():
        if section not in _sections(cfg):
            raise _unknown_key(section, cfg)
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' must be a mapping of keys to values")
        if section == "model" and "name" in values:
            cfg = set_value(cfg, "model.name", values["name"])
        for name, value in values.items():
            if section == "model" and name == "name":
                continue
            if (
                section == "model"
                and name not in _fields(type(cfg.model))
                and _legacy_default(name, value)
            ):
                continue
            if section == "model" and _legacy_cnn_norm(cfg.model, name, value, values):
                continue
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
