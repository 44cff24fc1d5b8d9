"""Model families; `build_model` makes one from a `ModelConfig`."""

from __future__ import annotations

import difflib

from flax import nnx

from jaxnv.config import ModelConfig
from jaxnv.models.linear import Linear
from jaxnv.models.mlp import ACTIVATIONS, MLP, get_activation
from jaxnv.precision import Policy

MODELS = ("linear", "mlp")

# Params carry logical axis names; jaxnv places them with jit out_shardings, never eagerly, so
# models can be built with or without a mesh in scope.
nnx.use_eager_sharding(False)


def build_model(
    cfg: ModelConfig, in_features: int, out_features: int, policy: Policy, rngs: nnx.Rngs
) -> nnx.Module:
    """The model `cfg.name` for inputs of `in_features` and `out_features` outputs."""
    if cfg.name == "linear":
        if cfg.features:
            raise ValueError("model.features is for model.name=mlp; a linear model has none")
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
    close = difflib.get_close_matches(cfg.name, MODELS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ValueError(f"unknown model.name {cfg.name!r}: use one of {', '.join(MODELS)}{hint}")


__all__ = ["ACTIVATIONS", "MLP", "MODELS", "Linear", "build_model", "get_activation"]
