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
from flax import nnx

from jaxnv import __version__
from jaxnv import config as config_lib
from jaxnv.checkpoint.manager import Checkpointer
from jaxnv.checkpoint.preemption import Preempted, PreemptionGuard
from jaxnv.core.optim import make_optimizer, make_schedule
from jaxnv.core.precision import DynamicLossScale, Policy, get_policy, make_loss_scale
from jaxnv.core.state import TrainState, abstract_model, abstract_state, init_state, param_count
from jaxnv.core.step import Step, batch_spec_of, check_batch_fits, make_eval_step, make_train_step
from jaxnv.data.pipeline import StepBatches, eval_batches
from jaxnv.data.sources import Dataset
from jaxnv.experiment import Experiment
from jaxnv.parallel.distributed import is_primary
from jaxnv.parallel.mesh import Plan, batch_divisor, make_mesh, make_plan, put_batch
from jaxnv.parallel.report import compile_step, format_report
from jaxnv.train.compilation import enable_compilation_cache
from jaxnv.train.nonfinite import NonFiniteMonitor
from jaxnv.train.profiling import ProfileWindow, measure_peak_flops, step_flops
from jaxnv.train.writers import BestTracker, Throughput, Writers, to_scalars, tokens_per_example


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


def evaluate(
    eval_step: Step, state: TrainState, arrays, batch_size: int, sharding=None
) -> dict[str, float]:
    """Example-weighted mean of the eval metrics over all of `arrays` (last batch partial).

    Eval batches are replicated on `sharding`'s mesh (every process holds the whole split).
    """
    totals: dict[str, float] = {}
    count = 0
    for batch, n in eval_batches(arrays, batch_size):
        batch = jax.device_put(batch, sharding) if sharding is not None else batch
        metrics = to_scalars(jax.device_get(eval_step.fn(state, batch)))
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v * n
        count += n
    return {k: v / count for k, v in totals.items()}


def _mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


@functools.cache
def _peak(dtype_name: str) -> float:
    return measure_peak_flops(jnp.dtype(dtype_name))


def _flops_and_peak(log, run: Run, state, batch) -> tuple[float, float]:
    """Model FLOPs per step and the device peak (declared or measured once).

    A model with `flops_per_token(seq_len)` (the transformer: 6N + attention) is counted by its
    formula over the batch's tokens, the usual MFU convention, which leaves out the recomputation
    of remat. Otherwise XLA's cost analysis of the step, which counts a loop body once: it is
    multiplied by the number of micro-batches (whose loop holds nearly all the work).
    """
    if not log.mfu:
        return 0.0, 0.0
    model = nnx.merge(run.graphdef, state.params, state.model_state)
    x = batch.get("x") if isinstance(batch, dict) else None
    if hasattr(model, "flops_per_token") and x is not None and x.ndim == 2:
        flops = model.flops_per_token(x.shape[1]) * x.size
    else:
        t = run.cfg.train
        micro = micro_batches_for(
            t.batch_size, batch_divisor(run.plan.mesh), t.micro_batches, t.max_device_batch
        )
        flops = step_flops(run.train_step.fn, state, batch) * micro
    peak = log.peak_flops or _peak(jnp.dtype(run.policy.compute_dtype).name)
    return flops, peak


def _open_workdir(workdir: str, cfg, ckpt: Checkpointer | None, state, best) -> tuple[Any, int]:
    """Create the workdir, or resume from its newest checkpoint: `(state, start_step)`.

    A workdir with metrics but no checkpoint is refused (nothing on disk is overwritten). On
    resume, `metrics.jsonl` rows after the checkpoint's step are dropped so the log continues
    without duplicates.
    """
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if ckpt is not None and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        start = int(jax.device_get(state.step))
        best.load(meta.get("best", {}))
        if os.path.exists(metrics_path) and is_primary():
            with open(metrics_path, encoding="utf-8") as f:
                keep = [line for line in f if json.loads(line)["step"] <= start]
            tmp = metrics_path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(keep)
            os.replace(tmp, metrics_path)  # atomic: the old log is never half-written
        return state, start
    if os.path.exists(metrics_path) and os.path.getsize(metrics_path) > 0:
        raise FileExistsError(
            f"workdir {workdir!r} already holds a run without checkpoints: pass a new --workdir "
            "or remove the old one"
        )
    os.makedirs(workdir, exist_ok=True)
    if is_primary():
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config_lib.to_dict(cfg), f, indent=2)
    return state, 0


