"""`train.steps_per_call=K`: K optimizer steps in one compiled call, the same run as K = 1.

The reference is the loop with one step a call (itself tested against plain JAX in
test_step.py): every logged row, every checkpoint and the final params must match it, fp32,
bit-identically or within 1e-6, also with periods K does not divide (calls cut short), with
micro-batches, with a feed that is not random-access, and across a resume at a step that is not a
multiple of K.
"""

import json
import os

import jax
import numpy as np
import pytest

from jaxnv import apply_overrides
from jaxnv.config import ConfigError
from jaxnv.core.multistep import make_multi_step, plan_calls, split_metrics
from jaxnv.data.pipeline import IndexedBatches
from jaxnv.experiment import load_experiment
from jaxnv.train import Callback, build, train
from jaxnv.train.loop import _train

TIMING = {"steps_per_sec", "examples_per_sec", "tokens_per_sec", "mfu"}
QUIET = ["logging.progress=false", "logging.mfu=false", "logging.tensorboard=false"]
MLP = [  # dropout: the rng folded per step must match too; 10 and 15 are not multiples of 4
    "train.steps=30",
    "model.dropout=0.1",
    "optimizer.warmup_steps=5",
    "logging.log_every=10",
    "train.eval_every=15",
    *QUIET,
]
GPT = [
    "train.steps=12",
    "train.batch_size=4",
    "data.seq_len=16",
    "model.num_layers=1",
    "model.embed_dim=32",
    "model.num_heads=2",
    "train.eval_batch_size=512",
    "optimizer.warmup_steps=3",
    "logging.log_every=4",
    *QUIET,
]


def _exp(name, overrides, k, extra=()):
    exp = load_experiment(name)
    exp.config = apply_overrides(exp.config, [*overrides, f"train.steps_per_call={k}", *extra])
    exp.summarize = None  # char_gpt samples text at the end: not what is compared here
    return exp


def _run(name, overrides, k, extra=(), workdir=None):
    return train(_exp(name, overrides, k, extra), workdir=workdir, devices=jax.devices()[:1])


def _rows(history):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


def _assert_same(a, b, atol=0.0):
    rows_a, rows_b = _rows(a.history), _rows(b.history)
    assert [(r["step"], r["split"]) for r in rows_a] == [(r["step"], r["split"]) for r in rows_b]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra.keys() == rb.keys()
        keys = sorted(set(ra) - {"step", "split"})
        np.testing.assert_allclose([rb[k] for k in keys], [ra[k] for k in keys], rtol=0, atol=atol)
    for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=atol)
    assert int(a.state.step) == int(b.state.step)


def _brute_calls(start, stop, k, every, marks):
    """The same plan by walking step by step: a call grows until k steps or a boundary."""
    bounds = {d for d in range(start + 1, stop + 1) if d == stop or d in marks}
    bounds |= {d for d in range(start + 1, stop + 1) for e in every if e and d % e == 0}
    calls, first = [], start
    for done in range(start + 1, stop + 1):
        if done in bounds or done - first == k:
            calls.append((first, done - first))
            first = done
    return calls


@pytest.mark.parametrize("start,stop,k", [(0, 40, 8), (5, 33, 4), (3, 9, 16), (0, 7, 1)])
def test_plan_calls_ends_every_call_at_each_boundary(start, stop, k):
    every, marks = (10, 0, 6), (13, 14)
    got = list(plan_calls(start, stop, k, every, marks))
    assert got == _brute_calls(start, stop, k, every, marks)
    assert sum(n for _, n in got) == stop - start and all(1 <= n <= k for _, n in got)


def test_multi_step_equals_single_steps_and_splits_metrics():
    def step(state, batch):  # a stand-in train step: state and metrics depend on the batch
        new = state * 0.5 + batch["x"].sum()
        return new, {"loss": new, "n": batch["x"][0]}

    batches = {"x": np.arange(12.0, dtype=np.float32).reshape(4, 3)}  # K = 4 steps of 3 rows
    state, metrics = make_multi_step(jax.jit(step), donate=False)(np.float32(1.0), batches)
    ref, rows = np.float32(1.0), []
    for i in range(4):
        ref, m = step(ref, {"x": batches["x"][i]})
        rows.append({k: float(v) for k, v in m.items()})
    assert float(state) == float(ref)
    got = [{k: float(v) for k, v in r.items()} for r in split_metrics(jax.device_get(metrics))]
    assert got == rows


