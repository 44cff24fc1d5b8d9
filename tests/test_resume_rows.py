"""Exact resume of everything a user sees, restore memory, and MFU per device.

A run that dies at any step and is resumed logs the same metrics.jsonl rows as one that never
stopped, even when checkpoints fall inside a logging window (`checkpoint.every=7`,
`log_every=10`); a restore holds one copy of the state; MFU counts one device's share of the work.
"""

import json
import os
import threading

import jax
import numpy as np
import pytest

from jaxnv import apply_overrides
from jaxnv.checkpoint import Checkpointer
from jaxnv.experiment import load_experiment
from jaxnv.train import Callback, build, train
from jaxnv.train.profiling import flops_and_peak

TIMING = {"steps_per_sec", "examples_per_sec", "tokens_per_sec", "mfu"}
QUIET = ["logging.progress=false", "logging.mfu=false", "logging.tensorboard=false"]
WINDOWS = ["checkpoint.every=7", "logging.log_every=10", "train.eval_every=20"]
RUNS = {
    "mlp": (
        "binary_classification",
        ["train.steps=40", "model.dropout=0.1", "optimizer.warmup_steps=5", *WINDOWS, *QUIET],
    ),
    "transformer": (
        "char_gpt",
        [
            "train.steps=30",
            "train.batch_size=8",
            "data.seq_len=16",
            "model.num_layers=1",
            "model.embed_dim=32",
            "model.num_heads=2",
            "train.eval_batch_size=512",
            "optimizer.warmup_steps=5",
            *WINDOWS,
            *QUIET,
        ],
    ),
}


def _exp(name, extra=()):
    experiment, overrides = RUNS[name]
    exp = load_experiment(experiment)
    exp.config = apply_overrides(exp.config, [*overrides, *extra])
    exp.summarize = None  # char_gpt samples text at the end: not what is compared here
    return exp


