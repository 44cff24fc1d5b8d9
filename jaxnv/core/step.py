"""Compiled train and eval steps: pure functions `(state, batch) -> (state, metrics)`.

    train_step = make_train_step(graphdef, loss_fn, tx, policy, batch_spec=spec)
    state, metrics = train_step(state, batch)

A loss function has the signature `loss_fn(model, batch, rng) -> (loss, aux)` (or just `loss`):
`rng` is a PRNG key while training and None in evaluation; `aux` is a dict of scalar metrics.
`loss` is a scalar mean, or a `losses.Weighted(total, weight)` to be averaged exactly over
micro-batches, devices and evaluation batches. The model arrives in NNX's train mode
(`model.train()`) in the train step and in eval mode (`model.eval()`) in the eval step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxnv.core.losses import Weighted
from jaxnv.core.precision import Policy
from jaxnv.core.state import TrainState, carried

Batch = Any
LossFn = Callable[[nnx.Module, Batch, jax.Array | None], tuple[jax.Array, dict]]


def batch_spec_of(batch: Batch) -> Any:
    """The shapes and dtypes of a batch, as `jax.ShapeDtypeStruct`s."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), batch)


def _describe(path, leaf) -> str:
    return f"batch{jax.tree_util.keystr(path)} {tuple(leaf.shape)} {jnp.dtype(leaf.dtype).name}"


def check_batch(batch: Batch, spec: Any, what: str = "the step") -> None:
    """Raise a one-line ValueError when `batch` differs from `spec` in structure, shape or dtype."""
    got, got_def = jax.tree_util.tree_flatten_with_path(batch)
    want, want_def = jax.tree_util.tree_flatten_with_path(spec)
    if got_def != want_def:
        raise ValueError(
            f"batch structure {got_def} differs from what {what} was built for ({want_def}): "
            "feed batches with the same keys as the data set"
        )
    for (path, g), (_, w) in zip(got, want, strict=True):
        shape, dtype = tuple(jnp.shape(g)), jnp.result_type(g)
        if shape != tuple(w.shape) or dtype != w.dtype:
            raise ValueError(
                f"{_describe(path, jax.ShapeDtypeStruct(shape, dtype))} does not match "
                f"{what}, built for {tuple(w.shape)} {jnp.dtype(w.dtype).name}: feed batches of "
                "that shape and dtype (train.batch_size is the leading dimension) or build the "
                "step again for the new batch"
            )


