"""Losses against numpy float64 formulas; dtype handling; one-line shape and dtype errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnv.core import losses

RTOL = 1e-6


def _rng(seed=0):
    return np.random.default_rng(seed)


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _log_sigmoid64(x):
    x = np.asarray(x, np.float64)
    return -np.logaddexp(0.0, -x)  # log(1 / (1 + exp(-x))), stable for large |x|


def _bce64(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return -(y * _log_sigmoid64(x) + (1 - y) * _log_sigmoid64(-x))


def _softmax_ce64(logits, labels, ls=0.0):
    logp = _log_softmax64(logits)
    num_classes = logits.shape[-1]
    target = (1 - ls) * np.eye(num_classes)[labels] + ls / num_classes
    return -(target * logp).sum(-1)


def _assert_one_line(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_mse_matches_numpy():
    rng = _rng(0)
    pred, target = rng.normal(size=(16, 5)), rng.normal(size=(16, 5))
    expected = ((pred - target) ** 2).mean()
    got = losses.mse(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32))
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), expected, rtol=RTOL)
    per = losses.mse(
        jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32), reduction="none"
    )
    np.testing.assert_allclose(np.asarray(per), (pred - target) ** 2, rtol=1e-5, atol=1e-7)


def test_bce_matches_log_sigmoid_formula():
    rng = _rng(1)
    x = rng.normal(size=(32,)) * 3
    y = rng.integers(0, 2, size=(32,))
    got = losses.binary_cross_entropy_with_logits(jnp.asarray(x, jnp.float32), jnp.asarray(y))
    np.testing.assert_allclose(float(got), _bce64(x.astype(np.float32), y).mean(), rtol=RTOL)
    # float labels give the same value as integer labels
    got_float = losses.binary_cross_entropy_with_logits(
        jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    )
    np.testing.assert_allclose(float(got_float), float(got), rtol=RTOL)


def test_bce_stable_for_large_logits():
    x = np.array([-100.0, 100.0, 100.0, -100.0, 0.0])
    y = np.array([0.0, 1.0, 0.0, 1.0, 1.0])
    got = losses.binary_cross_entropy_with_logits(
        jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), reduction="none"
    )
    assert np.all(np.isfinite(np.asarray(got)))
    np.testing.assert_allclose(np.asarray(got), _bce64(x, y), rtol=RTOL, atol=1e-30)


def test_softmax_ce_matches_numpy():
    rng = _rng(2)
    logits, labels = rng.normal(size=(8, 6, 10)) * 2, rng.integers(0, 10, size=(8, 6))
    logits32 = logits.astype(np.float32)
    got = losses.softmax_cross_entropy(jnp.asarray(logits32), jnp.asarray(labels))
    np.testing.assert_allclose(float(got), _softmax_ce64(logits32, labels).mean(), rtol=RTOL)


def test_softmax_ce_label_smoothing_matches_numpy():
    rng = _rng(3)
    logits, labels = rng.normal(size=(16, 7)), rng.integers(0, 7, size=(16,))
    logits32 = logits.astype(np.float32)
    got = losses.softmax_cross_entropy(
        jnp.asarray(logits32), jnp.asarray(labels), label_smoothing=0.1
    )
    expected = _softmax_ce64(logits32, labels, ls=0.1).mean()
    np.testing.assert_allclose(float(got), expected, rtol=RTOL)
    # smoothing changes the value: the test above could not pass with ls ignored
    plain = _softmax_ce64(logits32, labels).mean()
    assert abs(expected - plain) > 1e-3


def test_softmax_ce_mask_averages_masked_in_positions_only():
    rng = _rng(4)
    logits, labels = rng.normal(size=(4, 9, 5)), rng.integers(0, 5, size=(4, 9))
    mask = rng.random(size=(4, 9)) < 0.6
    logits32 = logits.astype(np.float32)
    per = _softmax_ce64(logits32, labels, ls=0.2)
    expected = (per * mask).sum() / mask.sum()
    got = losses.softmax_cross_entropy(
        jnp.asarray(logits32), jnp.asarray(labels), label_smoothing=0.2, mask=jnp.asarray(mask)
    )
    np.testing.assert_allclose(float(got), expected, rtol=RTOL)
    got_none = losses.softmax_cross_entropy(
        jnp.asarray(logits32), jnp.asarray(labels), mask=jnp.asarray(mask), reduction="none"
    )
    assert got_none.shape == (4, 9)
    np.testing.assert_allclose(
        np.asarray(got_none), _softmax_ce64(logits32, labels) * mask, rtol=1e-5, atol=1e-6
    )
    # an all-zero mask gives 0, not NaN
    zero = losses.softmax_cross_entropy(
        jnp.asarray(logits32), jnp.asarray(labels), mask=jnp.zeros((4, 9), bool)
    )
    assert float(zero) == 0.0


def test_kl_divergence_matches_numpy():
    rng = _rng(5)
    p, q = rng.normal(size=(12, 8)).astype(np.float32), rng.normal(size=(12, 8)).astype(np.float32)
    logp, logq = _log_softmax64(p), _log_softmax64(q)
    expected = (np.exp(logp) * (logp - logq)).sum(-1)
    got = losses.kl_divergence(jnp.asarray(p), jnp.asarray(q), reduction="none")
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        float(losses.kl_divergence(jnp.asarray(p), jnp.asarray(q))), expected.mean(), rtol=RTOL
    )
    assert float(losses.kl_divergence(jnp.asarray(p), jnp.asarray(p))) == pytest.approx(0, abs=1e-7)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_compute_in_float32(dtype):
    rng = _rng(6)
    logits = jnp.asarray(rng.normal(size=(16, 10)) * 4, dtype)
    labels = jnp.asarray(rng.integers(0, 10, size=(16,)))
    logits64 = np.asarray(logits.astype(jnp.float32), np.float64)  # the values actually passed
    got = losses.softmax_cross_entropy(logits, labels, label_smoothing=0.1)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(
        float(got), _softmax_ce64(logits64, np.asarray(labels), 0.1).mean(), rtol=RTOL
    )

    pred, target = logits[:, 0], logits[:, 1]
    got_mse = losses.mse(pred, target)
    assert got_mse.dtype == jnp.float32
    np.testing.assert_allclose(
        float(got_mse), ((logits64[:, 0] - logits64[:, 1]) ** 2).mean(), rtol=RTOL
    )

    y = jnp.asarray(rng.integers(0, 2, size=(16,)), dtype)
    got_bce = losses.binary_cross_entropy_with_logits(pred, y)
    assert got_bce.dtype == jnp.float32
    np.testing.assert_allclose(
        float(got_bce), _bce64(logits64[:, 0], np.asarray(y, np.float64)).mean(), rtol=RTOL
    )

    got_kl = losses.kl_divergence(logits, logits[::-1])
    assert got_kl.dtype == jnp.float32
    assert losses.accuracy(logits, labels).dtype == jnp.float32


def test_accuracy_hand_example():
    logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [4.0, 0.0, 0.0]])
    labels = jnp.array([0, 1, 1, 2])
    assert float(losses.accuracy(logits, labels)) == 0.5
    # masked: only rows 0 and 2 count -> 1 of 2
    assert float(losses.accuracy(logits, labels, mask=jnp.array([1, 0, 1, 0]))) == 0.5
    assert float(losses.accuracy(logits, labels, mask=jnp.array([1, 1, 0, 0]))) == 1.0
    # binary logits of shape (...,) and (..., 1)
    binary = jnp.array([3.0, -1.0, 0.5, -2.0])
    binary_labels = jnp.array([1, 0, 0, 1])
    assert float(losses.accuracy(binary, binary_labels)) == 0.5
    assert float(losses.accuracy(binary[:, None], binary_labels)) == 0.5
    assert float(losses.accuracy(binary, binary_labels.astype(jnp.float32))) == 0.5


def test_losses_work_under_jit():
    rng = _rng(7)
    logits, labels = rng.normal(size=(6, 4)).astype(np.float32), rng.integers(0, 4, size=(6,))
    eager = losses.softmax_cross_entropy(logits, labels, label_smoothing=0.1)
    jitted = jax.jit(lambda a, b: losses.softmax_cross_entropy(a, b, label_smoothing=0.1))(
        logits, labels
    )
    np.testing.assert_allclose(float(jitted), float(eager), rtol=RTOL)


def test_shape_mismatch_errors_are_one_line_and_name_the_fix():
    with pytest.raises(ValueError) as excinfo:
        losses.mse(jnp.zeros((16, 1)), jnp.zeros((16,)))
    _assert_one_line(excinfo, "(16, 1)", "(16,)", "reshape", "targets[..., None]")
    with pytest.raises(ValueError) as excinfo:
        losses.binary_cross_entropy_with_logits(jnp.zeros((16,)), jnp.zeros((16, 1)))
    _assert_one_line(excinfo, "(16,)", "(16, 1)", "labels[..., 0]")
    with pytest.raises(ValueError) as excinfo:
        losses.kl_divergence(jnp.zeros((4, 3)), jnp.zeros((4, 5)))
    _assert_one_line(excinfo, "(4, 3)", "(4, 5)")
    with pytest.raises(ValueError) as excinfo:
        losses.softmax_cross_entropy(jnp.zeros((8, 10)), jnp.zeros((8, 10), jnp.int32))
    _assert_one_line(excinfo, "(8, 10)", "(8,)", "argmax")
    with pytest.raises(ValueError) as excinfo:
        losses.softmax_cross_entropy(
            jnp.zeros((8, 10)), jnp.zeros((8,), jnp.int32), mask=jnp.ones((8, 1))
        )
    _assert_one_line(excinfo, "mask shape (8, 1)")


def test_float_labels_for_softmax_ce_raise_type_error():
    with pytest.raises(TypeError) as excinfo:
        losses.softmax_cross_entropy(jnp.zeros((8, 10)), jnp.zeros((8,)))
    _assert_one_line(excinfo, "integer", "astype(jnp.int32)")
    with pytest.raises(TypeError):
        losses.accuracy(jnp.zeros((8, 10)), jnp.zeros((8,)))


def test_unknown_reduction_suggests():
    with pytest.raises(ValueError) as excinfo:
        losses.mse(jnp.zeros(3), jnp.zeros(3), reduction="meen")
    _assert_one_line(excinfo, "did you mean 'mean'")
