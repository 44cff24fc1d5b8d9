"""The one training loop, behind `fit` (any NNX model, any data) and `jaxnv train` (a config).

    result = train(load_experiment("house_prices"), workdir="runs/house")

Both this and `fit` (train/fit.py) build a `Run` (policy, mesh plan, abstract state, compiled
steps, batches) and hand it to `_train`, which resumes from the workdir's newest checkpoint or
initialises, runs the steps, evaluates, logs, saves and finishes with a summary.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grain
import jax
import numpy as np
from flax import nnx

from jaxnv import __version__
from jaxnv import config as config_lib
from jaxnv.checkpoint.manager import Checkpointer
from jaxnv.checkpoint.preemption import Preempted, PreemptionGuard
from jaxnv.checkpoint.pretrained import pretrained_base, pretrained_params
from jaxnv.core.optim import make_optimizer, make_schedule
from jaxnv.core.precision import (
    DynamicLossScale,
    Policy,
    backend_notes,
    get_policy,
    make_loss_scale,
)
from jaxnv.core.state import (
    TrainState,
    abstract_model,
    abstract_state,
    init_state,
    param_count,
    path_str,
    split_model,
)
from jaxnv.core.step import (
    EvalStep,
    Step,
    batch_spec_of,
    check_batch_fits,
    make_eval_step,
    make_train_step,
)
from jaxnv.data.pipeline import IndexedBatches, IterableBatches, StepBatches
from jaxnv.data.sources import Dataset
from jaxnv.experiment import Experiment
from jaxnv.models.lora import apply_lora, check_lora
from jaxnv.parallel.distributed import is_primary
from jaxnv.parallel.mesh import Plan, batch_divisor, make_mesh, make_plan
from jaxnv.parallel.report import compile_step, format_report
from jaxnv.train.callbacks import Callback, EarlyStopping, StepInfo  # noqa: F401 (re-exported)
from jaxnv.train.calls import Calls, host_rows
from jaxnv.train.evaluate import evaluate_run
from jaxnv.train.nonfinite import NonFiniteMonitor
from jaxnv.train.profiling import ProfileWindow, flops_and_peak
from jaxnv.train.workdir import data_state, resume_or_init, write_json
from jaxnv.train.writers import BestTracker, Throughput, Writers, to_scalars, tokens_per_example

TIMING_KEYS = ("steps_per_sec", "examples_per_sec", "tokens_per_sec", "mfu")  # differ run to run


@dataclasses.dataclass
class TrainResult:
    """What a run leaves behind: final state, the pieces to use it, and its metrics."""

    state: TrainState
    graphdef: Any
    policy: Policy
    data: Dataset | None
    train_metrics: dict[str, float]  # the last logged window
    eval_metrics: dict[str, float]  # the final evaluation
    history: list[dict[str, Any]]  # every logged row, as written to metrics.jsonl
    seconds: float
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def model(self) -> nnx.Module:
        """The trained model (params in the param dtype), in eval mode."""
        model = nnx.merge(self.graphdef, self.state.params, self.state.model_state)
        model.eval()
        return model


def _mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def micro_batches_for(batch: int, ways: int, micro: int, max_device_batch: int) -> int:
    """Micro-batches per step: `micro`, or with `max_device_batch` the fewest (at least `micro`)
    that keep each device's share of one at most that many examples.

    The optimizer always sees the whole global `batch`; only the accumulation changes.
    """
    if batch % ways:
        raise config_lib.ConfigError(
            f"train.batch_size={batch} does not split over mesh data*fsdp={ways}: "
            f"use a multiple of {ways}"
        )
    per_device = batch // ways
    if per_device % micro:
        raise config_lib.ConfigError(
            f"train.batch_size={batch} gives {per_device} examples per device, which does not "
            f"split into train.micro_batches={micro}: use a batch of {ways * micro}*n"
        )
    k = micro
    while max_device_batch and per_device // k > max_device_batch or per_device % k:
        k += 1
    return k


@dataclasses.dataclass
class Run:
    """Everything built before the first step. `state` is concrete, or (`abstract=True`) shapes
    and shardings only, which `init()` or a checkpoint restore then fill."""

    cfg: config_lib.Config
    data: Dataset | None
    policy: Policy
    graphdef: Any
    state: TrainState
    batches: StepBatches | IndexedBatches | IterableBatches
    train_step: Step
    eval_step: EvalStep
    plan: Plan  # mesh, state and batch shardings, the per-param table
    init: Callable[[], TrainState] | None = None
    eval_data: Any = None  # arrays, a re-iterable of batches, or None (no evaluation)
    micro_batches: int = 1
    name: str = "custom"
    summarize: Callable[[TrainResult], dict] | None = None
    evaluators: Mapping[str, Callable] = dataclasses.field(default_factory=dict)


def _global_spec(batches, process_count: int):
    """The global batch's shapes: StepBatches hold the global batch, other feeds this process's
    rows (stacked over processes)."""
    spec = batch_spec_of(batches.sample())
    if getattr(batches, "holds_global", False) or process_count == 1:
        return spec
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((x.shape[0] * process_count, *x.shape[1:]), x.dtype), spec
    )


def _assemble(cfg, model, loss_fn, batches, tx, learning_rate_fn, policy, loss_scale, devices,
              abstract, **extra) -> Run:  # fmt: skip
    """The Run of a model (factory or module), loss, batches and optimizer on `cfg`'s mesh."""
    t = cfg.train
    rng = jax.random.PRNGKey(t.seed)
    mesh = make_mesh(cfg.mesh, devices)
    ways = batch_divisor(mesh)
    if ways % jax.process_count():
        raise config_lib.ConfigError(
            f"mesh data*fsdp={ways} does not split over {jax.process_count()} processes: each "
            "process feeds its own rows, so make data*fsdp a multiple of the process count"
        )
    spec = _global_spec(batches, jax.process_count())
    batch = jax.tree.leaves(spec)[0].shape[0]
    micro = micro_batches_for(batch, ways, t.micro_batches, t.max_device_batch)
    model = with_lora(model, cfg.lora, policy, t.seed)  # lora.rank > 0: adapters, base frozen
    shapes = abstract_model(model)
    template = abstract_state(model, tx, policy, rng, loss_scale=loss_scale)
    plan = _make_plan(shapes, template, mesh, cfg.mesh.rules)
    graphdef = split_model(shapes)[0]

    def init() -> TrainState:  # each device creates only its own shards
        state = init_state(model, tx, policy, rng, loss_scale=loss_scale, out_shardings=plan.state)
        state = state[1]
        init_from = getattr(cfg.model, "init_from", "")
        if not init_from:
            return state
        kw = dict(policy=policy, mesh=mesh, rules=cfg.mesh.rules, max_seq_len=shapes.max_seq_len)
        if state.frozen:  # LoRA: the pretrained weights are the frozen base
            model_state = pretrained_base(init_from, state, plan.state.model_state, **kw)
            return state.replace(model_state=model_state)
        # the weights of a pretrained checkpoint, on the run's own shardings
        params = pretrained_params(init_from, state.params, plan.state.params, **kw)
        return state.replace(params=params)

    placed = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), template, plan.state
    )
    check_batch_fits(graphdef, loss_fn, policy, placed, spec)  # one line, before compiling
    train_step = make_train_step(
        graphdef,
        loss_fn,
        tx,
        policy,
        learning_rate_fn=learning_rate_fn,
        micro_batches=micro,
        batch_spec=spec,
        state_sharding=plan.state,
        batch_sharding=plan.batch,
    )
    eval_step = make_eval_step(graphdef, loss_fn, policy)
    state = placed if abstract else init()
    if abstract and template.frozen:  # LoRA: checkpoints hold no base; a restore takes run.state's
        made = [init()]  # made once: the fresh start uses it too
        state = placed.replace(model_state=made[0].model_state)
        init = functools.partial(lambda make: made.pop() if made else make(), init)
    return Run(
        cfg, extra.pop("data", None), policy, graphdef, state, batches, train_step, eval_step,
        plan, init=init, micro_batches=micro, **extra,
    )  # fmt: skip


