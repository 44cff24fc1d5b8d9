"""train.on_nonfinite: skip goes on, stop reports the step and last good checkpoint, rollback
reloads it and continues past the offending batch."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxnv import apply_overrides
from jaxnv.data import make_dataset
from jaxnv.experiment import load_experiment
from jaxnv.train import train
from jaxnv.train.nonfinite import NonFiniteError, NonFiniteMonitor

ARGS = [
    "logging.progress=false",
    "logging.mfu=false",
    "train.steps=25",  # less than one epoch of 2000 / 64: the poisoned example is met once
    "train.eval_every=0",
    "logging.log_every=5",
    "optimizer.warmup_steps=5",
    "checkpoint.every=5",
]


def _poisoned(*overrides, at=12):
    exp = load_experiment("binary_classification")
    exp.config = apply_overrides(exp.config, [*ARGS, *overrides])
    clean = make_dataset(exp.config.data)
    from jaxnv.data import StepBatches

    batches = StepBatches(clean.train, exp.config.train.batch_size, exp.config.train.seed)
    victim = int(batches.indices(at)[3])  # an example of the batch of step at + 1 (1-based)
    x = clean.train["x"].copy()
    x[victim, 0] = np.nan
    poisoned = dataclasses.replace(clean, train={"x": x, "y": clean.train["y"]})
    exp.make_data = lambda cfg: poisoned
    return exp


def test_stop_names_the_step_and_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteError, match=r"at step 13; the last good checkpoint is step 10"):
        train(_poisoned("train.on_nonfinite=stop"), workdir=str(tmp_path / "w"))


def test_skip_goes_on_and_params_stay_finite():
    result = train(_poisoned("train.on_nonfinite=skip"))
    assert result.summary["nonfinite_skipped"] == 1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(result.state.params)))


def test_rollback_reloads_and_continues_past_the_bad_batch(tmp_path):
    result = train(_poisoned("train.on_nonfinite=rollback"), workdir=str(tmp_path / "w"))
    assert result.summary["rollbacks"] == 1
    assert int(result.state.step) == 25
    rows = [r for r in result.history if r["split"] == "train"]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25]  # steps continue, no duplicates
    assert np.isfinite(rows[-1]["loss"])


def test_dynamic_loss_scale_overflow_is_not_bad():
    monitor = NonFiniteMonitor("stop", dynamic_loss_scale=True)
    rows = [{"loss": 0.5, "grads_finite": 0.0}, {"loss": float("nan"), "grads_finite": 0.0}]
    assert monitor.first_bad(7, rows) == (8, 1)  # the overflow at 7 is routine; nan loss is not
    assert NonFiniteMonitor("stop", dynamic_loss_scale=False).first_bad(7, rows) == (7, 2)


def test_rollback_in_the_last_window_still_evaluates_and_saves_the_end(tmp_path):
    from jaxnv.checkpoint import Checkpointer

    workdir = str(tmp_path / "w")
    result = train(_poisoned("train.on_nonfinite=rollback", at=22), workdir=workdir)
    assert result.summary["rollbacks"] == 1
    assert "eval_loss" in result.summary and np.isfinite(result.summary["eval_loss"])
    assert Checkpointer(f"{workdir}/checkpoints").latest_step() == 25


def test_skip_counts_every_bad_step():
    monitor = NonFiniteMonitor("skip", dynamic_loss_scale=False)
    rows = [{"loss": float("nan"), "grads_finite": 0.0}] * 3 + [{"loss": 1.0}]
    first, count = monitor.first_bad(1, rows)
    assert (first, count) == (1, 3)
    assert monitor.should_rollback(first, None, count) is False and monitor.skipped == 3
