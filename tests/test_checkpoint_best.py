"""Best-K checkpoint retention beside newest-N, and restoring by name ("latest", "best")."""

import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnv.checkpoint import Checkpointer, CheckpointError


@flax.struct.dataclass
class _State:
    params: dict
    step: jax.Array


def _state(step):
    """A tiny state whose values encode `step`."""
    return _State({"w": jnp.full((2,), float(step), jnp.float32)}, jnp.int32(step))


def _on_disk(path):
    names = os.listdir(path)
    assert not [n for n in names if "tmp" in n], names  # no half-written step left behind
    return {int(n) for n in names if n.isdigit()}


def _expected(history, keep, keep_best, mode):
    """Newest `keep` steps plus the best `keep_best` steps among those with a metric."""
    steps = [s for s, _ in history]
    newest = set(steps[-keep:])
    scored = sorted((v, s) for s, v in history if v is not None)
    if mode == "max":
        scored = scored[::-1]
    return newest | {s for _, s in scored[:keep_best]}


def _history(n=12, seed=0):
    """Steps 10, 20, ... with a noisy metric; every third step has no evaluation (None)."""
    values = np.random.default_rng(seed).normal(size=n)
    return [(10 * (i + 1), None if i % 3 == 2 else float(v)) for i, v in enumerate(values)]


def _best(history, mode):
    scored = [(v, s) for s, v in history if v is not None]
    return (min if mode == "min" else max)(scored)[1]


@pytest.mark.parametrize("async_save", [True, False])
@pytest.mark.parametrize("mode", ["min", "max"])
def test_keeps_exactly_the_newest_and_the_best(tmp_path, mode, async_save):
    history = _history(seed=5)  # a sequence whose best 3 are all older than the newest 2
    ckpt = Checkpointer(str(tmp_path), keep=2, keep_best=3, best_mode=mode, async_save=async_save)
    try:
        for i, (step, value) in enumerate(history):
            metrics = None if value is None else {"loss": value, "acc": 1.0}
            assert ckpt.maybe_save(step, _state(step), {"step": step}, force=True, metrics=metrics)
            ckpt.wait()
            want = _expected(history[: i + 1], 2, 3, mode)
            assert _on_disk(tmp_path) == want, f"after step {step}"
            assert set(ckpt.manager.all_steps()) == want
        assert len(_expected(history, 2, 3, mode)) == 5  # the best are not all among the newest
        best = _best(history, mode)
        assert ckpt.best_step() == best
        state, meta = ckpt.restore(_state(0), "best")
        assert meta == {"step": best}
        np.testing.assert_array_equal(state.params["w"], np.full((2,), best, np.float32))
        assert int(state.step) == best
        latest = history[-1][0]
        for name in (None, "latest"):
            state, meta = ckpt.restore(_state(0), name)
            assert meta == {"step": latest} and int(state.step) == latest
        kept_int = sorted(_on_disk(tmp_path))[0]
        assert int(ckpt.restore(_state(0), kept_int)[0].step) == kept_int
    finally:
        ckpt.close()


@pytest.mark.parametrize("mode", ["min", "max"])
def test_a_reopened_checkpointer_still_knows_the_best(tmp_path, mode):
    history = _history(n=16, seed=1)
    first, second = history[:8], history[8:]
    ckpt = Checkpointer(str(tmp_path), keep=2, keep_best=3, best_mode=mode)
    for step, value in first:
        metrics = None if value is None else {"loss": value}
        ckpt.maybe_save(step, _state(step), {}, force=True, metrics=metrics)
    ckpt.close()

    reopened = Checkpointer(str(tmp_path), keep=2, keep_best=3, best_mode=mode)
    assert reopened.best_step() == _best(first, mode)
    assert int(reopened.restore(_state(0), "best")[0].step) == _best(first, mode)
    # ranking carries on across the restart: old steps compete with new ones by their metric
    for step, value in second:
        metrics = None if value is None else {"loss": value}
        reopened.maybe_save(step, _state(step), {}, force=True, metrics=metrics)
    reopened.close()
    assert _on_disk(tmp_path) == _expected(history, 2, 3, mode)
    assert Checkpointer(str(tmp_path), best_mode=mode).best_step() == _best(history, mode)


def test_best_by_another_metric_and_nan_ranks_worst(tmp_path):
    ckpt = Checkpointer(
        str(tmp_path), keep=1, keep_best=2, best_metric="acc", best_mode="max", async_save=False
    )
    for step, acc in [(1, 0.5), (2, float("nan")), (3, 0.7), (4, 0.6), (5, 0.1)]:
        ckpt.maybe_save(step, _state(step), {}, force=True, metrics={"acc": acc, "loss": -acc})
    assert _on_disk(tmp_path) == {3, 4, 5}
    assert ckpt.best_step() == 3
    ckpt.close()


def test_without_keep_best_only_the_newest_are_kept(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=2, async_save=False)
    for step, loss in [(1, 0.1), (2, 0.5), (3, 0.3), (4, 0.9)]:
        ckpt.maybe_save(step, _state(step), {}, force=True, metrics={"loss": loss})
    assert _on_disk(tmp_path) == {3, 4}
    assert ckpt.best_step() == 3  # the best of what is left
    ckpt.close()


def test_best_without_metrics_is_a_one_line_error(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=2, keep_best=2)
    with pytest.raises(CheckpointError, match="no checkpoint .*train first"):
        ckpt.restore(_state(0), "best")
    ckpt.maybe_save(1, _state(1), {}, force=True)
    ckpt.wait()
    assert ckpt.best_step() is None
    with pytest.raises(CheckpointError, match="no checkpoint .* 'loss' metric: pass metrics=") as e:
        ckpt.restore(_state(0), "best")
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="'newest'.*an int, 'latest' or 'best'") as e:
        ckpt.restore(_state(0), "newest")
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="no 'loss'.*best_metric="):
        ckpt.maybe_save(2, _state(2), {}, force=True, metrics={"acc": 0.5})
    ckpt.close()
    assert _on_disk(tmp_path) == {1}