def with_lora(model, lora: config_lib.LoRAConfig, policy: Policy, seed: int):
    """`model` (a factory or a module) with LoRA adapters in the policy's param dtype when
    `lora.rank > 0` (a module is copied: the caller's keeps none); else `model` itself."""
    check_lora(lora)
    if not lora.rank:
        return model
    kw = dict(dtype=policy.param_dtype)
    if isinstance(model, nnx.Module):  # new modules over the same (never written) variables
        return apply_lora(nnx.merge(*nnx.split(model)), lora, rngs=nnx.Rngs(seed), **kw)
    return lambda rngs: apply_lora(model(rngs), lora, rngs=rngs, **kw)


def _make_plan(shapes, template: TrainState, mesh, rules) -> Plan:
    """`make_plan`, with a LoRA run's frozen base (in `model_state`) sharded by its weights'
    logical names like the params it would be in a full fine-tune."""
    if not template.frozen:
        return make_plan(shapes, template, mesh, rules)
    every = nnx.to_pure_dict(nnx.state(shapes, nnx.Param))  # adapters and base
    plan = make_plan(shapes, template.replace(params=every), mesh, rules)
    flat = {path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(plan.state.params)}
    params = jax.tree_util.tree_map_with_path(lambda p, _: flat[path_str(p)], template.params)
    return dataclasses.replace(plan, state=plan.state.replace(params=params))