class Step:
    """A compiled step that checks each batch against the spec it was built for.

    `fn` is the raw jitted function (use it for `.lower(...)` or to skip the check).
    """

    def __init__(self, fn, batch_spec=None, what="the step"):
        self.fn = fn
        self.batch_spec = batch_spec
        self.what = what
        if batch_spec is not None:
            leaves, self._treedef = jax.tree.flatten(batch_spec)
            self._expected = [(tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves]

    def __call__(self, state, batch):
        if self.batch_spec is not None:
            leaves, treedef = jax.tree.flatten(batch)  # fast path; details only on a mismatch
            if treedef != self._treedef or any(
                x.shape != s or x.dtype != d
                for x, (s, d) in zip(leaves, self._expected, strict=True)
            ):
                check_batch(batch, self.batch_spec, self.what)
        return self.fn(state, batch)


class LossFnError(ValueError):
    """A loss function or model that breaks the step's contract (what it returns, the variables
    it keeps); its message names the fix."""


def _merge(graphdef, policy: Policy, params, model_state, *, train: bool):
    model = nnx.merge(graphdef, policy.cast_to_compute(params), model_state)
    if train:  # NNX's own switch: Dropout.deterministic, BatchNorm.use_running_average
        model.train()
    else:
        model.eval()
    return model


def _call_loss(loss_fn, model, batch, rng):
    """`(mean, weight, aux)` from whatever `loss_fn` returns: a scalar, a `Weighted`, or either
    of them with an aux dict. `mean` is the loss to differentiate; `weight` what it averages
    (None for a plain scalar mean)."""
    out = loss_fn(model, batch, rng)
    if isinstance(out, tuple) and not isinstance(out, Weighted):
        if len(out) != 2 or not isinstance(out[1], dict):
            raise LossFnError(
                "loss_fn returned a tuple that is not (loss, aux): return a scalar loss, or "
                "(loss, aux) with aux a dict of scalar metrics"
            )
        loss, aux = out
    else:
        loss, aux = out, {}
    if isinstance(loss, Weighted):
        total = jnp.asarray(loss.total, jnp.float32)
        weight = jax.lax.stop_gradient(jnp.asarray(loss.weight, jnp.float32))
        if total.ndim or weight.ndim:
            raise LossFnError(
                f"Weighted(total {total.shape}, weight {weight.shape}) must hold two scalars: sum "
                "the per-element losses and their weights (losses.weighted_mean does both)"
            )
        mean = jnp.where(weight > 0, total / jnp.where(weight > 0, weight, 1.0), 0.0)
    else:
        mean, weight = jnp.asarray(loss, jnp.float32), None
        if mean.ndim:
            raise LossFnError(
                f"loss_fn returned a loss of shape {mean.shape}, not a scalar: reduce it (.mean()),"
                " or return losses.weighted_mean(per_element_losses, mask) for an exact mean"
            )
    bad = [k for k, v in aux.items() if jnp.ndim(v)]
    if bad:
        raise LossFnError(f"aux metrics {bad} are not scalars: reduce each to one number")
    return mean, weight, aux


def _carried(model, model_state):
    """The model's non-param state after a call (with LoRA, the frozen base passes through it
    unchanged), checked to keep the structure it came in with."""
    new = nnx.to_pure_dict(nnx.state(model, carried(model)))
    if jax.tree.structure(new) != jax.tree.structure(model_state):
        raise LossFnError(
            "the model added or removed variables while it ran: keep non-param state fixed "
            "(create it in __init__), and sow intermediates as nnx.Intermediate"
        )
    return new


def _grads(graphdef, loss_fn, policy, state: TrainState, model_state, batch, rng):
    """Unscaled fp32 grads, the loss, aux metrics, the updated model state and the loss's weight
    for one batch."""

    def scaled_loss(params):
        model = _merge(graphdef, policy, params, model_state, train=True)
        mean, weight, aux = _call_loss(loss_fn, model, batch, rng)
        weight = jnp.ones((), jnp.float32) if weight is None else weight
        return state.loss_scale.scale(mean), (mean, aux, _carried(model, model_state), weight)

    grads, (loss, aux, new_model_state, weight) = jax.grad(scaled_loss, has_aux=True)(state.params)
    return state.loss_scale.unscale(grads), loss, aux, new_model_state, weight


def _accumulated_grads(graphdef, loss_fn, policy, state, batch, rng, micro_batches):
    """Grads, loss and aux over `micro_batches` equal slices of `batch` (by `lax.scan`), each
    slice weighted by its loss's weight: the exact mean of a `Weighted` loss, and the plain mean
    of per-slice means otherwise."""

    def split(x):  # (B, ...) -> (k, B / k, ...); micro-batch i takes rows i, i + k, i + 2k, ...
        # strided rather than contiguous: with the batch split over devices by rows, every
        # micro-batch then draws evenly from every device and no rows have to move
        x = x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    def one(model_state, i, micro):
        return _grads(
            graphdef, loss_fn, policy, state, model_state, micro, jax.random.fold_in(rng, i)
        )

    micro = jax.tree.map(split, batch)
    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda: one(state.model_state, 0, first))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[:3], shapes[4]))

    def body(carry, xs):
        ((g_sum, l_sum, a_sum), w_sum), model_state = carry
        i, mb = xs
        g, loss, aux, model_state, w = one(model_state, i, mb)
        sums = jax.tree.map(lambda acc, x: acc + x * w, (g_sum, l_sum, a_sum), (g, loss, aux))
        return ((sums, w_sum + w), model_state), None

    xs = (jnp.arange(micro_batches), micro)
    ((sums, weight), model_state), _ = jax.lax.scan(body, (zeros, state.model_state), xs)
    safe = jnp.where(weight > 0, weight, 1.0)
    grads, loss, aux = jax.tree.map(lambda x: x / safe, sums)
    return grads, loss, aux, model_state, weight


def schedule_count(opt_state, default: jax.Array) -> jax.Array:
    """The update count optax's schedule reads (`ScaleByScheduleState.count`), else `default`."""
    found = [
        x.count
        for x in jax.tree.leaves(
            opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState)
        )
        if isinstance(x, optax.ScaleByScheduleState)
    ]
    return found[0] if found else default


