"""The one training loop, behind `fit` (any NNX model, any data) and `jaxnv train` (a config).

    result = train(load_experiment("house_prices"), workdir="runs/house")

Both this and `fit` (train/fit.py) build a `Run` (train/run.py: policy, mesh plan, abstract
state, compiled steps, batches) and hand it to `_train`, which resumes from the workdir's newest
checkpoint or initialises, runs the steps, evaluates, logs, saves and finishes with a summary.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxnv import __version__, hostmem
from jaxnv import config as config_lib
from jaxnv.checkpoint.manager import Checkpointer
from jaxnv.checkpoint.preemption import Preempted, PreemptionGuard
from jaxnv.core.precision import DynamicLossScale, Policy, backend_notes
from jaxnv.core.state import TrainState, param_count
from jaxnv.data.sources import Dataset
from jaxnv.experiment import Experiment
from jaxnv.parallel.distributed import is_primary
from jaxnv.parallel.report import compile_step, format_report
from jaxnv.parallel.xla_flags import overlap_note
from jaxnv.train.callbacks import Callback, EarlyStopping, StepInfo  # noqa: F401 (re-exported)
from jaxnv.train.calls import Calls, host_rows
from jaxnv.train.evaluate import evaluate_run
from jaxnv.train.nonfinite import NonFiniteMonitor
from jaxnv.train.profiling import ProfileWindow, flops_and_peak
from jaxnv.train.run import (  # noqa: F401 (re-exported: fit and callers import them from here)
    Run,
    _assemble,
    build,
    micro_batches_for,
    with_lora,
)
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
        lines += [*run.notes, *filter(None, [overlap_note(jax.default_backend()), hostmem.note()])]
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
