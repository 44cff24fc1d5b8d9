"""Config overrides: type checking, "did you mean", JSON round trips, cross-field validation."""

import dataclasses
import json

import pytest

from jaxnv.config import (
    Config,
    ConfigError,
    ModelConfig,
    TrainConfig,
    all_keys,
    apply_overrides,
    from_dict,
    set_value,
    to_dict,
    validate,
)
from jaxnv.core.optim import OptimizerConfig


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, f"error message is not one line: {msg!r}"
    return msg


def test_overrides_parse_each_field_type():
    cfg = apply_overrides(
        Config(),
        [
            "train.steps=123",  # int
            "optimizer.learning_rate=3e-3",  # float
            "logging.progress=false",  # bool
            "model.name=mlp",  # str
            "model.features=32,64",  # tuple[int, ...]
        ],
    )
    assert cfg.train.steps == 123 and type(cfg.train.steps) is int
    assert cfg.optimizer.learning_rate == 3e-3 and type(cfg.optimizer.learning_rate) is float
    assert cfg.logging.progress is False
    assert cfg.model.name == "mlp"
    assert cfg.model.features == (32, 64)
    # Everything not overridden keeps its default, and the input config is not mutated.
    assert cfg.train.batch_size == TrainConfig().batch_size
    assert Config().train.steps == TrainConfig().steps


def test_override_int_given_to_float_field_becomes_float():
    cfg = apply_overrides(Config(), ["optimizer.learning_rate=1"])
    assert type(cfg.optimizer.learning_rate) is float and cfg.optimizer.learning_rate == 1.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("True", True),
        ("1", True),
        ("yes", True),
        ("on", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("OFF", False),
    ],
)
def test_bool_spellings(text, expected):
    assert (
        apply_overrides(Config(), [f"logging.tensorboard={text}"]).logging.tensorboard is expected
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [("(8, 16)", (8, 16)), ("[4]", (4,)), ("4,", (4,)), ("()", ()), ("", ())],
)
def test_tuple_spellings(text, expected):
    assert apply_overrides(Config(), [f"model.features={text}"]).model.features == expected


def test_later_override_wins():
    cfg = apply_overrides(Config(), ["train.steps=5", "train.steps=7"])
    assert cfg.train.steps == 7


@pytest.mark.parametrize(
    ("override", "expected_type"),
    [
        ("train.steps=abc", "int"),
        ("train.steps=1.5", "int"),
        ("train.steps=true", "int"),
        ("optimizer.learning_rate=fast", "float"),
        ("logging.progress=maybe", "bool"),
        ("model.features=32,wide", "a comma-separated list of int"),
        ("model.features=1.5", "a comma-separated list of int"),
    ],
)
def test_wrong_type_is_one_line_naming_the_type(override, expected_type):
    key, _, value = override.partition("=")
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), [override])
    msg = _one_line(err)
    assert f"'{key}'" in msg
    assert f"expects {expected_type}" in msg
    assert repr(value) in msg


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("train.step=5", "train.steps"),  # typo in the field
        ("stepz=5", "train.steps"),  # no section at all
        ("trian.steps=5", "train.steps"),  # typo in the section
        ("optimizer.learnin_rate=1e-3", "optimizer.learning_rate"),
        ("precision.polcy=bf16", "precision.policy"),
    ],
)
def test_unknown_key_suggests_the_closest(override, suggestion):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), [override])
    msg = _one_line(err)
    assert f"unknown config key '{key}'" in msg
    assert f"did you mean '{suggestion}'?" in msg


def test_unknown_key_with_nothing_close_points_at_print_config():
    with pytest.raises(ConfigError, match="--print-config"):
        apply_overrides(Config(), ["qqqqqqq.zzzzzzzz=1"])


@pytest.mark.parametrize("override", ["train.steps", "=5", "  =5", ""])
def test_malformed_override_says_key_value(override):
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), [override])
    assert "KEY=VALUE" in _one_line(err)


def test_all_keys_are_settable_and_known():
    cfg = Config()
    keys = all_keys(cfg)
    assert len(keys) == len(set(keys))
    assert {"train.steps", "precision.policy", "optimizer.name", "model.features"} <= set(keys)
    for key in keys:  # setting every key to its own value is accepted and changes nothing
        section, name = key.split(".")
        assert set_value(cfg, key, getattr(getattr(cfg, section), name)) == cfg


def test_set_value_rejects_non_string_of_wrong_type():
    with pytest.raises(ConfigError, match="expects int"):
        set_value(Config(), "train.steps", 1.5)
    with pytest.raises(ConfigError, match="expects int"):
        set_value(Config(), "train.steps", True)  # a bool is not an int here
    with pytest.raises(ConfigError, match="expects bool"):
        set_value(Config(), "logging.progress", 1)


def _nondefault_config() -> Config:
    return Config(
        model=ModelConfig(name="mlp", features=(32, 16), activation="gelu", dropout=0.25),
        optimizer=OptimizerConfig(name="sgd", learning_rate=0.05, momentum=0.9, nesterov=True),
        train=TrainConfig(steps=77, batch_size=48, micro_batches=4, loss="bce"),
    )


@pytest.mark.parametrize("cfg", [Config(), _nondefault_config()], ids=["default", "custom"])
def test_json_round_trip_gives_equal_config(cfg):
    text = json.dumps(to_dict(cfg))
    back = from_dict(json.loads(text))
    assert back == cfg
    assert type(back.model.features) is tuple  # JSON lists come back as the annotated tuple


def test_from_dict_rebuilds_on_defaults_not_on_base_fields_left_out():
    back = from_dict({"train": {"steps": 9}})
    assert back == dataclasses.replace(Config(), train=TrainConfig(steps=9))


def test_from_dict_unknown_key_fails():
    data = to_dict(Config())
    data["train"]["stepz"] = 3
    with pytest.raises(ConfigError, match="did you mean 'train.steps'"):
        from_dict(data)
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict({"trainn": {"steps": 3}})
    with pytest.raises(ConfigError):
        from_dict({"train": 3})  # a section must be a mapping


def test_from_dict_wrong_type_fails():
    with pytest.raises(ConfigError, match="expects int"):
        from_dict({"train": {"steps": "many"}})
    with pytest.raises(ConfigError, match="comma-separated list of int"):
        from_dict({"model": {"features": [1, "two"]}})


def test_validate_accepts_defaults_and_returns_config():
    cfg = _nondefault_config()
    assert validate(cfg) is cfg


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.steps=0", "train.steps must be >= 1"),
        ("train.steps=-3", "train.steps must be >= 1"),
        ("train.batch_size=0", "train.batch_size must be >= 1"),
        ("train.micro_batches=0", "train.micro_batches must be >= 1"),
        ("train.eval_every=-1", "train.eval_every must be >= 0"),
        ("logging.log_every=0", "logging.log_every must be >= 1"),
    ],
)
def test_validate_refuses_non_positive_values(override, needle):
    cfg = apply_overrides(Config(), [override])  # the type is fine; the value is not
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert needle in _one_line(err)


def test_validate_refuses_batch_not_divisible_by_micro_batches():
    cfg = apply_overrides(Config(), ["train.batch_size=30", "train.micro_batches=4"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    msg = _one_line(err)
    assert "train.batch_size=30" in msg and "train.micro_batches=4" in msg
    # ... and accepts it once the batch divides.
    ok = apply_overrides(cfg, ["train.batch_size=32"])
    assert validate(ok).train.batch_size == 32