def micro_batches_for(batch: int, ways: int, micro: int, max_device_batch: int) -> int:
    """Micro-batches per step so that each device's share of one is <= `max_device_batch`.

    The optimizer always sees the whole global `batch`; only the accumulation changes.
    """
    if batch % ways:
        raise config_lib.ConfigError(
            f"train.batch_size={batch} does not split over mesh data*fsdp={ways}: "
            f"use a multiple of {ways}"
        )
    per_device = batch // ways
    k = micro
    while per_device % k or (max_device_batch and per_device // k > max_device_batch):
        k += 1
        if k > per_device:
            raise config_lib.ConfigError(
                f"train.batch_size={batch} gives {per_device} examples per device, which does not "
                f"split into train.micro_batches={micro}: use a batch of {ways * micro}*n"
            )
    return k


@dataclasses.dataclass
class Run:
    """Everything built from a config before the first step."""

    cfg: config_lib.Config
    data: Dataset
    policy: Policy
    graphdef: Any
    state: TrainState
    batches: StepBatches
    train_step: Step
    eval_step: Step
    plan: Plan  # mesh, state and batch shardings, the per-param table


def build(exp: Experiment, devices=None, *, abstract: bool = False) -> Run:
    """Data, policy, optimizer, initial state and compiled steps for an experiment.

    The mesh spans `devices` (default: all devices of all processes). With `abstract=True` the
    state is only shapes and shardings (`jax.ShapeDtypeStruct`s): nothing is allocated, which is
    what a dry run needs.
    """
    enable_compilation_cache()  # $JAXNV_COMPILATION_CACHE, else ~/.cache/jaxnv/xla; "off": none
    cfg = config_lib.validate(exp.config)
    t, loss_fn = cfg.train, exp.resolved_loss_fn()
    data = exp.make_data(cfg)
    policy = get_policy(cfg.precision.policy)
    p = cfg.precision
    loss_scale = make_loss_scale(
        p.loss_scale, policy, init_scale=p.init_scale, period=p.growth_interval
    )
    updates = t.steps // cfg.optimizer.accumulate_steps  # MultiSteps updates once every k steps
    tx = make_optimizer(cfg.optimizer, updates)

    def model_fn(rngs):
        return exp.make_model(cfg, data, policy, rngs)

    rng = jax.random.PRNGKey(t.seed)
    mesh = make_mesh(cfg.mesh, devices)
    ways = batch_divisor(mesh)
    micro = micro_batches_for(t.batch_size, ways, t.micro_batches, t.max_device_batch)
    if ways % jax.process_count():
        raise config_lib.ConfigError(
            f"mesh data*fsdp={ways} does not split over {jax.process_count()} processes: each "
            "process feeds its own rows, so make data*fsdp a multiple of the process count"
        )
    template = abstract_state(model_fn, tx, policy, rng, loss_scale=loss_scale)
    plan = make_plan(abstract_model(model_fn), template, mesh, cfg.mesh.rules)
    if abstract:
        graphdef = nnx.graphdef(abstract_model(model_fn))
        state = jax.tree.map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), template, plan.state
        )
    else:  # each device creates only its own shards
        graphdef, state = init_state(
            model_fn, tx, policy, rng, loss_scale=loss_scale, out_shardings=plan.state
        )
    batches = StepBatches(
        data.train,
        t.batch_size,
        t.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    spec = batch_spec_of(batches[0])
    check_batch_fits(graphdef, loss_fn, policy, state, spec)  # one-line error, before compiling
    train_step = make_train_step(
        graphdef,
        loss_fn,
        tx,
        policy,
        learning_rate_fn=make_schedule(cfg.optimizer, updates),
        micro_batches=micro,
        batch_spec=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), spec),
        state_sharding=plan.state,
        batch_sharding=plan.batch,
    )
    eval_step = make_eval_step(graphdef, loss_fn, policy)
    return Run(cfg, data, policy, graphdef, state, batches, train_step, eval_step, plan)


