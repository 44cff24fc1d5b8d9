"""Checkpoints: exact resume, strict restores, refusing non-finite params, `jaxnv eval`."""

import json
import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnv import apply_overrides
from jaxnv.checkpoint import Checkpointer, CheckpointError
from jaxnv.experiment import load_experiment
from jaxnv.train import Callback, evaluate_workdir, train

# dropout, fp16 dynamic loss scaling (with a period short enough to grow) and shuffled data
OVERRIDES = [
    "model.dropout=0.1",
    "precision.policy=fp16",
    "precision.growth_interval=7",
    "train.steps=40",
    "train.eval_every=10",
    "logging.log_every=5",
    "logging.progress=false",
    "logging.mfu=false",
    "checkpoint.every=10",
    "optimizer.warmup_steps=5",
]
TIMING = {"steps_per_sec", "examples_per_sec", "tokens_per_sec", "mfu"}


def _exp(*extra):
    exp = load_experiment("binary_classification")
    exp.config = apply_overrides(exp.config, [*OVERRIDES, *extra])
    return exp


class Crash(Callback):
    """Raise after the log of step `at`, like a process dying mid-run."""

    def __init__(self, at):
        self.at = at

    def on_log(self, step, split, scalars, state):
        if step == self.at and split == "train":
            raise KeyboardInterrupt(f"simulated crash at step {step}")


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("straight"))
    return workdir, train(_exp(), workdir=workdir)


def test_resume_is_exact(straight, tmp_path):
    straight_dir, straight_result = straight
    workdir = str(tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        train(_exp(), workdir=workdir, callbacks=[Crash(25)])
    assert Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 20
    resumed = train(_exp(), workdir=workdir)
    assert resumed.summary["resumed_from"] == 20
    a = jax.device_get(resumed.state)
    b = jax.device_get(straight_result.state)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)  # bit-identical params, moments, loss scale, rng
    assert float(a.loss_scale.loss_scale) != 2.0**15  # the scale did move during the run
    assert _rows(workdir) == _rows(straight_dir)  # no duplicated or missing rows


def test_eval_command_matches_the_final_evaluation(straight):
    workdir, result = straight
    step, metrics = evaluate_workdir(_exp(), workdir)
    assert step == 40
    for k, v in result.eval_metrics.items():
        np.testing.assert_allclose(metrics[k], v, rtol=1e-6)


def test_keep_n_and_atomic_layout(straight):
    workdir, _ = straight
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps == [20, 30, 40]  # checkpoint.keep=3 of 10, 20, 30, 40
    leftovers = [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in d]
    assert not leftovers


def test_mismatched_model_is_refused_with_the_differing_paths(straight):
    workdir, _ = straight
    with pytest.raises(CheckpointError, match=r"does not match this model: .*hidden") as err:
        evaluate_workdir(_exp("model.features=16,16"), workdir)
    assert "\n" not in str(err.value)


def test_run_stopped_before_its_first_checkpoint_starts_again_and_keeps_its_log(tmp_path, capsys):
    workdir = str(tmp_path / "w")
    train(_exp("checkpoint.every=0", "train.steps=10"), workdir=workdir)
    os.rename(os.path.join(workdir, "checkpoints"), os.path.join(workdir, "moved"))
    before = open(os.path.join(workdir, "metrics.jsonl"), "rb").read()
    capsys.readouterr()
    result = train(_exp("train.steps=10"), workdir=workdir)
    assert result.summary["resumed_from"] == 0
    assert "stopped before its first checkpoint" in capsys.readouterr().out
    (aside,) = [f for f in os.listdir(workdir) if f.startswith("metrics.jsonl.interrupted-")]
    assert open(os.path.join(workdir, aside), "rb").read() == before  # the old log, intact
    assert _rows(workdir) == [
        {k: v for k, v in r.items() if k not in TIMING} for r in result.history
    ]  # the new log holds only the new run


@flax.struct.dataclass
class _State:
    params: dict
    step: jax.Array


