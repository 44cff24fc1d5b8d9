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
    # static: the paths ("blocks/0/attn/wqkv") of `model_state` leaves that are a frozen base
    # (LoRA: the weights under the adapters), never differentiated nor changed by a step, and
    # left out of checkpoints; () when every param trains
    frozen: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())


# The non-param variables a train state carries from step to step: BatchNorm statistics, RNG
# stream keys and counts, counters. Intermediates (`sow`) are outputs of one call, never state.
CARRIED = nnx.Not(nnx.Any(nnx.Param, nnx.Intermediate))


def trainable(model: nnx.Module):
    """The NNX filter of the variables a step trains: the LoRA adapters (`nnx.LoRAParam`) when
    the model has any, else every `nnx.Param`."""
    return nnx.LoRAParam if jax.tree.leaves(nnx.state(model, nnx.LoRAParam)) else nnx.Param


def carried(model: nnx.Module):
    """The filter of what a step carries in `model_state`: all but the trained params and
    intermediates (with LoRA, the frozen base weights too). `CARRIED` without adapters."""
    return nnx.Not(nnx.Any(trainable(model), nnx.Intermediate))


def path_str(path) -> str:
    """`"blocks/0/attn/wqkv"` for a key path through nested dicts and sequences."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


# the logical name of a stacked module's leading layer axis (the transformer's blocks); the
# sharding plan splits it over the mesh's pipeline `stage` axis when there is one
LAYER_AXIS = "layers"


def stacked_paths(model: nnx.Module) -> tuple[str, ...]:
    """The `params` paths of the trainable params stored stacked over layers: those whose first
    logical axis name is `LAYER_AXIS` (one array holds every layer's copy)."""
    out, kind = [], trainable(model)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, kind):
            names = var.get_metadata().get("out_sharding")
            if names and names[0] == LAYER_AXIS:
                out.append("/".join(str(k) for k in path))
    return tuple(out)


def frozen_paths(model: nnx.Module) -> tuple[str, ...]:
    """The `model_state` paths of the params that stay frozen (those beside the adapters of a
    LoRA model); () for a model without adapters."""
    if trainable(model) is nnx.Param:
        return ()
    base = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    return tuple(path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(base))


def map_frozen(fn, model_state, frozen: tuple[str, ...]):
    """`model_state` with `fn` applied to its frozen leaves."""
    keep = set(frozen)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: fn(x) if path_str(p) in keep else x, model_state
    )


def without_frozen(state: TrainState) -> TrainState:
    """`state` with the frozen leaves (and containers left empty) taken out of `model_state`:
    what a checkpoint holds."""
    if not getattr(state, "frozen", ()):
        return state
    keep = set(getattr(state, "frozen", ()))

    def prune(tree, prefix):
        if isinstance(tree, dict):
            out = {}
            for k, v in tree.items():
                v = prune(v, f"{prefix}{k}/")
                if not (isinstance(v, dict) and not v):
                    out[k] = v
            return out
        return {} if prefix[:-1] in keep else tree

    return state.replace(model_state=prune(state.model_state, ""))


def with_frozen(saved: TrainState, source: TrainState) -> TrainState:
    """`saved` (as `without_frozen` left it) completed with `source`'s frozen leaves, in
    `source`'s `model_state` structure."""
    if not getattr(source, "frozen", ()):
        return saved
    keep = set(source.frozen)
    flat = {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(saved.model_state)}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(source.model_state)
    filled = [x if path_str(p) in keep else flat[path_str(p)] for p, x in leaves]
    model_state = jax.tree_util.tree_unflatten(treedef, filled)
    return saved.replace(model_state=model_state, frozen=source.frozen)


def _raw_key(x):
    """Typed PRNG keys as their uint32 data: checkpointable, and NNX's streams accept either."""
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        if isinstance(x, jax.ShapeDtypeStruct):  # an abstract model
            return jax.eval_shape(jax.random.key_data, x)
        return jax.random.key_data(x)
    return x


