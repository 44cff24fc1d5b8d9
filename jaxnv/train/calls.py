"""Steps grouped into compiled calls (`train.steps_per_call=K`) for the loop: the plan of calls,
their batches stacked and placed ahead of time, the compiled K-step scan, and the logged rows."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import grain
import jax
import numpy as np

from jaxnv import config as config_lib
from jaxnv.core.multistep import (
    make_multi_step,
    plan_calls,
    split_metrics,
    stack_batches,
    stacked_sharding,
)
from jaxnv.data.pipeline import StepBatches
from jaxnv.parallel.mesh import put_batch
from jaxnv.train.profiling import ProfileWindow
from jaxnv.train.writers import to_scalars

if TYPE_CHECKING:  # annotations only: the loop imports this module
    from jaxnv.train.loop import Run


class Calls:
    """How the loop groups steps into compiled calls (`train.steps_per_call=K`): the plan of
    calls, each ending at or before the next log, eval, save or profile boundary; their batches,
    stacked `(n, B, ...)` on the devices by background threads; and the compiled n-step scan."""

    def __init__(self, run: Run, ckpt, profile: ProfileWindow, per_step: list):
        cfg, t = run.cfg, run.cfg.train
        k = t.steps_per_call
        if not isinstance(k, int) or k < 1:
            raise config_lib.ConfigError(
                f"train.steps_per_call={k!r} must be an integer >= 1 (1: one step a call)"
            )
        self._run, self.notes = run, []
        if k > 1 and per_step:  # on_step sees every step's state: only one step a call can
            self.notes.append(
                f"train.steps_per_call={k} ignored: callbacks with on_step "
                f"({', '.join(type(cb).__name__ for cb in per_step)}) see each step, so every "
                "step runs as its own call"
            )
            k = 1
        self.every = [cfg.logging.log_every]
        if run.eval_data is not None:
            self.every.append(t.eval_every)
        if ckpt is not None:
            self.every.append(ckpt.every)
        self.marks = profile.window or ()
        odd = [e for e in self.every if e and e % k and e < t.steps]
        if k > 1 and odd:
            self.notes.append(
                f"train.steps_per_call={k} does not divide the log/eval/save periods {odd}: "
                "calls are cut short at those steps (each new length compiles once); make the "
                f"periods multiples of {k} for full-length calls"
            )
        self.k = k
        self.stacked = stacked_sharding(run.plan.batch)
        self.multi = _multi_step(run) if k > 1 else None

    def run(self, state, batch, n: int):
        """`n` steps on `batch` (n > 1: `(n, B, ...)` stacked): `(state, metrics)`."""
        return self._run.train_step(state, batch) if n == 1 else self.multi(state, batch)

    def _put(self, batch, n: int):
        """One step's host batch, or `n > 1` steps' stacked `(n, B, ...)`, placed."""
        return put_batch(batch, self._run.plan.batch if n == 1 else self.stacked)

    def feed(self, start: int, stop: int):
        """`(first_step, n, batch)` for every call from `start` to `stop`."""
        batches, plan = self._run.batches, self._run.plan
        if self.k == 1:  # one step a call: the feed's own chunked preparation
            feed = batches.iterate(start, stop, put=lambda b: put_batch(b, plan.batch))
            return ((step, 1, batch) for step, batch in enumerate(feed, start))
        calls = list(plan_calls(start, stop, self.k, self.every, self.marks))
        if isinstance(batches, StepBatches):  # random access: gather a call's steps at once

            def prepare(group):  # a few calls a grain element: its per-element cost is shared
                return [(s, n, self._put(batches.local_steps(s, n), n)) for s, n in group]

            groups = _groups(calls, max(self.k, 32))
            options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
            prepared = grain.MapDataset.source(groups).map(prepare).to_iter_dataset(options)
            return (call for group in prepared for call in group)
        return self._grouped(batches.iterate(start, stop), calls)

    def _grouped(self, feed, calls):
        """Sequential feeds: the next n host batches of each call, stacked and placed."""
        feed = iter(feed)
        for first, n in calls:
            rows = [next(feed) for _ in range(n)]
            yield first, n, self._put(rows[0] if n == 1 else stack_batches(rows), n)


_MULTI_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _multi_step(run: Run):
    """The n-step scan of `run`'s train step, made once per step (a run trained again, as a
    benchmark does, reuses its compilations)."""
    fn = _MULTI_STEPS.get(run.train_step)
    if fn is None:
        fn = make_multi_step(
            run.train_step.fn, state_sharding=run.plan.state, batch_sharding=run.plan.batch
        )
        _MULTI_STEPS[run.train_step] = fn
    return fn


def _groups(calls: list, steps: int) -> list[list]:
    """Consecutive calls grouped so that each group runs about `steps` steps."""
    groups, group, size = [], [], 0
    for call in calls:
        group.append(call)
        size += call[1]
        if size >= steps:
            groups.append(group)
            group, size = [], 0
    return groups + [group] if group else groups


def host_rows(window: list[dict]) -> list[dict[str, float]]:
    """The logging window's rows on the host, one a step: a call of n > 1 steps left one entry
    of `(n,)` metrics, split here into its n rows."""
    rows = []
    for m in jax.device_get(window):
        if any(np.ndim(v) for v in m.values()):
            rows += [to_scalars(r) for r in split_metrics(m)]
        else:
            rows.append(to_scalars(m))
    return rows