def train(
    exp: Experiment,
    *,
    workdir: str | None = None,
    callbacks: list[Callback] = (),
    devices=None,
) -> TrainResult:
    """Run the experiment to `train.steps`, writing metrics and checkpoints under `workdir`.

    A workdir that holds checkpoints is resumed from the newest one, exactly: the data position,
    rng and loss scale all follow from the restored state.
    """
    run = build(exp, devices)
    # the mesh in context lets model code constrain activations (transformer.batch_sharded)
    with jax.set_mesh(run.plan.mesh):
        return _train(exp, run, workdir, callbacks)


def _train(exp: Experiment, run: Run, workdir: str | None, callbacks) -> TrainResult:
    cfg, t, log, state = run.cfg, run.cfg.train, run.cfg.logging, run.state
    best = BestTracker(t.best_metric, t.best_mode)
    ckpt, start = None, 0
    if workdir is not None:
        c = cfg.checkpoint
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=c.every, keep=c.keep)
        state, start = _open_workdir(workdir, cfg, ckpt, state, best)
        if start >= t.steps:  # already finished: report, write nothing
            ckpt.close()
            return _finished(exp, run, state, start)
    primary = is_primary()  # only process 0 writes logs and metrics
    writers = Writers.open(
        workdir if primary else None,
        t.steps,
        tensorboard=log.tensorboard,
        progress=log.progress,
        console=primary,
    )
    writers.start_at(start)
    tb_dir = os.path.join(workdir, "tensorboard") if workdir and primary else None
    profile = ProfileWindow(log.profile_steps, tb_dir)
    first = run.batches[start]
    speed = Throughput(start, t.batch_size, tokens_per_example(first))
    if primary and log.progress:
        # collectives are read from a compiled step: only worth a compilation on a real mesh
        many = run.plan.mesh.size > 1
        print(format_report(run, compile_step(run) if many else None), flush=True)
    flops, peak = _flops_and_peak(log, run, state, first)
    history: list[dict[str, Any]] = []

    def emit(step, split, scalars):
        writers.write(step, split, scalars)
        history.append({"step": step, "split": split, **scalars})
        for cb in callbacks:
            cb.on_log(step, split, scalars, state)

    def meta(step):
        return {
            "step": step,
            "config": config_lib.to_dict(cfg),
            "version": __version__,
            "best": best.state_dict(),
        }

    started = time.perf_counter()
    window: list[dict] = []
    train_scalars: dict[str, float] = {}
    eval_scalars: dict[str, float] = {}
    guard = PreemptionGuard(sync_every=log.log_every).__enter__()
    monitor = NonFiniteMonitor(t.on_nonfinite, isinstance(state.loss_scale, DynamicLossScale))
    segment: int | None = start  # where the batches start; a rollback starts a new segment
    try:
        while segment is not None:
            first, segment = segment, None
            # batches are gathered and copied to the devices by background threads, ahead of use
            feed = run.batches.iterate(first, t.steps, put=lambda b: put_batch(b, run.plan.batch))
            for step, batch in enumerate(feed, first):
                profile.before_step(step)
                with jax.transfer_guard("disallow"):  # nothing may move implicitly
                    state, metrics = run.train_step(state, batch)
                window.append(metrics)  # stays on the device until the log step
                profile.after_step(step, state)
                done = step + 1
                if done % log.log_every == 0 or done == t.steps:
                    rows = [to_scalars(m) for m in jax.device_get(window)]
                    bad, n_bad = monitor.first_bad(done - len(rows) + 1, rows)
                    train_scalars = {**_mean_rows(rows), **speed.tick(done)}
                    if flops and peak:
                        train_scalars["mfu"] = flops * train_scalars["steps_per_sec"] / peak
                    window = []
                    emit(done, "train", train_scalars)
                    if bad is not None and ckpt is not None:
                        ckpt.wait()  # every process sees the same committed steps
                    last_good = ckpt.latest_step() if bad is not None and ckpt else None
                    if bad is not None and monitor.should_rollback(bad, last_good, n_bad):
                        state, _ = ckpt.restore(state, last_good)
                        # go on after this logged window: its batches, the bad one among them,
                        # are skipped, and the log's steps keep increasing
                        step_array = jax.device_put(np.int32(done), state.step.sharding)
                        state = state.replace(step=step_array)
                        segment = done if done < t.steps else None
                if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
                    eval_scalars = evaluate(
                        run.eval_step, state, run.data.eval, t.eval_batch_size, run.plan.replicated
                    )
                    best.update(done, eval_scalars)
                    emit(done, "eval", eval_scalars)
                stop = guard.should_stop(done)  # SIGTERM/SIGINT: save this step, then leave
                if ckpt is not None:
                    ckpt.maybe_save(done, state, meta(done), force=done == t.steps or stop)
                if stop:
                    raise Preempted(done, guard.signum)
                if segment is not None:  # rolled back: restart the feed after this window
                    break
    finally:
        guard.__exit__()
        profile.stop()
        writers.close()
        if ckpt is not None:
            ckpt.close()  # waits for the last save to commit

    result = TrainResult(
        state,
        run.graphdef,
        run.policy,
        run.data,
        train_scalars,
        eval_scalars,
        history,
        time.perf_counter() - started,
    )
    result.summary = {
        "experiment": exp.name,
        "steps": t.steps,
        "resumed_from": start,
        "params": param_count(state.params),
        "precision": str(run.policy),
        "seconds": round(result.seconds, 2),
        "flops_per_step": flops,
        "nonfinite_skipped": monitor.skipped,
        "rollbacks": monitor.rollbacks,
        **best.summary(),
        **{f"eval_{k}": v for k, v in eval_scalars.items()},
        **(exp.summarize(result) if exp.summarize else {}),
    }
    if workdir is not None and primary:
        with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(result.summary, f, indent=2, default=float)
    for cb in callbacks:
        cb.on_end(result)
    return result