def _train_batches(data: Dataset, t: config_lib.TrainConfig):
    """The training feed of a Dataset: arrays are shuffled and batched per step; a Dataset of
    files carries its own step-indexed batches or a grain stream (jaxnv.data.text)."""
    if isinstance(data.train, Mapping):
        return StepBatches(
            data.train,
            t.batch_size,
            t.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    if isinstance(data.train, grain.IterDataset):
        return IterableBatches(data.train)
    return data.train  # step-indexed batches (holds_global): the StepBatches contract


def build(exp: Experiment, devices=None, *, abstract: bool = False) -> Run:
    """Data, policy, optimizer, initial state and compiled steps for an experiment.

    The mesh spans `devices` (default: all devices of all processes). With `abstract=True` the
    state is only shapes and shardings (`jax.ShapeDtypeStruct`s): nothing is allocated, which is
    what a dry run and a restore need.
    """
    cfg = config_lib.validate(exp.config)
    t = cfg.train
    data = exp.make_data(cfg)
    policy = get_policy(cfg.precision.policy)
    p = cfg.precision
    loss_scale = make_loss_scale(
        p.loss_scale, policy, init_scale=p.init_scale, period=p.growth_interval
    )
    updates = t.steps // cfg.optimizer.accumulate_steps  # MultiSteps updates once every k steps
    return _assemble(
        cfg,
        lambda rngs: exp.make_model(cfg, data, policy, rngs),
        exp.resolved_loss_fn(),
        _train_batches(data, t),
        make_optimizer(cfg.optimizer, updates),
        make_schedule(cfg.optimizer, updates),
        policy,
        loss_scale,
        devices,
        abstract,
        data=data,
        eval_data=data.eval,
        name=exp.name,
        summarize=exp.summarize,
    )


def train(
    exp: Experiment,
    *,
    workdir: str | None = None,
    callbacks: Iterable[Callback] = (),
    devices=None,
) -> TrainResult:
    """Run the experiment to `train.steps`, writing metrics and checkpoints under `workdir`.

    A workdir that holds checkpoints is resumed from the newest one, exactly: the data position,
    rng, loss scale and the logged windows all follow from the restored checkpoint.
    """
    return _train(build(exp, devices, abstract=True), workdir, list(callbacks))


def _overrides(cb: Callback, name: str) -> bool:
    return getattr(type(cb), name) is not getattr(Callback, name)


def _train(run: Run, workdir: str | None, callbacks: list[Callback]) -> TrainResult:
    """Resume or initialise, then run the steps with the mesh in context (model code may
    constrain activations by it, e.g. transformer.batch_sharded)."""
    cfg, t = run.cfg, run.cfg.train
    best = BestTracker(t.best_metric, t.best_mode)
    ckpt = None
    if workdir is not None:
        c = cfg.checkpoint
        ckpt = Checkpointer(
            os.path.join(workdir, "checkpoints"),
            every=c.every,
            keep=c.keep,
            keep_best=c.keep_best,
            best_metric=t.best_metric or "loss",
            best_mode=t.best_mode,
        )
    try:
        state, start, restored = resume_or_init(run, workdir, ckpt, best)
    except BaseException:
        if ckpt is not None:
            ckpt.close()
        raise
    with jax.set_mesh(run.plan.mesh):
        if start >= t.steps:  # already finished: report, write nothing
            if ckpt is not None:
                ckpt.close()
            return _finished(run, state, start)
        return _steps(run, workdir, callbacks, ckpt, best, state, start, restored)


def _steps(run, workdir, callbacks, ckpt, best, state, start, restored) -> TrainResult:
    """The loop proper: steps, logging windows, evaluation, checkpoints, hooks; the summary."""
    cfg, t, log = run.cfg, run.cfg.train, run.cfg.logging
    primary = is_primary()  # only process 0 writes logs and metrics
    first = run.batches.sample()
    tb_dir = os.path.join(workdir, "tensorboard") if workdir and primary else None
    profile = ProfileWindow(log.profile_steps, tb_dir)
    per_step = [cb for cb in callbacks if _overrides(cb, "on_step")]
    calls = Calls(run, ckpt, profile, per_step)  # train.steps_per_call: steps per compiled call
    if primary:  # start-up lines first, then the progress bar
        lines = []
        if log.progress:
            # collectives are read from a compiled step: only worth a compilation on a real mesh
            many = run.plan.mesh.size > 1
            lines.append(format_report(run, compile_step(run) if many else None))
        lines += [n for n in (run.plan.unnamed_note(), *backend_notes(run.policy)) if n]
        lines += calls.notes
        if start:
            lines.append(f"resuming from step {start} (checkpoint {ckpt.directory}/{start})")
        if lines:
            print("\n".join(lines), flush=True)
    writers = Writers.open(
        workdir if primary else None,
        t.steps,
        tensorboard=log.tensorboard,
        progress=log.progress,
        console=primary,
        purge_step=start or None,  # TensorBoard drops the points a resumed run writes again
    )
    writers.start_at(start)
    speed = Throughput(start, t.batch_size, tokens_per_example(first))
    flops, peak = flops_and_peak(log, run, state, _global_sample(run, first))
    history: list[dict[str, Any]] = []

    def emit(step, split, scalars):
        writers.write(step, split, scalars)
        history.append({"step": step, "split": split, **scalars})
        for cb in callbacks:
            cb.on_log(step, split, scalars, state)

    def meta(step, window):
        return {
            "step": step,
            "config": config_lib.to_dict(cfg),
            "version": __version__,
            "best": best.state_dict(),
            # the open logging window's rows: a resumed run logs what an uninterrupted one does
            "window": host_rows(window),
            # where a stream that can say so stands (a grain iterator); None for the others
            "data": data_state(run.batches),
        }

    started = time.perf_counter()
    window: list[dict] = list(restored.get("window", []))  # host rows restored, device rows new
    train_scalars: dict[str, float] = {}
    eval_scalars: dict[str, float] = {}
    guard = PreemptionGuard(sync_every=log.log_every).__enter__()
    monitor = NonFiniteMonitor(t.on_nonfinite, isinstance(state.loss_scale, DynamicLossScale))
    segment: int | None = start  # where the batches start; a rollback starts a new segment
    try:
        while segment is not None:
            first_step, segment = segment, None
            # batches are gathered and copied to the devices by background threads, ahead of use;
            # a call runs n steps (n > 1: their batches stacked), never past a log, eval or
            # save step, so everything below sees the same steps as with one step a call
            for step, n, batch in calls.feed(first_step, t.steps):
                profile.before_step(step)
                with jax.transfer_guard("disallow"):  # nothing may move implicitly
                    state, metrics = calls.run(state, batch, n)
                window.append(metrics)  # stays on the device until the log step; n > 1: (n,)
                profile.after_step(step + n - 1, state)
                done = step + n
                stop = False
                if per_step:
                    info = StepInfo(done, to_scalars(jax.device_get(metrics)), state)
                    stop = any([bool(cb.on_step(info)) for cb in per_step])  # all hooks run
                if done % log.log_every == 0 or done == t.steps:
                    rows = host_rows(window)
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
                evaluated = None
                if run.eval_data is not None and (
                    (t.eval_every and done % t.eval_every == 0) or done == t.steps
                ):
                    eval_scalars = evaluated = evaluate_run(run, state)
                    best.update(done, eval_scalars)
                    emit(done, "eval", eval_scalars)
                    asked = [bool(cb.on_eval(done, eval_scalars, state)) for cb in callbacks]
                    stop = stop or any(asked)
                preempted = guard.should_stop(done)  # SIGTERM/SIGINT: save this step, then leave
                stop = stop or preempted
                if ckpt is not None:
                    force = done == t.steps or stop or bool(evaluated and cfg.checkpoint.keep_best)
                    # meta is built only for a save: it fetches the window's metrics
                    snapshot = functools.partial(meta, done, window)
                    if ckpt.maybe_save(done, state, snapshot, force=force, metrics=evaluated):
                        for cb in callbacks:
                            cb.on_save(done, ckpt.directory)
                if preempted:
                    raise Preempted(done, guard.signum)
                if stop:
                    break
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
        "experiment": run.name,
        "steps": t.steps,
        "resumed_from": start,
        "params": param_count(state.params),
        "precision": str(run.policy),
        "seconds": round(result.seconds, 2),
        "flops_per_step": flops * run.plan.mesh.size,
        "nonfinite_skipped": monitor.skipped,
        "rollbacks": monitor.rollbacks,
        **best.summary(),
        **{f"eval_{k}": v for k, v in eval_scalars.items()},
        **_summarize(run, result),
    }
    if workdir is not None and primary:
        write_json(os.path.join(workdir, "summary.json"), result.summary)
    for cb in callbacks:
        cb.on_end(result)
    return result


