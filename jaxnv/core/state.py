"""The train state pytree and its initialisation.

    graphdef, state = init_state(lambda rngs: MLP(10, (5,), 1, rngs=rngs), tx, policy, rng)

`TrainState` holds everything a step changes: the step count, fp32 master params, optimizer state,
non-param model state (e.g. norm statistics), the loss scale and the base PRNG key. The model's
static graph definition is returned beside it and never traced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxnv.core.precision import NoOpLossScale, Policy

ModelFn = Callable[[nnx.Rngs], nnx.Module]


@flax.struct.dataclass
class TrainState:
    """Everything a train step reads and returns; a pytree, so it jits, shards and checkpoints."""

    step: jax.Array  # int32 scalar: optimizer steps taken (skipped overflow steps included)
    params: Any  # nested dict of arrays (the model's nnx.Param values), in the param dtype
    opt_state: optax.OptState
    model_state: Any  # nested dict of the model's other variables (e.g. norm statistics), or {}
    loss_scale: Any  # NoOpLossScale | StaticLossScale | DynamicLossScale
    rng: jax.Array  # base key; a step uses fold_in(rng, step)


def split_model(model: nnx.Module):
    """`(graphdef, params, model_state)`: the `nnx.Param` values and the rest, as plain dicts.

    Plain nested dicts (not `nnx.State`) keep the state cheap to flatten on every step call and
    make checkpoints and optimizer state independent of NNX's variable types;
    `nnx.merge(graphdef, params, model_state)` rebuilds the module.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def abstract_model(model_fn: ModelFn) -> nnx.Module:
    """The model with shapes only (no memory, no sharding needed)."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: model_fn(nnx.Rngs(0)))


def init_state(
    model_fn: ModelFn,
    tx: optax.GradientTransformation,
    policy: Policy,
    rng: jax.Array,
    *,
    loss_scale: Any = None,
    out_shardings: Any = None,
) -> tuple[nnx.GraphDef, TrainState]:
    """Build the model from `model_fn(rngs)` and its optimizer state in one compiled call.

    `out_shardings` (a TrainState-shaped tree of shardings, or None) places the state directly
    in its final layout. Params are stored in `policy.param_dtype`.
    """
    graphdef, _, _ = split_model(abstract_model(model_fn))
    loss_scale = NoOpLossScale() if loss_scale is None else loss_scale
    init_rng, step_rng = jax.random.split(rng)

    def _init(init_rng, step_rng, loss_scale):
        with nnx.use_eager_sharding(False):
            model = model_fn(nnx.Rngs(params=init_rng, dropout=init_rng))
        _, params, model_state = split_model(model)
        params = policy.cast_to_param(params)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            model_state=model_state,
            loss_scale=loss_scale,
            rng=step_rng,
        )

    state = jax.jit(_init, out_shardings=out_shardings)(init_rng, step_rng, loss_scale)
    return graphdef, state


def abstract_state(model_fn, tx, policy, rng, *, loss_scale=None) -> TrainState:
    """The TrainState as `jax.ShapeDtypeStruct`s, for sharding plans and restore targets."""
    return jax.eval_shape(
        lambda r: init_state(model_fn, tx, policy, r, loss_scale=loss_scale)[1], rng
    )


def param_count(params) -> int:
    """Number of scalar parameters in a params tree."""
    return sum(int(x.size) for x in jax.tree.leaves(params))