def test_non_finite_params_are_never_saved(tmp_path):
    ckpt = Checkpointer(str(tmp_path), every=1)
    good = _State({"w": jnp.ones((3,))}, jnp.int32(1))
    assert ckpt.maybe_save(1, good, {})
    ckpt.wait()
    bad = _State({"w": jnp.array([1.0, jnp.nan, 0.0])}, jnp.int32(2))
    with pytest.raises(
        CheckpointError, match="not finite at step 2.*last good checkpoint is step 1"
    ):
        ckpt.maybe_save(2, bad, {})
    ckpt.close()
    assert Checkpointer(str(tmp_path)).latest_step() == 1


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path):
    ckpt = Checkpointer(str(tmp_path), every=1)
    state = _State({"w": jnp.arange(1000.0)}, jnp.int32(1))
    ckpt.maybe_save(1, state, {})
    ckpt.close()
    for root, _, files in os.walk(tmp_path / "1" / "state"):
        for name in files:
            if "manifest" in name or name.endswith(".ocdbt") or "d" == os.path.basename(root):
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"garbage")
    with pytest.raises(CheckpointError, match="cannot be read.*corrupt"):
        Checkpointer(str(tmp_path)).restore(state)


def test_compressed_and_uncompressed_checkpoints_restore_either_way(tmp_path):
    # compression is a per-array codec on disk, so a checkpoint written before the default
    # changed (zstd) restores with today's Checkpointer, and the other way round
    params = {"w": jnp.tile(jnp.arange(64.0), 64), "v": jnp.linspace(-1.0, 1.0, 999)}
    state = _State(params, jnp.int32(3))
    sizes = {}
    for compress in (True, False):
        path = str(tmp_path / f"compress-{compress}")
        ckpt = Checkpointer(path, async_save=False, compress=compress)
        assert ckpt.maybe_save(3, state, {"compress": compress}, force=True)
        ckpt.close()
        sizes[compress] = sum(
            os.path.getsize(os.path.join(root, f)) for root, _, fs in os.walk(path) for f in fs
        )
        restored, meta = Checkpointer(path, compress=not compress).restore(state)
        assert meta == {"compress": compress}
        jax.tree.map(np.testing.assert_array_equal, restored, state)
    assert sizes[True] < sizes[False] - 10_000  # the tiled ramp compresses: zstd was really on


def test_a_checkpoint_from_before_the_stacked_blocks_resumes_exactly(tmp_path):
    """Runs checkpointed by jaxnv 0.1, whose transformer kept each layer's params under
    `blocks/<i>/...`, resume onto today's stacked blocks ((L, ...) per param) exactly."""
    import shutil

    from jaxnv.train import build

    def exp():
        e = load_experiment("char_gpt")
        e.config = apply_overrides(e.config, [
            "model.num_layers=2", "model.embed_dim=32", "model.num_heads=2", "model.dropout=0.1",
            "data.seq_len=16", "train.batch_size=8", "train.steps=8", "train.eval_every=0",
            "logging.log_every=2", "logging.progress=false", "logging.mfu=false",
            "checkpoint.every=4", "optimizer.warmup_steps=1",
        ])  # fmt: skip
        e.summarize = None
        return e

    straight = train(exp(), workdir=str(tmp_path / "straight"))
    workdir = str(tmp_path / "old")
    with pytest.raises(KeyboardInterrupt):
        train(exp(), workdir=workdir, callbacks=[Crash(6)])

    # rewrite step 4 the way jaxnv 0.1 laid it out: one subtree per layer
    def per_layer(tree):
        def split(node):
            if not (isinstance(node, dict) and "blocks" in node):
                return node
            n = len(jax.tree.leaves(node["blocks"])[0])
            layers = {
                i: jax.tree.map(lambda a, i=i: np.asarray(a)[i], node["blocks"]) for i in range(n)
            }
            return {**node, "blocks": layers}

        return jax.tree.map(split, tree, is_leaf=lambda x: isinstance(x, dict) and "blocks" in x)

    path = os.path.join(workdir, "checkpoints")
    state, meta = Checkpointer(path).restore(build(exp(), abstract=True).state)
    old = state.replace(params=per_layer(state.params), opt_state=per_layer(state.opt_state),
                        model_state=per_layer(state.model_state))  # fmt: skip
    assert "blocks" in old.params and set(old.params["blocks"]) == {0, 1}
    shutil.rmtree(path)
    ckpt = Checkpointer(path)
    ckpt.maybe_save(4, old, meta, force=True)
    ckpt.wait()
    ckpt.close()

    resumed = train(exp(), workdir=workdir)
    assert resumed.summary["resumed_from"] == 4
    a, b = jax.device_get(resumed.state), jax.device_get(straight.state)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
