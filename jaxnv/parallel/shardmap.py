"""A data-parallel train step written with explicit collectives (`jax.shard_map`).

    mesh = make_mesh(MeshConfig(data=8))
    graphdef, state = init_state(model_fn, tx, policy, rng, out_shardings=replicated(mesh))
    train_step = make_dp_train_step(graphdef, loss_fn, tx, policy, mesh)
    state, metrics = train_step(state, batch)  # batch rows split over (data, fsdp)

Same contract and metrics as `jaxnv.core.step.make_train_step`, but written per device: each device
holds the whole (replicated) state and its own rows of the batch, computes its loss and grads,
and averages them with `lax.pmean` over the batch axes. It is the pattern for custom parallel code
(see docs/shard_map.md); `tests/test_shardmap.py` checks it against the jit-sharding path.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnv.core.precision import Policy
from jaxnv.core.state import TrainState
from jaxnv.core.step import Batch, LossFn, Step, _grads, apply_update
from jaxnv.parallel.mesh import BATCH_AXES


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that puts a whole copy on every device (`P()`): the state's layout here."""
    return NamedSharding(mesh, P())


def _ways(mesh: Mesh, batch_axes: tuple[str, ...]) -> int:
    ways = 1
    for axis in batch_axes:
        ways *= mesh.shape[axis]
    return ways


def check_batch_splits(batch: Batch, mesh: Mesh, batch_axes: tuple[str, ...]) -> None:
    """Raise a one-line ValueError unless every leaf's leading dim splits over `batch_axes`."""
    ways = _ways(mesh, batch_axes)
    for path, x in jax.tree_util.tree_leaves_with_path(batch):
        rows = jnp.shape(x)[0] if jnp.ndim(x) else None
        if rows is None or rows % ways:
            axes = "*".join(batch_axes)
            raise ValueError(
                f"batch{jax.tree_util.keystr(path)} {tuple(jnp.shape(x))} does not split over "
                f"mesh {axes}={ways}: use a batch size that is a multiple of {ways}"
            )


def _pmean_floating(tree, axes):
    """pmean the floating leaves; others (counters) are equal on every shard, so pmax keeps them."""

    def mean(x):
        if jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return jax.lax.pmean(x, axes)
        return jax.lax.pmax(x, axes)

    return jax.tree.map(mean, tree)


def make_dp_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    policy: Policy,
    mesh: Mesh,
    *,
    learning_rate_fn: optax.Schedule | None = None,
    batch_axes: tuple[str, ...] = BATCH_AXES,
    batch_spec: Any = None,
) -> Step:
    """A jitted data-parallel `train_step(state, batch) -> (state, metrics)`, donating `state`.

    The state is replicated (`P()` on `mesh`); the batch's leading dim is split over
    `batch_axes`. Gradients, loss and aux are averaged across shards with `lax.pmean`, so with
    equal shards and a loss that is a mean over rows the result equals the jit path's. Dropout
    differs: each shard draws from `fold_in(step_rng, shard index)` (see docs/shard_map.md).
    Batch norm inside the loss normalises by each shard's own statistics.
    """
    batch_axes = tuple(batch_axes)

    def local_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        # Runs once per device. `state` is the full replicated state, `batch` this device's rows.
        shard = jax.lax.axis_index(batch_axes)  # linear index over (data, fsdp)
        # One key per shard: the same key everywhere would give every shard the same dropout
        # mask for its rows, which is correlated noise the jit path (one global mask) lacks.
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), shard)
        # Mark the params as varying over the batch axes before differentiating. Otherwise
        # shard_map's type system sees a replicated input used with per-shard data and
        # transposes the implicit broadcast into a psum: the grads would come back already
        # *summed* over shards. With the cast they stay per shard and the mean below is ours.
        local = state.replace(params=jax.lax.pcast(state.params, batch_axes, to="varying"))
        grads, loss, aux, model_state, weight = _grads(
            graphdef, loss_fn, policy, local, state.model_state, batch, rng
        )
        # The only communication: one all-reduce each (XLA fuses them). Each shard's mean counts
        # by its loss's weight (1 for a plain mean, whose equal shards make the mean of per-shard
        # means the global mean; the token count of a `Weighted` loss: the exact token mean).
        total = jax.lax.psum(weight, batch_axes)
        safe = jnp.where(total > 0, total, 1.0)
        grads, loss, aux = jax.tree.map(
            lambda x: jax.lax.psum(x * weight, batch_axes) / safe, (grads, loss, aux)
        )
        # Norm statistics: running means average exactly; running variances lose the
        # between-shard part (like DDP without SyncBatchNorm).
        model_state = _pmean_floating(model_state, batch_axes)
        # The finite check runs on the averaged grads, so every device sees the same flag and
        # takes the same branch: an inf in one shard's rows skips the update everywhere.
        return apply_update(tx, state, grads, loss, aux, model_state, learning_rate_fn)

    # out_specs P(): every output is replicated. shard_map checks that claim (check_vma): a
    # value still varying over a batch axis, e.g. a forgotten pmean, fails at trace time.
    sharded = jax.shard_map(
        local_step, mesh=mesh, in_specs=(P(), P(batch_axes)), out_specs=(P(), P())
    )

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        check_batch_splits(batch, mesh, batch_axes)  # at trace time: before anything compiles
        return sharded(state, batch)

    # No in_shardings: shard_map's in_specs already place the inputs, and jit's own check of an
    # uneven batch would fire first with a multi-line message instead of ours.
    fn = jax.jit(
        train_step, donate_argnums=(0,), out_shardings=(replicated(mesh), replicated(mesh))
    )
    return Step(fn, batch_spec, "the data-parallel train step")