def apply_update(tx, state: TrainState, grads, loss, aux, model_state, learning_rate_fn=None):
    """The optimizer update of a train step, skipped bit-identically on non-finite `grads`;
    returns `(new_state, metrics)`. Shared by the jit-sharding and shard_map steps.

    One reduction gives both the grad norm and the finite check: the sum of squares is finite
    exactly when every gradient is, except for a norm above ~1.8e19, whose square overflows
    float32 and which is treated as non-finite too (no float32 update survives it). It saves a
    separate `all_finite` read of the gradients.
    """
    sum_sq = optax.tree.norm(grads, squared=True)
    finite = jnp.isfinite(sum_sq)

    def apply(_):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), opt_state, model_state

    def skip(_):  # non-finite grads: everything stays bit-identical
        return state.params, state.opt_state, state.model_state

    # a conditional, not a select: the skip costs nothing on the common path
    params, opt_state, model_state = jax.lax.cond(finite, apply, skip, None)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        model_state=model_state,
        loss_scale=state.loss_scale.adjust(finite),
    )
    metrics = {
        "loss": loss,
        "grad_norm": jnp.sqrt(sum_sq),
        "loss_scale": jnp.asarray(state.loss_scale.loss_scale, jnp.float32),
        "grads_finite": finite,
        **aux,
    }
    if learning_rate_fn is not None:
        count = schedule_count(state.opt_state, state.step)
        metrics["learning_rate"] = jnp.asarray(learning_rate_fn(count), jnp.float32)
    return new_state, metrics


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    policy: Policy,
    *,
    learning_rate_fn: optax.Schedule | None = None,
    micro_batches: int = 1,
    batch_spec: Any = None,
    state_sharding: Any = None,
    batch_sharding: Any = None,
    donate: bool = True,
) -> Step:
    """A jitted `train_step(state, batch) -> (state, metrics)`, donating `state`.

    One call is one optimizer update on the whole batch: with `micro_batches=k` the batch is cut
    into k slices whose gradients are averaged. Non-finite gradients leave params, optimizer and
    model state exactly as they were and adjust the loss scale. Metrics: `loss`, `grad_norm`,
    `learning_rate` (if `learning_rate_fn`), `loss_scale`, `grads_finite`, and the loss's aux.
    `learning_rate` is the rate this step's update applies: `learning_rate_fn` at optax's own
    schedule count, which (unlike `state.step`) does not advance on skipped overflow steps or on
    the in-between calls of `optax.MultiSteps`.
    """
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        if micro_batches == 1:
            grads, loss, aux, model_state, _ = _grads(
                graphdef, loss_fn, policy, state, state.model_state, batch, rng
            )
        else:
            grads, loss, aux, model_state, _ = _accumulated_grads(
                graphdef, loss_fn, policy, state, batch, rng, micro_batches
            )
        return apply_update(tx, state, grads, loss, aux, model_state, learning_rate_fn)

    fn = jax.jit(
        train_step,
        donate_argnums=(0,) if donate else (),
        in_shardings=None if state_sharding is None else (state_sharding, batch_sharding),
        out_shardings=None if state_sharding is None else (state_sharding, None),
    )
    return Step(fn, batch_spec, "the train step")


class EvalStep(Step):
    """A compiled eval step: `eval_step(state, batch) -> metrics`; `.weighted(state, batch)`
    also gives the weight the metrics average over (the loss's weight, else the example count)."""

    def __call__(self, state, batch):
        return super().__call__(state, batch)[0]

    def weighted(self, state, batch):
        return super().__call__(state, batch)


def make_eval_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    policy: Policy,
    *,
    batch_spec: Any = None,
) -> EvalStep:
    """A jitted `eval_step(state, batch) -> metrics` (`loss` and the loss's aux), the model in
    eval mode (`model.eval()`: no dropout, BatchNorm on its running statistics)."""

    def eval_step(state: TrainState, batch: Batch) -> tuple[dict, jax.Array]:
        model = _merge(graphdef, policy, state.params, state.model_state, train=False)
        mean, weight, aux = _call_loss(loss_fn, model, batch, None)
        if weight is None:  # a plain mean: weigh the batch by its examples
            leaves = jax.tree.leaves(batch)
            weight = jnp.asarray(leaves[0].shape[0] if leaves else 1, jnp.float32)
        return {"loss": mean, **aux}, weight

    return EvalStep(jax.jit(eval_step), batch_spec, "the eval step")


def check_batch_fits(graphdef, loss_fn, policy, state, batch_spec) -> None:
    """Trace the loss on `batch_spec`; a shape or dtype failure becomes one line naming the fix."""
    step = make_eval_step(graphdef, loss_fn, policy).fn
    try:
        jax.eval_shape(step, state, batch_spec)
    except LossFnError:
        raise  # the loss's own mistake, already one line naming the fix: not the batch's
    except (TypeError, ValueError) as err:
        leaves = jax.tree_util.tree_flatten_with_path(batch_spec)[0]
        shapes = ", ".join(_describe(p, x) for p, x in leaves)
        first = str(err).strip().splitlines()[0]
        raise ValueError(
            f"the model cannot take this batch ({shapes}): {first} -- make the data's feature "
            "shape match the model's input (or the model's input match the data); if they "
            "match, the mistake is in the model or loss code"
        ) from None
