"""Config overrides: type checking, "did you mean", JSON round trips, cross-field validation."""

import dataclasses
import json
import re

import pytest

from jaxnv.config import (
    MODEL_CONFIGS,
    CNNConfig,
    Config,
    ConfigError,
    LinearConfig,
    LSTMConfig,
    MLPConfig,
    ModelConfig,
    TrainConfig,
    TransformerConfig,
    all_keys,
    apply_overrides,
    from_dict,
    set_value,
    to_dict,
    validate,
)
from jaxnv.core.optim import OptimizerConfig

# Each family's keys, written out by hand (the `model` section holds exactly these).
MODEL_KEYS = {
    "linear": {"name", "use_bias"},
    "mlp": {"name", "features", "activation", "dropout", "use_bias"},
    "cnn": {"name", "features", "blocks_per_stage", "norm", "dropout"},
    "lstm": {"name", "features", "vocab_size", "embed_dim"},
    "transformer": {
        "name",
        "vocab_size",
        "num_layers",
        "num_heads",
        "embed_dim",
        "mlp_dim",
        "max_seq_len",
        "activation",
        "tie_embeddings",
        "remat",
        "dropout",
        "num_kv_heads",
        "head_dim",
        "position",
        "rope_theta",
        "rope_scaling",
        "rope_scaling_factor",
        "rope_low_freq_factor",
        "rope_high_freq_factor",
        "rope_original_max_len",
        "norm",
        "norm_eps",
        "mlp",
        "qkv_bias",
        "out_bias",
        "mlp_bias",
        "attention",
        "matmul",
        "init_from",
    },
}


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
    cfg = apply_overrides(Config(), ["model.name=mlp", f"model.features={text}"])
    assert cfg.model.features == expected


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
        apply_overrides(Config(model=MLPConfig()), [override])
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


@pytest.mark.parametrize("model", ["linear", "mlp", "cnn", "lstm", "transformer"])
def test_all_keys_are_settable_and_known(model):
    cfg = apply_overrides(Config(), [f"model.name={model}"])
    keys = all_keys(cfg)
    assert len(keys) == len(set(keys))
    assert {"train.steps", "precision.policy", "optimizer.name", "model.name"} <= set(keys)
    assert {k for k in keys if k.startswith("model.")} == {f"model.{k}" for k in MODEL_KEYS[model]}
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
        model=MLPConfig(features=(32, 16), activation="gelu", dropout=0.25),
        optimizer=OptimizerConfig(name="sgd", learning_rate=0.05, momentum=0.9, nesterov=True),
        train=TrainConfig(steps=77, batch_size=48, micro_batches=4, loss="bce"),
    )


@pytest.mark.parametrize("cfg", [Config(), _nondefault_config()], ids=["default", "custom"])
def test_json_round_trip_gives_equal_config(cfg):
    text = json.dumps(to_dict(cfg))
    back = from_dict(json.loads(text))
    assert back == cfg
    if isinstance(cfg.model, MLPConfig):  # JSON lists come back as the annotated tuple
        assert type(back.model.features) is tuple


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
        from_dict({"model": {"name": "mlp", "features": [1, "two"]}})


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


# ---- the model section: one dataclass per model family, chosen by model.name -------------------


def test_model_config_builds_the_named_family_with_its_defaults():
    assert type(ModelConfig()) is LinearConfig and Config().model == LinearConfig()
    tf = ModelConfig(name="transformer", num_layers=2)
    assert type(tf) is TransformerConfig and isinstance(tf, ModelConfig)
    assert (tf.num_layers, tf.num_heads, tf.embed_dim, tf.activation) == (2, 4, 256, "silu")
    assert ModelConfig(name="mlp", features=(8,)) == MLPConfig(features=(8,))
    # the widths the models fell back to before are now the sections' own defaults
    assert CNNConfig().features == (32, 64) and LSTMConfig().features == (128,)
    assert MLPConfig().features == () and LinearConfig().use_bias is True
    assert set(MODEL_CONFIGS) == set(MODEL_KEYS)
    for name, keys in MODEL_KEYS.items():
        assert {f.name for f in dataclasses.fields(MODEL_CONFIGS[name])} == keys
        assert MODEL_CONFIGS[name]().name == name
    with pytest.raises(ConfigError, match="model.name=mlp, not 'cnn'"):
        dataclasses.replace(MLPConfig(), name="cnn")  # the tag cannot drift from the class


def test_model_config_refuses_a_key_of_another_family():
    with pytest.raises(ConfigError) as err:
        ModelConfig(name="linear", features=(8,))
    msg = _one_line(err)
    assert "unknown config key 'model.features' for model.name=linear" in msg
    assert "use_bias" in msg and "mlp|cnn|lstm" in msg


def test_model_features_on_the_transformer_suggests_one_of_its_keys():
    cfg = Config(model=TransformerConfig())
    with pytest.raises(ConfigError) as err:
        apply_overrides(cfg, ["model.features=8"])
    msg = _one_line(err)
    assert msg.startswith("unknown config key 'model.features' for model.name=transformer: ")
    suggested = re.findall(r"did you mean 'model\.(\w+)'\?", msg)
    assert suggested == ["embed_dim"] and suggested[0] in MODEL_KEYS["transformer"]