def _summarize(run: Run, result: TrainResult) -> dict:
    """The experiment's own summary lines; a failing hook is a warning, never a failed run."""
    if not run.summarize:
        return {}
    try:
        return run.summarize(result)
    except Exception as err:  # the run itself finished: keep its checkpoint and logs
        print(f"jaxnv: warning: summarize failed ({type(err).__name__}: {err})", flush=True)
        return {"summarize_error": f"{type(err).__name__}: {err}"}


def _global_sample(run: Run, sample):
    """A global batch of the feed's shapes, for counting FLOPs."""
    if getattr(run.batches, "holds_global", False):
        return sample
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), run.train_step.batch_spec)


def _finished(run: Run, state, step: int) -> TrainResult:
    """The result of a run restored at or past `train.steps`; nothing on disk changes."""
    metrics = evaluate_run(run, state) if run.eval_data is not None else {}
    result = TrainResult(state, run.graphdef, run.policy, run.data, {}, metrics, [], 0.0)
    result.summary = {
        "experiment": run.name,
        "steps": run.cfg.train.steps,
        "resumed_from": step,
        "note": f"already trained to step {step}; raise train.steps to continue",
        **{f"eval_{k}": v for k, v in metrics.items()},
    }
    return result


def evaluate_workdir(
    exp: Experiment, workdir: str, devices=None, step: int | str | None = None
) -> tuple[int, dict[str, float]]:
    """Restore a checkpoint of `workdir` (newest, `"best"` or a step) onto abstract shapes and
    evaluate it on the held-out split."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir} does not exist: pass the --workdir of a trained run")
    run = build(exp, devices, abstract=True)
    ckpt = Checkpointer(ckpt_dir, best_metric=run.cfg.train.best_metric or "loss",
                        best_mode=run.cfg.train.best_mode)  # fmt: skip
    try:
        state, _ = ckpt.restore(run.state, step)
    finally:
        ckpt.close()
    with jax.set_mesh(run.plan.mesh):
        metrics = evaluate_run(run, state)
    return int(jax.device_get(state.step)), metrics
