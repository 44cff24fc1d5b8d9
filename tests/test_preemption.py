"""Real processes: SIGTERM saves and exits 75; SIGKILL loses at most `checkpoint.every` steps;
either way the resumed run ends bit-identical to one that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxnv import apply_overrides
from jaxnv.checkpoint import Checkpointer
from jaxnv.checkpoint.preemption import EXIT_PREEMPTED
from jaxnv.experiment import load_experiment
from jaxnv.train import train

ARGS = [
    "logging.progress=false",
    "logging.mfu=false",
    "logging.log_every=10",
    "train.steps=3000",
    "train.eval_every=0",
    "model.dropout=0.1",
    "checkpoint.every=100",
]


def _start(workdir):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "jaxnv.cli", "train", "binary_classification"]
    return subprocess.Popen(
        [*cmd, "--workdir", workdir, *ARGS],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_rows(workdir, n, proc, timeout=120):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and sum(1 for _ in open(path, encoding="utf-8")) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the run never logged")


TIMING = {"steps_per_sec", "examples_per_sec", "tokens_per_sec", "mfu"}


@pytest.fixture(scope="module")
def straight():
    exp = load_experiment("binary_classification")
    exp.config = apply_overrides(exp.config, ARGS)
    result = train(exp, devices=jax.devices()[:1])
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in result.history]
    return jax.device_get(result.state), rows


def _finish_and_compare(workdir, straight):
    state, history = straight
    proc = _start(workdir)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    resumed = Checkpointer(os.path.join(workdir, "checkpoints")).restore(state)[0]
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    steps = [r["step"] for r in rows if r["split"] == "train"]
    assert steps == list(range(10, 3001, 10))  # no duplicated, no missing rows
    # every row equals the uninterrupted run's, the one logged right after the stop included
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in rows] == history


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_resume_is_exact(tmp_path, straight):
    workdir = str(tmp_path / "term")
    proc = _start(workdir)
    _wait_for_rows(workdir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "SIGTERM" in err and "run the same command again" in err
    saved = Checkpointer(os.path.join(workdir, "checkpoints")).latest_step()
    assert 30 <= saved < 3000  # the step it stopped at, not only a multiple of 100
    # (a stop inside a logging window, as is likely, makes the next row span the restart)
    _finish_and_compare(workdir, straight)


@pytest.mark.slow
def test_sigkill_then_resume_is_exact(tmp_path, straight):
    workdir = str(tmp_path / "kill")
    proc = _start(workdir)
    _wait_for_rows(workdir, 25, proc)  # past the first checkpoint at step 100
    proc.kill()
    proc.communicate()
    latest = Checkpointer(os.path.join(workdir, "checkpoints")).latest_step()
    assert latest is not None and latest % 100 == 0
    _finish_and_compare(workdir, straight)