@pytest.fixture(scope="module")
def mlp_k1():
    return _run("binary_classification", MLP, 1)


def test_mlp_curve_equals_one_step_a_call(mlp_k1, capsys):
    result = _run("binary_classification", MLP, 4)
    assert "calls are cut short" in capsys.readouterr().out  # 10 and 15: not multiples of 4
    _assert_same(mlp_k1, result)


@pytest.mark.slow
def test_micro_batches_with_steps_per_call():
    extra = ["train.micro_batches=2"]
    ref = _run("binary_classification", MLP, 1, extra)
    _assert_same(ref, _run("binary_classification", MLP, 8, extra))


@pytest.mark.slow
def test_transformer_curve_equals_one_step_a_call():
    ref = _run("char_gpt", GPT, 1)
    _assert_same(ref, _run("char_gpt", GPT, 4), atol=1e-6)


class StopAfterSave(Callback):
    """Dies right after the checkpoint of step `at` committed, like a process killed there."""

    def __init__(self, at):
        self.at = at

    def on_save(self, step, directory):
        if step == self.at:
            raise KeyboardInterrupt(f"killed after saving step {step}")


def _jsonl(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in f]


def test_resume_mid_call_is_exact(mlp_k1, tmp_path):
    """Checkpoints every 6 steps with K = 4: a resume at step 6, inside what would have been the
    call of steps 4-7, continues exactly where one step a call would."""
    ckpt = ["checkpoint.every=6"]
    straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
    straight = _run("binary_classification", MLP, 1, ckpt, straight_dir)
    exp = _exp("binary_classification", MLP, 4, ckpt)
    with pytest.raises(KeyboardInterrupt):
        train(exp, workdir=resumed_dir, callbacks=[StopAfterSave(6)], devices=jax.devices()[:1])
    resumed = train(exp, workdir=resumed_dir, devices=jax.devices()[:1])
    assert resumed.summary["resumed_from"] == 6
    _assert_same(mlp_k1, straight)  # a workdir changes nothing
    for x, y in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    assert _jsonl(resumed_dir) == _jsonl(straight_dir)  # every row, the resumed window's too
    saved = sorted(os.listdir(os.path.join(resumed_dir, "checkpoints")))
    assert saved == sorted(os.listdir(os.path.join(straight_dir, "checkpoints")))


def test_sequential_feed_is_stacked_in_order(mlp_k1):
    """A feed that is not random-access (IndexedBatches over a list) is grouped K at a time."""
    results = []
    for k in (1, 4):
        run = build(_exp("binary_classification", MLP, k), jax.devices()[:1], abstract=True)
        run.batches = IndexedBatches([run.batches[s] for s in range(30)])
        results.append(_train(run, None, []))
    _assert_same(*results)
    _assert_same(mlp_k1, results[1])  # the same batches as the step-indexed feed


class EveryStep(Callback):
    def __init__(self):
        self.steps = []

    def on_step(self, info):
        self.steps.append(info.step)


def test_per_step_callbacks_fall_back_to_one_step_a_call(mlp_k1, capsys):
    cb = EveryStep()
    result = train(_exp("binary_classification", MLP, 8), callbacks=[cb], devices=jax.devices()[:1])
    assert "train.steps_per_call=8 ignored: callbacks with on_step (EveryStep)" in (
        capsys.readouterr().out
    )
    assert cb.steps == list(range(1, 31))
    _assert_same(mlp_k1, result)


def test_bad_steps_per_call_is_one_line():
    with pytest.raises(ConfigError, match="train.steps_per_call=0 must be an integer >= 1"):
        _run("binary_classification", MLP, 0)
