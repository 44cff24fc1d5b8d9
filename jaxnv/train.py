"""The training loop: build everything from the config, run the steps, evaluate, log, summarize.

result = train(load_experiment("house_prices"), workdir="runs/house")
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnv import config as config_lib
from jaxnv.data import Dataset, StepBatches, eval_batches
from jaxnv.experiment import Experiment
from jaxnv.optim import make_optimizer, make_schedule
from jaxnv.precision import Policy, get_policy, make_loss_scale
from jaxnv.profiling import ProfileWindow, measure_peak_flops, step_flops
from jaxnv.state import TrainState, init_state, param_count
from jaxnv.step import Step, batch_spec_of, check_batch_fits, make_eval_step, make_train_step
from jaxnv.writers import Throughput, Writers, to_scalars


class Callback:
    """Hooks called on the host between steps; override what you need."""

    def on_log(self, step: int, split: str, scalars: dict[str, float], state: TrainState):
        """After each logged window (`split="train"`) and each evaluation (`"eval"`)."""

    def on_end(self, result: TrainResult):
        """Once, after the last step and the final evaluation."""


@dataclasses.dataclass
class TrainResult:
    """What a run leaves behind: final state, the pieces to use it, and its metrics."""

    state: TrainState
    graphdef: Any
    policy: Policy
    data: Dataset
    train_metrics: dict[str, float]  # the last logged window
    eval_metrics: dict[str, float]  # the final evaluation
    history: list[dict[str, Any]]  # every logged row, as written to metrics.jsonl
    seconds: float
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)


def evaluate(eval_step: Step, state: TrainState, arrays, batch_size: int) -> dict[str, float]:
    """Example-weighted mean of the eval metrics over all of `arrays` (last batch partial)."""
    totals: dict[str, float] = {}
    count = 0
    for batch, n in eval_batches(arrays, batch_size):
        metrics = to_scalars(jax.device_get(eval_step.fn(state, jax.device_put(batch))))
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v * n
        count += n
    return {k: v / count for k, v in totals.items()}


def _mean_window(window: list[dict]) -> dict[str, float]:
    rows = [to_scalars(m) for m in jax.device_get(window)]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def _learning_rate_fn(cfg):
    """The learning rate at train step `s` (optax.MultiSteps updates once every k steps)."""
    schedule, k = make_schedule(cfg.optimizer, cfg.train.steps), cfg.optimizer.accumulate_steps
    return schedule if k == 1 else (lambda s: schedule(s // k))


def tokens_per_example(batch) -> int:
    """Tokens in one example when inputs are integer tokens (language data), else 0."""
    x = batch.get("x") if isinstance(batch, dict) else None
    if x is None or not np.issubdtype(np.asarray(x).dtype, np.integer):
        return 0
    return int(np.prod(np.shape(x)[1:]))


class BestTracker:
    """The best value of one eval metric and the step it came from."""

    def __init__(self, metric: str, mode: str):
        self.metric, self.mode = metric, mode
        self.step: int | None = None
        self.value: float | None = None

    def update(self, step: int, scalars: dict[str, float]) -> bool:
        """Record `scalars` of `step`; True when it is a new best."""
        if not self.metric or self.metric not in scalars:
            return False
        v = scalars[self.metric]
        better = self.value is None or (v < self.value if self.mode == "min" else v > self.value)
        if better:
            self.step, self.value = step, v
        return better

    def summary(self) -> dict[str, Any]:
        if self.step is None:
            return {}
        return {f"best_eval_{self.metric}": self.value, "best_step": self.step}


@functools.cache
def _peak(dtype_name: str) -> float:
    return measure_peak_flops(jnp.dtype(dtype_name))


def _flops_and_peak(log, train_step: Step, state, batch, policy) -> tuple[float, float]:
    """FLOPs per step (XLA cost analysis) and the device peak (declared or measured once)."""
    if not log.mfu:
        return 0.0, 0.0
    flops = step_flops(train_step.fn, state, batch)
    peak = log.peak_flops or _peak(jnp.dtype(policy.compute_dtype).name)
    return flops, peak


def _prepare_workdir(workdir: str | None, cfg) -> None:
    if workdir is None:
        return
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        raise FileExistsError(
            f"workdir {workdir!r} already holds a run (metrics.jsonl): pass a new --workdir "
            "or remove the old one (resuming needs checkpoints, which this workdir lacks)"
        )
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config_lib.to_dict(cfg), f, indent=2)


def train(
    exp: Experiment, *, workdir: str | None = None, callbacks: list[Callback] = ()
) -> TrainResult:
    """Run the experiment to `train.steps`, writing metrics under `workdir` (if given)."""
    cfg = config_lib.validate(exp.config)
    t, loss_fn = cfg.train, exp.resolved_loss_fn()
    data = exp.make_data(cfg)
    policy = get_policy(cfg.precision.policy)
    loss_scale = make_loss_scale(
        cfg.precision.loss_scale,
        policy,
        init_scale=cfg.precision.init_scale,
        period=cfg.precision.growth_interval,
    )
    tx = make_optimizer(cfg.optimizer, t.steps)

    def model_fn(rngs):
        return exp.make_model(cfg, data, policy, rngs)

    graphdef, state = init_state(
        model_fn, tx, policy, jax.random.PRNGKey(t.seed), loss_scale=loss_scale
    )
    batches = StepBatches(data.train, t.batch_size, t.seed)
    first = batches[0]
    spec = batch_spec_of(first)
    check_batch_fits(graphdef, loss_fn, policy, state, spec)
    train_step = make_train_step(
        graphdef,
        loss_fn,
        tx,
        policy,
        learning_rate_fn=_learning_rate_fn(cfg),
        micro_batches=t.micro_batches,
        batch_spec=spec,
    )
    eval_step = make_eval_step(graphdef, loss_fn, policy)

    _prepare_workdir(workdir, cfg)
    log = cfg.logging
    writers = Writers.open(workdir, t.steps, tensorboard=log.tensorboard, progress=log.progress)
    tb_dir = os.path.join(workdir, "tensorboard") if workdir else None
    profile = ProfileWindow(log.profile_steps, tb_dir)
    speed = Throughput(0, t.batch_size, tokens_per_example(first))
    flops, peak = _flops_and_peak(log, train_step, state, first, policy)
    history: list[dict[str, Any]] = []
    best = BestTracker(t.best_metric, t.best_mode)

    def emit(step, split, scalars):
        writers.write(step, split, scalars)
        history.append({"step": step, "split": split, **scalars})
        for cb in callbacks:
            cb.on_log(step, split, scalars, state)

    start = time.perf_counter()
    window: list[dict] = []
    train_scalars: dict[str, float] = {}
    eval_scalars: dict[str, float] = {}
    try:
        for step, batch in enumerate(batches.iterate(0, t.steps)):  # prefetched by grain
            profile.before_step(step)
            with jax.transfer_guard("disallow"):  # every host<->device copy below is explicit
                state, metrics = train_step(state, jax.device_put(batch))
            window.append(metrics)  # stays on the device until the log step
            profile.after_step(step, state)
            done = step + 1
            if done % log.log_every == 0 or done == t.steps:
                train_scalars = {**_mean_window(window), **speed.tick(done)}
                if flops and peak:
                    train_scalars["mfu"] = flops * train_scalars["steps_per_sec"] / peak
                window = []
                emit(done, "train", train_scalars)
            if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
                eval_scalars = evaluate(eval_step, state, data.eval, t.eval_batch_size)
                best.update(done, eval_scalars)
                emit(done, "eval", eval_scalars)
    finally:
        profile.stop()
        writers.close()

    result = TrainResult(
        state,
        graphdef,
        policy,
        data,
        train_scalars,
        eval_scalars,
        history,
        time.perf_counter() - start,
    )
    result.summary = {
        "experiment": exp.name,
        "steps": t.steps,
        "params": param_count(state.params),
        "precision": str(policy),
        "seconds": round(result.seconds, 2),
        "flops_per_step": flops,
        **best.summary(),
        **{f"eval_{k}": v for k, v in eval_scalars.items()},
        **(exp.summarize(result) if exp.summarize else {}),
    }
    if workdir is not None:
        with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(result.summary, f, indent=2, default=float)
    for cb in callbacks:
        cb.on_end(result)
    return result