@pytest.mark.parametrize(
    ("model", "override", "suggestion"),
    [
        ("transformer", "model.num_layer=2", "num_layers"),
        ("transformer", "model.heads=2", "num_heads"),
        ("cnn", "model.channels=8", "features"),
        ("mlp", "model.activaton=gelu", "activation"),
    ],
)
def test_unknown_model_key_suggests_among_the_models_keys(model, override, suggestion):
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), [f"model.name={model}", override])
    assert f"did you mean 'model.{suggestion}'?" in _one_line(err)


def test_unknown_model_name_suggests_among_the_names():
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), ["model.name=trasnformer"])
    msg = _one_line(err)
    assert "unknown model.name 'trasnformer'" in msg and "did you mean 'transformer'?" in msg
    assert all(name in msg for name in MODEL_KEYS)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.name=cnn", "model.features=8,16"],
        ["model.features=8,16", "model.name=cnn"],  # model.name is applied first wherever it is
        ["model.name=mlp", "model.features=8,16", "model.name=cnn"],  # the last one wins
        ["train.steps=5", "model.features=8,16", "model.name=cnn", "train.steps=9"],
    ],
)
def test_model_name_switches_the_section(overrides):
    start = Config(model=MLPConfig(features=(64,), dropout=0.5))
    cfg = apply_overrides(start, overrides)
    assert type(cfg.model) is CNNConfig
    assert dataclasses.asdict(cfg.model) == {
        "name": "cnn",
        "features": (8, 16),
        "blocks_per_stage": 1,
        "norm": "batch",
        "dropout": 0.0,  # the MLP's 0.5 is not carried over: the section starts from defaults
    }
    assert start.model == MLPConfig(features=(64,), dropout=0.5)  # the input is not mutated


def test_naming_the_current_model_keeps_its_section():
    cfg = Config(model=TransformerConfig(num_layers=2, embed_dim=64))
    assert apply_overrides(cfg, ["model.name=transformer"]) == cfg
    out = apply_overrides(cfg, ["model.num_heads=2", "model.name=transformer"])
    assert out.model == TransformerConfig(num_layers=2, embed_dim=64, num_heads=2)


def test_a_key_of_the_previous_model_fails_after_a_switch():
    with pytest.raises(ConfigError, match="for model.name=transformer"):
        apply_overrides(Config(model=MLPConfig()), ["model.name=transformer", "model.features=8"])


@pytest.mark.parametrize(
    "model",
    [
        LinearConfig(use_bias=False),
        MLPConfig(features=(8, 4), activation="tanh", dropout=0.1),
        CNNConfig(features=(8,), blocks_per_stage=2, norm="group", dropout=0.2),
        LSTMConfig(features=(16, 16), vocab_size=40, embed_dim=8),
        TransformerConfig(num_layers=1, num_heads=2, embed_dim=32, remat="dots", mlp_dim=48),
    ],
    ids=lambda m: m.name,
)
@pytest.mark.parametrize("base", [None, Config(model=TransformerConfig(num_layers=7))])
def test_each_model_section_round_trips_through_json(model, base):
    cfg = Config(model=model, train=TrainConfig(steps=11))
    data = json.loads(json.dumps(to_dict(cfg)))
    assert set(data["model"]) == MODEL_KEYS[model.name]  # plain data holding only its fields
    back = from_dict(data, base)
    assert back == cfg and type(back.model) is type(model)


def test_from_dict_model_name_must_be_a_string():
    with pytest.raises(ConfigError, match="'model.name' expects str"):
        from_dict({"model": {"name": 3}})


def test_a_config_json_with_the_old_flat_model_section_loads():
    """Before the split, `model` held every family's fields: a char_gpt run's config.json."""
    old = {
        "name": "transformer",
        "features": [],
        "activation": "silu",
        "dropout": 0.0,
        "use_bias": True,
        "norm": "batch",
        "blocks_per_stage": 1,
        "vocab_size": 0,
        "num_layers": 4,
        "num_heads": 4,
        "embed_dim": 128,
        "mlp_dim": 0,
        "max_seq_len": 0,
        "tie_embeddings": True,
        "remat": "none",
    }
    back = from_dict({"model": old, "train": {"steps": 400}})
    want = TransformerConfig(num_layers=4, num_heads=4, embed_dim=128, activation="silu")
    assert back.model == want and back.train.steps == 400
    # a field of another model that was not at its old default did mean something: refused
    with pytest.raises(ConfigError, match="'model.features' for model.name=transformer"):
        from_dict({"model": {**old, "features": [8]}})


def test_an_experiment_can_declare_its_own_model_section():
    @dataclasses.dataclass
    class TinyConfig(ModelConfig):
        name: str = "tiny_test_model"
        width: int = 3

    try:
        cfg = apply_overrides(Config(), ["model.name=tiny_test_model", "model.width=5"])
        assert cfg.model == TinyConfig(width=5)
        assert ModelConfig(name="tiny_test_model") == TinyConfig()
        assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg
    finally:
        MODEL_CONFIGS.pop("tiny_test_model")
