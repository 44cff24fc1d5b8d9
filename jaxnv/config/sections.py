"""The config's sections: one dataclass each, and the `model` section's family per model.

`ModelConfig(name=...)` builds the family's dataclass (registered in `MODEL_CONFIGS`); the
machinery that parses, overrides, validates and round-trips them is `jaxnv.config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing

from jaxnv.core.optim import OptimizerConfig
from jaxnv.parallel.mesh import MeshConfig


@dataclasses.dataclass
class ModelConfig:
    """The `model` section: a tagged union of one dataclass per model family, chosen by `name`.

    `ModelConfig(name="mlp", features=(64,))` returns an `MLPConfig`; the other families are
    `LinearConfig`, `CNNConfig`, `LSTMConfig` and `TransformerConfig`. Each holds only the fields
    its model reads. A subclass that sets a default for `name` is registered under it in
    `MODEL_CONFIGS`, so an experiment can declare the section of its own `make_model`.
    """

    name: str = "linear"

    # foreign key -> this family's key that does that job; completes the "did you mean"
    related: typing.ClassVar[dict[str, str]] = {}

    def __new__(cls, *args, **kwargs):
        if cls is not ModelConfig:
            return super().__new__(cls)
        if len(args) > 1:
            raise TypeError("ModelConfig takes `name` and the family's fields as keywords")
        name = kwargs.get("name", args[0] if args else "linear")
        family = model_config_class(name)
        names = {f.name for f in dataclasses.fields(family)}
        for key in kwargs:
            if key not in names:
                raise _unknown_model_key(f"model.{key}", family)
        return super().__new__(family)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if isinstance(name, str):
            cls._model_name = name
            MODEL_CONFIGS[name] = cls

    def __post_init__(self):
        own = getattr(type(self), "_model_name", None)
        if own is not None and self.name != own:
            raise ConfigError(
                f"{type(self).__name__} is model.name={own}, not {self.name!r}: build "
                f"ModelConfig(name={self.name!r}, ...) or override model.name={self.name}"
            )


MODEL_CONFIGS: dict[str, type[ModelConfig]] = {}  # model.name -> its section's dataclass


@dataclasses.dataclass
class LinearConfig(ModelConfig):
    """`model.name=linear`: one dense layer from the inputs to the outputs."""

    name: str = "linear"
    use_bias: bool = True


@dataclasses.dataclass
class MLPConfig(ModelConfig):
    """`model.name=mlp`: dense layers of widths `features`, then the output layer."""

    name: str = "mlp"
    features: tuple[int, ...] = ()  # hidden widths; () is a linear model
    activation: str = "relu"
    dropout: float = 0.0
    use_bias: bool = True

    related = {"hidden": "features", "num_layers": "features", "embed_dim": "features"}


@dataclasses.dataclass
class CNNConfig(ModelConfig):
    """`model.name=cnn`: residual stages of widths `features`, global pooling, a dense head."""

    name: str = "cnn"
    features: tuple[int, ...] = (32, 64)  # channels of each stage
    blocks_per_stage: int = 1
    norm: str = "batch"  # batch | group | none
    dropout: float = 0.0

    related = {
        "channels": "features",
        "hidden": "features",
        "num_layers": "blocks_per_stage",
        "embed_dim": "features",
    }


@dataclasses.dataclass
class LSTMConfig(ModelConfig):
    """`model.name=lstm`: stacked LSTM layers (one per entry of `features`, all one width)."""

    name: str = "lstm"
    features: tuple[int, ...] = (128,)  # hidden width of each layer
    vocab_size: int = 0  # >0: token inputs through an embedding of `embed_dim`; 0: real inputs
    embed_dim: int = 256

    related = {"hidden": "features", "num_layers": "features"}


@dataclasses.dataclass
class TransformerConfig(ModelConfig):
    """`model.name=transformer`: a decoder-only pre-norm LM (default: RoPE, RMSNorm, gated MLP;
    the switches below give Llama / Mistral / Qwen2 / GPT-2 layouts)."""

    name: str = "transformer"
    vocab_size: int = 0  # 0: from the data
    num_layers: int = 4
    num_heads: int = 4
    embed_dim: int = 256
    mlp_dim: int = 0  # 0: the model's default
    max_seq_len: int = 0  # 0: data.seq_len
    activation: str = "silu"  # silu | gelu | relu | relu2 | gelu_tanh (GPT-2's gelu_new)
    tie_embeddings: bool = True
    remat: str = "none"  # none | full | dots
    dropout: float = 0.0
    init_from: str = ""  # hf:DIR: start from a local Hugging Face checkpoint (docs/finetuning.md)
    # architecture switches (defaults: jaxnv's own model; see jaxnv/models/transformer.py)
    num_kv_heads: int = 0  # 0: num_heads (MHA); fewer: grouped-query attention, 1: MQA
    head_dim: int = 0  # 0: embed_dim // num_heads
    position: str = "rope"  # rope | learned (GPT-2)
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # none | llama3 (Llama-3.1's long-context frequencies):
    rope_scaling_factor: float = 8.0  # the llama3 scaling's `factor`,
    rope_low_freq_factor: float = 1.0  # `low_freq_factor`,
    rope_high_freq_factor: float = 4.0  # `high_freq_factor`,
    rope_original_max_len: int = 8192  # and `original_max_position_embeddings`
    norm: str = "rms"  # rms | layer (GPT-2)
    norm_eps: float = 1e-6
    mlp: str = "gated"  # gated (Llama) | plain (GPT-2)
    qkv_bias: bool = False  # Qwen2, GPT-2
    out_bias: bool = False  # GPT-2
    mlp_bias: bool = False  # GPT-2
    # the attention kernel: auto (cuDNN's fused one on an NVIDIA GPU in bf16/fp16, else XLA's),
    # xla, or cudnn (an error where it cannot run); the choice is printed at start-up
    attention: str = "auto"
    # the matmuls: xla, or mkl (the projections and attention's products through Intel MKL, as
    # XLA FFI calls: CPU, float32, one device; pip install "jaxnv[mkl]" and a C++ compiler)
    matmul: str = "xla"

    related = {
        "features": "embed_dim",
        "hidden": "embed_dim",
        "width": "embed_dim",
        "layers": "num_layers",
        "heads": "num_heads",
    }


def model_config_class(name: str) -> type[ModelConfig]:
    """The dataclass of the `model` section for `model.name=name`; did-you-mean otherwise."""
    if name in MODEL_CONFIGS:
        return MODEL_CONFIGS[name]
    names = list(MODEL_CONFIGS)
    close = difflib.get_close_matches(str(name), names, n=1)
    hint = f"did you mean '{close[0]}'? (" if close else "("
    raise ConfigError(f"unknown model.name {name!r}: {hint}one of {', '.join(names)})")


def _unknown_model_key(key: str, family: type[ModelConfig]) -> ConfigError:
    """One line: the closest key of this model, and the models that do have `key`."""
    field = key.partition(".")[2]
    own = [f.name for f in dataclasses.fields(family) if f.name != "name"]
    close = [family.related[field]] if family.related.get(field) in own else []
    close = close or difflib.get_close_matches(field, own, n=1)
    name = getattr(family, "_model_name", family.__name__)
    hint = (
        f": did you mean 'model.{close[0]}'?"
        if close
        else f", whose keys are {', '.join(own) or 'none'}"
    )
    others = [
        n for n, c in MODEL_CONFIGS.items() if field in {f.name for f in dataclasses.fields(c)}
    ]
    where = f" ({key} belongs to model.name={'|'.join(others)})" if others else ""
    return ConfigError(f"unknown config key '{key}' for model.name={name}{hint}{where}")


@dataclasses.dataclass
class DataConfig:
    """Which built-in data set to use and how to generate or split it."""

    name: str = "house_prices"  # house_prices|classification|regression|digits|text|adding|npz
    # |files (your own text: docs/data.md)
    num_train: int = 1000
    num_eval: int = 200  # for name=files: at most this many eval rows (0: all held out)
    noise: float = 0.1
    seed: int = 0  # generation seed; the shuffle seed is train.seed
    # name=npz: a .npz file with x_train, ...; name=files: files, a glob, a `jaxnv data prepare`
    # output directory or a token file
    path: str = ""
    seq_len: int = 128  # for sequence data (text, adding, files)
    # name=files (docs/data.md): auto|text|jsonl|parquet|array_record|tokens
    format: str = "auto"
    field: str = "text"  # the text field of JSONL records / column of Parquet files
    # "": a prepared corpus's own, else bytes | bytes | PATH/tokenizer.json | PATH.model | bpe:N
    tokenizer: str = ""
    packing: bool = False  # documents packed into rows (segment ids) instead of windows
    eval_path: str = ""  # held-out files; empty: hold out eval_fraction of the documents
    eval_fraction: float = 0.01
    token_dtype: str = "uint16"  # of a flat token file (format=tokens): uint16 | uint32


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
    pipeline_microbatches: int = 0  # with mesh.stage > 1: microbatches a step (0: the stages)
    steps_per_call: int = 1  # optimizer steps inside one compiled call (small models: fewer calls)
    max_device_batch: int = 0  # >0: more micro-batches when a device's share would exceed this
    loss: str = "mse"  # mse | bce | softmax_ce | lm (language models: weighted next-token CE)
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
class LoRAConfig:
    """Low-rank adapters (docs/finetuning.md): `rank` 0 trains every weight; above 0 only the
    adapters on the `targets` projections train, and the base stays frozen."""

    rank: int = 0
    alpha: float = 16.0  # the update is scaled by alpha / rank
    targets: tuple[str, ...] = ("wqkv", "wo")  # projection names: wqkv wo w_gate_up w_up w_down
    dropout: float = 0.0  # on the adapters' input


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
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the fix."""
