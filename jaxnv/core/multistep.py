"""Many optimizer steps in one compiled call: a `lax.scan` of a train step over stacked batches.

    multi_step = make_multi_step(train_step.fn, state_sharding=s, batch_sharding=b)
    state, metrics = multi_step(state, batches)   # batches (K, B, ...) -> metrics {name: (K,)}

Like Keras' `steps_per_execution`: a small model's step is dominated by the dispatch of the
compiled call and the host's work around it, which a scan pays once per K steps. Each scan
iteration is the very step a single call runs (same rng folding, same update, same metrics), so
the K states and K metric rows equal those of K single calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

StepFn = Callable[[Any, Any], tuple[Any, dict]]


def stacked_sharding(batch_sharding: NamedSharding) -> NamedSharding:
    """The sharding of K batches stacked on a new leading axis: that axis unsharded, the batch
    axis (now the second) sharded as `batch_sharding` shards it."""
    return NamedSharding(batch_sharding.mesh, PartitionSpec(None, *batch_sharding.spec))


def stack_batches(batches: list) -> Any:
    """`[batch_0, ..., batch_{K-1}]` (host arrays) -> one batch of `(K, B, ...)` arrays."""
    return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def make_multi_step(
    step_fn: StepFn,
    *,
    state_sharding: Any = None,
    batch_sharding: NamedSharding | None = None,
    donate: bool = True,
) -> Callable[[Any, Any], tuple[Any, dict]]:
    """A jitted `multi_step(state, batches) -> (state, metrics)`, donating `state`.

    `batches` is a pytree of `(K, B, ...)` arrays (K consecutive steps' batches, stacked on a
    leading axis); the call runs `step_fn` K times in order and returns the last state and each
    metric stacked as `(K,)`. K is read from the batches' shape: each distinct K compiles once.
    `step_fn` is a train step `(state, batch) -> (state, metrics)` (jitted or not; a jitted one
    is inlined). `batch_sharding` is one step's batch sharding; the stack adds an unsharded axis.
    """

    def multi_step(state, batches):
        return jax.lax.scan(step_fn, state, batches)  # metrics: {name: (K,)}

    shardings = {}
    if state_sharding is not None:
        stacked = None if batch_sharding is None else stacked_sharding(batch_sharding)
        shardings = {
            "in_shardings": (state_sharding, stacked),
            "out_shardings": (state_sharding, None),
        }
    return jax.jit(multi_step, donate_argnums=(0,) if donate else (), **shardings)


def split_metrics(metrics: dict) -> list[dict]:
    """`{name: (K,) array}` (fetched to the host) -> K rows `{name: scalar}`, in step order."""
    names = list(metrics)
    if not names:
        return []
    k = len(metrics[names[0]])
    return [{n: metrics[n][i] for n in names} for i in range(k)]


def plan_calls(
    start: int, stop: int, k: int, every: Iterable[int] = (), marks: Iterable[int] = ()
) -> Iterator[tuple[int, int]]:
    """The calls `(first_step, n)` that run steps `start, ..., stop - 1`, at most `k` steps
    each, none running past a boundary: a step count that is a multiple of one of `every`
    (log, eval, checkpoint periods; 0 means none), one of `marks`, or `stop`. Whatever the loop
    does after a step (log, evaluate, save, check for preemption) then happens after a call
    whose last step is that one, with the state of that step, as with k = 1.

    >>> list(plan_calls(5, 20, 4, every=(10,)))
    [(5, 4), (9, 1), (10, 4), (14, 4), (18, 2)]
    """
    if k < 1:
        raise ValueError(f"steps per call must be >= 1, got {k}")
    every = [e for e in every if e > 0]
    marks = sorted({m for m in marks if start < m < stop})
    step = start
    while step < stop:
        nxt = min([stop, *((step // e + 1) * e for e in every), *(m for m in marks if m > step)])
        n = min(k, nxt - step)
        yield step, n
        step += n
