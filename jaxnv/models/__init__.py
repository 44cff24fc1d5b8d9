"""Model families; `build_model` makes one from its `model` config section (`MLPConfig`, ...)."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from flax import nnx

from jaxnv.core.precision import Policy

if TYPE_CHECKING:  # read by attribute: models import only the core at run time
    from jaxnv.config import ModelConfig
from jaxnv.models.cnn import CNN
from jaxnv.models.generate import generate
from jaxnv.models.linear import Linear
from jaxnv.models.mlp import ACTIVATIONS, MLP, get_activation
from jaxnv.models.rnn import LSTM
from jaxnv.models.transformer import Transformer

MODELS = ("linear", "mlp", "cnn", "lstm", "transformer")


def _rope_scaling(cfg) -> dict | None:
    """The transformer's `rope_scaling` dict from the config's flat `rope_scaling*` fields."""
    if cfg.rope_scaling in ("", "none"):
        return None
    return {
        "rope_type": cfg.rope_scaling,
        "factor": cfg.rope_scaling_factor,
        "low_freq_factor": cfg.rope_low_freq_factor,
        "high_freq_factor": cfg.rope_high_freq_factor,
        "original_max_position_embeddings": cfg.rope_original_max_len,
    }


def build_model(
    cfg: ModelConfig, in_features: int, out_features: int, policy: Policy, rngs: nnx.Rngs
) -> nnx.Module:
    """The model `cfg.name` for inputs of `in_features` and `out_features` outputs.

    `cfg` is the family's section of `jaxnv.config` (`LinearConfig`, `MLPConfig`, `CNNConfig`,
    `LSTMConfig`, `TransformerConfig`); the dispatch reads its `name` tag. For images (`cnn`)
    `in_features` is the channel count. For the transformer it is the sequence length of the data
    and `out_features` the vocabulary size (both used unless `cfg.max_seq_len` / `cfg.vocab_size`
    are set).
    """
    if cfg.name == "linear":
        return Linear(in_features, out_features, use_bias=cfg.use_bias, policy=policy, rngs=rngs)
    if cfg.name == "mlp":
        return MLP(
            in_features,
            cfg.features,
            out_features,
            activation=cfg.activation,
            dropout=cfg.dropout,
            use_bias=cfg.use_bias,
            policy=policy,
            rngs=rngs,
        )
    if cfg.name == "cnn":
        return CNN(
            in_features,
            out_features,
            features=cfg.features or (32, 64),
            blocks_per_stage=cfg.blocks_per_stage,
            norm=cfg.norm,
            dropout=cfg.dropout,
            policy=policy,
            rngs=rngs,
        )
    if cfg.name == "lstm":
        widths = cfg.features or (128,)
        if len(set(widths)) != 1:
            raise ValueError(f"model.features={widths} for an lstm must repeat one width")
        vocab = cfg.vocab_size or None
        return LSTM(
            cfg.embed_dim if vocab else in_features,
            widths[0],
            out_features,
            num_layers=len(widths),
            vocab_size=vocab,
            policy=policy,
            rngs=rngs,
        )
    if cfg.name == "transformer":
        return Transformer(
            cfg.vocab_size or out_features,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            embed_dim=cfg.embed_dim,
            mlp_dim=cfg.mlp_dim or None,
            max_seq_len=cfg.max_seq_len or in_features,
            activation=cfg.activation,
            tie_embeddings=cfg.tie_embeddings,
            remat=cfg.remat,
            dropout=cfg.dropout,
            num_kv_heads=cfg.num_kv_heads or None,
            head_dim=cfg.head_dim or None,
            position=cfg.position,
            rope_theta=cfg.rope_theta,
            rope_scaling=_rope_scaling(cfg),
            norm=cfg.norm,
            norm_eps=cfg.norm_eps,
            mlp=cfg.mlp,
            qkv_bias=cfg.qkv_bias,
            out_bias=cfg.out_bias,
            mlp_bias=cfg.mlp_bias,
            attention=cfg.attention,
            matmul=cfg.matmul,
            policy=policy,
            rngs=rngs,
        )
    close = difflib.get_close_matches(cfg.name, MODELS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ValueError(
        f"unknown model.name {cfg.name!r}: use one of {', '.join(MODELS)}{hint}, or define "
        "make_model in the experiment"
    )


__all__ = [
    "ACTIVATIONS",
    "CNN",
    "LSTM",
    "MLP",
    "MODELS",
    "Linear",
    "Transformer",
    "build_model",
    "generate",
    "get_activation",
]