def _finished(exp: Experiment, run: Run, state, step: int) -> TrainResult:
    """The result of a run restored at or past `train.steps`; nothing on disk changes."""
    metrics = evaluate(
        run.eval_step, state, run.data.eval, run.cfg.train.eval_batch_size, run.plan.replicated
    )
    result = TrainResult(state, run.graphdef, run.policy, run.data, {}, metrics, [], 0.0)
    result.summary = {
        "experiment": exp.name,
        "steps": run.cfg.train.steps,
        "resumed_from": step,
        "note": f"already trained to step {step}; raise train.steps to continue",
        **{f"eval_{k}": v for k, v in metrics.items()},
    }
    return result


def evaluate_workdir(exp: Experiment, workdir: str, devices=None) -> tuple[int, dict[str, float]]:
    """Restore the newest checkpoint in `workdir` and evaluate it on the held-out split."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir} does not exist: pass the --workdir of a trained run")
    run = build(exp, devices)
    ckpt = Checkpointer(ckpt_dir)
    try:
        state, _ = ckpt.restore(run.state)
    finally:
        ckpt.close()
    metrics = evaluate(
        run.eval_step, state, run.data.eval, run.cfg.train.eval_batch_size, run.plan.replicated
    )
    return int(jax.device_get(state.step)), metrics