def split_model(model: nnx.Module):
    """`(graphdef, params, model_state)`: the `nnx.Param` values and the carried rest, as plain
    dicts (intermediates from `sow` are left out).

    Plain nested dicts (not `nnx.State`) keep the state cheap to flatten on every step call and
    make checkpoints and optimizer state independent of NNX's variable types;
    `nnx.merge(graphdef, params, model_state)` rebuilds the module.
    """
    if nnx.state(model, nnx.Intermediate):  # values sown by an earlier call: not part of it
        model = nnx.merge(*nnx.split(model))  # a new module over the same arrays
        nnx.pop(model, nnx.Intermediate)
    train = trainable(model)
    graphdef, params, rest = nnx.split(model, train, nnx.Not(nnx.Any(train, nnx.Intermediate)))
    return graphdef, nnx.to_pure_dict(params), jax.tree.map(_raw_key, nnx.to_pure_dict(rest))


def abstract_model(model: ModelFn | nnx.Module) -> nnx.Module:
    """The model with shapes only (no memory, no sharding needed), from a factory or a module.

    Shapes only, also under a mesh context (`jax.set_mesh`): NNX would otherwise give every
    abstract param a sharding from its logical names as if they were mesh axes.
    """
    with jax.sharding.use_abstract_mesh(_NO_MESH):
        if isinstance(model, nnx.Module):
            return nnx.eval_shape(lambda: nnx.merge(*nnx.split(model)))
        with nnx.use_eager_sharding(False):
            return nnx.eval_shape(lambda: model(nnx.Rngs(0)))


_NO_MESH = jax.sharding.AbstractMesh((), ())


def init_state(
    model: ModelFn | nnx.Module,
    tx: optax.GradientTransformation,
    policy: Policy,
    rng: jax.Array,
    *,
    loss_scale: Any = None,
    out_shardings: Any = None,
) -> tuple[nnx.GraphDef, TrainState]:
    """The train state of a model and its optimizer state, made in one compiled call.

    `model` is a factory `rngs -> Module` (the module is built inside the compiled call, each
    device creating only its shards) or a built `nnx.Module`, whose current weights are the start
    (passed as arguments, never embedded in the program). `out_shardings` (a TrainState-shaped tree
    of shardings, or None) places the state directly in its final layout. Params are stored in
    `policy.param_dtype`. A model with LoRA adapters (jaxnv.models.lora) trains only them: they
    are the params (and the optimizer state is theirs alone); the base weights stay in
    `model_state`, stored in `policy.compute_dtype` (the dtype the forward casts them to anyway),
    their paths in `state.frozen`.
    """
    loss_scale = NoOpLossScale() if loss_scale is None else loss_scale
    init_rng, step_rng = jax.random.split(rng)
    shapes = model if isinstance(model, nnx.Module) else abstract_model(model)
    frozen = frozen_paths(shapes)

    def _state(params, model_state, step_rng, loss_scale):
        params = policy.cast_to_param(params)
        model_state = map_frozen(policy.cast_to_compute, model_state, frozen)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            model_state=model_state,
            loss_scale=loss_scale,
            rng=step_rng,
            frozen=frozen,
        )

    if isinstance(model, nnx.Module):
        graphdef, params, model_state = split_model(model)
        init = jax.jit(_state, out_shardings=out_shardings)
        return graphdef, init(params, model_state, step_rng, loss_scale)

    graphdef, _, _ = split_model(shapes)

    def _init(init_rng, step_rng, loss_scale):
        with nnx.use_eager_sharding(False):
            built = model(nnx.Rngs(params=init_rng, dropout=init_rng))
        _, params, model_state = split_model(built)
        return _state(params, model_state, step_rng, loss_scale)

    state = jax.jit(_init, out_shardings=out_shardings)(init_rng, step_rng, loss_scale)
    return graphdef, state


def abstract_state(model, tx, policy, rng, *, loss_scale=None) -> TrainState:
    """The TrainState as `jax.ShapeDtypeStruct`s, for sharding plans and restore targets."""
    return jax.eval_shape(lambda r: init_state(model, tx, policy, r, loss_scale=loss_scale)[1], rng)


def param_count(params) -> int:
    """Number of scalar parameters in a params tree."""
    return sum(int(x.size) for x in jax.tree.leaves(params))