class Die(Callback):
    """Raise inside the loop after step `at`, like a process killed there."""

    def __init__(self, at):
        self.at = at

    def on_step(self, info):
        if info.step == self.at:
            raise KeyboardInterrupt(f"killed at step {info.step}")


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module", params=sorted(RUNS))
def straight(request, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp(f"straight-{request.param}"))
    result = train(_exp(request.param), workdir=workdir, devices=jax.devices()[:1])
    return request.param, workdir, result


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [9, 16, 23])
def test_every_logged_row_survives_a_kill_and_resume(straight, kill_at, tmp_path):
    name, straight_dir, reference = straight
    steps = _exp(name).config.train.steps
    if kill_at >= steps:
        pytest.skip("the run is shorter")
    workdir = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        train(_exp(name), workdir=workdir, devices=jax.devices()[:1], callbacks=[Die(kill_at)])
    saved = Checkpointer(os.path.join(workdir, "checkpoints")).latest_step()
    assert saved == kill_at // 7 * 7 and saved % 10  # resumes inside a logging window
    resumed = train(_exp(name), workdir=workdir, devices=jax.devices()[:1])
    assert resumed.summary["resumed_from"] == saved
    assert _rows(workdir) == _rows(straight_dir)  # every row, bit for bit (JSON floats)
    for a, b in zip(
        jax.tree.leaves(resumed.state.params), jax.tree.leaves(reference.state.params), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_resumed_tensorboard_has_no_duplicate_points(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workdir = str(tmp_path / "tb")
    overrides = ["logging.tensorboard=true"]
    with pytest.raises(KeyboardInterrupt):
        train(
            _exp("mlp", overrides),
            workdir=workdir,
            devices=jax.devices()[:1],
            callbacks=[Die(33)],  # checkpoint 28, row 30 written: resumed, 30 is logged again
        )
    train(_exp("mlp", overrides), workdir=workdir, devices=jax.devices()[:1])
    acc = EventAccumulator(os.path.join(workdir, "tensorboard")).Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == [10, 20, 30, 40]


def _live_bytes() -> int:
    return sum(x.nbytes for x in jax.live_arrays())


class PeakSampler:
    """The largest total of live jax array bytes seen while the block runs (sampled)."""

    def __enter__(self):
        self.peak, self._stop = _live_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _live_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _live_bytes())


@pytest.mark.slow
def test_restore_holds_one_copy_of_the_state(tmp_path):
    exp = _exp("mlp", ["model.features=512,512", "train.steps=7"])
    workdir = str(tmp_path / "mem")
    train(exp, workdir=workdir, devices=jax.devices()[:1])
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    run = build(exp, jax.devices()[:1], abstract=True)  # what train, eval and export restore onto
    state_bytes = sum(
        int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(run.state)
    )
    assert state_bytes > 1 << 20
    base = _live_bytes()
    with PeakSampler() as peak:
        state, _ = ckpt.restore(run.state)
    assert peak.peak - base <= 1.1 * state_bytes
    # the measurement can tell: restoring onto a built state keeps two copies alive
    built = build(exp, jax.devices()[:1])
    base = _live_bytes() - state_bytes * 2  # `state` and `built.state` are alive
    with PeakSampler() as peak:
        again, _ = ckpt.restore(built.state)
    assert peak.peak - base >= 2.9 * state_bytes
    ckpt.close()
    del state, again


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_mfu_counts_one_devices_share(name):
    """The same work per device on 1 and on 8 devices (8x the global batch): the same FLOPs per
    device, so the same MFU at the same step rate."""
    batch = _exp(name).config.train.batch_size
    log = _exp(name).config.logging
    log.mfu, log.peak_flops = True, 1.0
    flops = {}
    for n in (1, 8):
        exp = _exp(name, [f"train.batch_size={batch * n}", f"mesh.data={n}"])
        run = build(exp, jax.devices()[:n], abstract=True)
        state = run.init()
        with jax.set_mesh(run.plan.mesh):
            flops[n] = flops_and_peak(log, run, state, run.batches[0])[0]
    assert flops[8] == pytest.approx(flops[1], rel=0.1)


def _grain_stream(reads=None):
    """A shuffled, repeated, batched grain stream; `reads` (a list) records every row read."""
    import grain

    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 3)).astype(np.float32)
    rows = [{"x": x[i], "y": x[i].sum(keepdims=True), "i": np.int32(i)} for i in range(96)]

    def seen(row):
        if reads is not None:
            reads.append(int(row["i"]))
        return {"x": row["x"], "y": row["y"]}

    ds = grain.MapDataset.source(rows).shuffle(seed=1).repeat().map(seen).batch(8)
    # no read-ahead, so that `reads` counts exactly what the run consumed
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def _fit_stream(data, workdir, **kw):
    import optax
    from flax import nnx

    import jaxnv

    return jaxnv.fit(
        lambda rngs: nnx.Linear(3, 1, rngs=rngs),
        lambda m, b, rng: ((m(b["x"]) - b["y"]) ** 2).mean(),
        data,
        steps=30,
        optimizer=optax.sgd(0.05),
        workdir=workdir,
        checkpoint_every=7,
        log_every=10,
        devices=jax.devices()[:1],
        progress=False,
        tensorboard=False,
        mfu=False,
        **kw,
    )


def test_a_grain_stream_resumes_exactly_from_its_stored_position(tmp_path):
    """A grain IterDataset's iterator state is checkpointed: no skipping, no refusal, the same
    batches after the resume as without the interruption."""
    straight = _fit_stream(_grain_stream(), str(tmp_path / "straight"))
    workdir = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        _fit_stream(_grain_stream(), workdir, callbacks=[Die(16)])
    reads = []
    resumed = _fit_stream(_grain_stream(reads), workdir)  # on_resume is left at "refuse"
    assert resumed.summary["resumed_from"] == 14
    # it went on from step 14's position: one batch read for the shapes, then the 16 remaining
    # batches (a skip would read the 14 before them again: 8 + 30 * 8 rows)
    assert len(reads) == 8 + (30 - 14) * 8
    assert _rows(workdir) == _rows(str(tmp_path / "straight"))
    for a, b in zip(
        jax.tree.leaves(resumed.state.params), jax.tree.leaves(straight.state.params), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_a_generator_resume_is_refused_in_one_line_unless_skipped(tmp_path):
    def batches():
        rng = np.random.default_rng(0)
        while True:
            x = rng.normal(size=(8, 3)).astype(np.float32)
            yield {"x": x, "y": x.sum(1, keepdims=True)}

    workdir = str(tmp_path / "gen")
    with pytest.raises(KeyboardInterrupt):
        _fit_stream(batches(), workdir, callbacks=[Die(9)])
    with pytest.raises(ValueError, match="on_resume='skip'") as err:
        _fit_stream(batches(), workdir)
    assert "\n" not in str(err.value)
    assert _fit_stream(batches(), workdir, on_resume="skip").summary["resumed_from"] == 7
