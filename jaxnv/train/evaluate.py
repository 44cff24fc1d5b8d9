"""Evaluation: exact weighted means over an eval set, and custom evaluators' metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import jax
from flax import nnx

from jaxnv.core.state import TrainState
from jaxnv.core.step import EvalStep
from jaxnv.data.pipeline import eval_batches
from jaxnv.data.sources import Dataset
from jaxnv.train.writers import to_scalars

if TYPE_CHECKING:  # annotations only: the loop imports this module
    from jaxnv.train.loop import Run


def _eval_iter(data, batch_size: int | None):
    """Batches of an evaluation set: arrays sliced in order, or a re-iterable of batches."""
    if isinstance(data, Dataset):
        data = data.eval
    if isinstance(data, Mapping):
        return (batch for batch, _ in eval_batches(dict(data), batch_size or 256))
    if callable(data):
        return iter(data())
    return iter(data)


def evaluate(
    eval_step: EvalStep, state: TrainState, data, batch_size: int | None = None, sharding=None
) -> dict[str, float]:
    """The eval metrics over all of `data`, each batch weighted by its loss's weight (the example
    count for a plain mean): the exact mean over examples or tokens. `data` is a dict of arrays
    (sliced into `batch_size` batches, the last partial) or a re-iterable of batches. Eval batches
    are replicated on `sharding`'s mesh (every process holds the whole split)."""
    totals: dict[str, float] = {}
    weight = 0.0
    for batch in _eval_iter(data, batch_size):
        batch = jax.device_put(batch, sharding) if sharding is not None else batch
        metrics, w = jax.device_get(eval_step.fn(state, batch))
        w = float(w)
        for k, v in to_scalars(metrics).items():
            totals[k] = totals.get(k, 0.0) + v * w
        weight += w
    if not totals:
        raise ValueError("the evaluation data yielded no batches: give at least one")
    return {k: v / weight if weight else 0.0 for k, v in totals.items()}


def evaluate_run(run: Run, state) -> dict[str, float]:
    """The eval step's metrics over the eval data, then each custom evaluator's."""
    metrics = evaluate(
        run.eval_step, state, run.eval_data, run.cfg.train.eval_batch_size, run.plan.replicated
    )
    if run.evaluators:
        model = nnx.merge(run.graphdef, state.params, state.model_state)
        model.eval()
        for name, fn in run.evaluators.items():
            extra = fn(model, run.eval_data)
            if not isinstance(extra, Mapping):
                raise TypeError(f"evaluator {name!r} returned {type(extra).__name__}, not a dict")
            metrics.update({k: float(v) for k, v in extra.items()})
    return metrics
