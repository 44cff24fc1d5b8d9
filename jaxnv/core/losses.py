"""Loss functions and accuracy: pure, jit-safe, computed in float32 whatever the input dtype.

Each loss returns the mean over valid elements (a float32 scalar), or with ``reduction="none"``
the unreduced per-element values. Shape and dtype mistakes raise a one-line error at trace time.

>>> import jax.numpy as jnp
>>> float(mse(jnp.ones(4), jnp.zeros(4)))
1.0
"""

import difflib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

_REDUCTIONS = ("mean", "none")


def _f32(x):
    return jnp.asarray(x).astype(jnp.float32)


def _check_reduction(fn, reduction):
    if reduction not in _REDUCTIONS:
        close = difflib.get_close_matches(str(reduction), _REDUCTIONS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{fn}: unknown reduction {reduction!r}: use 'mean' or 'none'{hint}")


def _check_same_shape(fn, a_name, a, b_name, b):
    if a.shape != b.shape:
        fix = "reshape one of them"
        if a.ndim == b.ndim + 1 and a.shape[-1] == 1 and a.shape[:-1] == b.shape:
            fix += f" (for example {b_name}[..., None] or {a_name}[..., 0])"
        elif b.ndim == a.ndim + 1 and b.shape[-1] == 1 and b.shape[:-1] == a.shape:
            fix += f" (for example {a_name}[..., None] or {b_name}[..., 0])"
        raise ValueError(
            f"{fn}: {a_name} shape {a.shape} does not match {b_name} shape {b.shape}; {fix}"
        )


def _check_mask(fn, mask, shape):
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.shape != shape:
        raise ValueError(
            f"{fn}: mask shape {mask.shape} does not match the per-example shape {shape}; "
            "pass one 0/1 or bool entry per label"
        )
    return _f32(mask)


def _reduce(loss, mask, reduction):
    """Mean over masked-in elements (all when mask is None), or the zero-masked values."""
    if mask is None:
        return loss if reduction == "none" else jnp.mean(loss)
    loss = loss * mask
    if reduction == "none":
        return loss
    return jnp.sum(loss) / jnp.maximum(jnp.sum(mask), 1.0)


def _check_class_labels(fn, logits, labels):
    if logits.ndim < 1 or logits.shape[:-1] != labels.shape:
        fix = "pass integer class ids with the logits shape minus the class axis"
        if logits.shape == labels.shape:
            fix += " (for one-hot labels use labels.argmax(-1))"
        raise ValueError(
            f"{fn}: labels shape {labels.shape} does not match logits shape {logits.shape} "
            f"without its class axis {logits.shape[:-1]}; {fix}"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"{fn}: labels must be integer class ids, got dtype {labels.dtype}; "
            "cast them with labels.astype(jnp.int32)"
        )


def mse(predictions, targets, *, reduction="mean"):
    """Mean squared error between ``predictions`` and ``targets`` of the same shape."""
    _check_reduction("mse", reduction)
    predictions, targets = _f32(predictions), _f32(targets)
    _check_same_shape("mse", "predictions", predictions, "targets", targets)
    return _reduce(jnp.square(predictions - targets), None, reduction)


def binary_cross_entropy_with_logits(logits, labels, *, reduction="mean"):
    """Sigmoid cross-entropy of ``logits`` against 0/1 ``labels`` (float or int), same shape."""
    fn = "binary_cross_entropy_with_logits"
    _check_reduction(fn, reduction)
    logits, labels = _f32(logits), _f32(labels)
    _check_same_shape(fn, "logits", logits, "labels", labels)
    return _reduce(optax.sigmoid_binary_cross_entropy(logits, labels), None, reduction)


def softmax_cross_entropy(logits, labels, *, label_smoothing=0.0, mask=None, reduction="mean"):
    """Softmax cross-entropy of ``logits`` (..., C) against integer ``labels`` (...).

    ``label_smoothing`` mixes the one-hot target with the uniform one:
    ``(1 - ls) * onehot + ls / C``.
    ``mask`` (...) selects the positions that count: the mean is over masked-in positions only and
    ``reduction="none"`` returns zeros at masked-out positions.
    """
    fn = "softmax_cross_entropy"
    _check_reduction(fn, reduction)
    logits, labels = _f32(logits), jnp.asarray(labels)
    _check_class_labels(fn, logits, labels)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{fn}: label_smoothing={label_smoothing} must lie in [0, 1]")
    mask = _check_mask(fn, mask, labels.shape)
    if label_smoothing == 0.0:
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    else:
        num_classes = logits.shape[-1]
        onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
        targets = (1.0 - label_smoothing) * onehot + label_smoothing / num_classes
        loss = optax.softmax_cross_entropy(logits, targets)
    return _reduce(loss, mask, reduction)


def kl_divergence(p_logits, q_logits, *, reduction="mean"):
    """KL(p || q) over the last axis, with p and q given as logits of the same shape."""
    fn = "kl_divergence"
    _check_reduction(fn, reduction)
    p_logits, q_logits = _f32(p_logits), _f32(q_logits)
    _check_same_shape(fn, "p_logits", p_logits, "q_logits", q_logits)
    if p_logits.ndim < 1:
        raise ValueError(f"{fn}: logits need a class axis, got a scalar; pass shape (..., C)")
    log_p = jax.nn.log_softmax(p_logits)
    log_q = jax.nn.log_softmax(q_logits)
    loss = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return _reduce(loss, None, reduction)


def accuracy(logits, labels, *, mask=None):
    """Fraction of correct predictions (a float32 scalar), over masked-in positions if ``mask``.

    Multi-class logits (..., C) with integer labels (...) use the argmax. Binary logits of the
    labels' shape, or (..., 1), predict ``logits > 0`` against 0/1 labels.
    """
    fn = "accuracy"
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    if logits.shape == labels.shape:
        correct = (logits > 0) == (labels > 0.5)
    elif logits.ndim >= 1 and logits.shape[-1] == 1 and logits.shape[:-1] == labels.shape:
        correct = (logits[..., 0] > 0) == (labels > 0.5)
    else:
        _check_class_labels(fn, logits, labels)
        correct = jnp.argmax(logits, axis=-1) == labels
    mask = _check_mask(fn, mask, labels.shape)
    return _reduce(correct.astype(jnp.float32), mask, "mean")


class Weighted(NamedTuple):
    """A loss given as its sum and the weight it is a sum over (e.g. the count of real tokens).

    A `loss_fn` that returns `(Weighted(total, weight), aux)` is averaged exactly: gradient
    accumulation, the data-parallel reduction and evaluation all compute `sum(total) /
    sum(weight)` over everything they see, not a mean of per-batch means.
    """

    total: jax.Array
    weight: jax.Array


def weighted_mean(values, mask=None) -> Weighted:
    """`values` (...) as a `Weighted` sum over the masked-in positions (all when `mask` is None).

    >>> import jax.numpy as jnp
    >>> w = weighted_mean(jnp.array([1.0, 3.0, 9.0]), jnp.array([1, 1, 0]))
    >>> float(w.total), float(w.weight)
    (4.0, 2.0)
    """
    values = _f32(values)
    weight = jnp.ones_like(values) if mask is None else jnp.broadcast_to(_f32(mask), values.shape)
    return Weighted(jnp.sum(values * weight), jnp.sum(weight))


# Ready-made `loss_fn(model, batch, rng) -> (loss, aux)` for batches of `{"x": ..., "y": ...}`.
def mse_loss(model, batch, rng):
    """Mean squared error of `model(x)` against `y`."""
    pred = model(batch["x"], rng)  # (B, out)
    return mse(pred, batch["y"]), {}


def bce_loss(model, batch, rng):
    """Binary cross-entropy of logits `model(x)` against 0/1 labels `y`; reports accuracy."""
    logits = model(batch["x"], rng)  # (B, 1)
    loss = binary_cross_entropy_with_logits(logits, batch["y"])
    return loss, {"accuracy": accuracy(logits, batch["y"])}


def softmax_ce_loss(model, batch, rng):
    """Softmax cross-entropy of `model(x)` against integer classes `y`; reports accuracy."""
    logits = model(batch["x"], rng)  # (B, C)
    loss = softmax_cross_entropy(logits, batch["y"])
    return loss, {"accuracy": accuracy(logits, batch["y"])}


def lm_loss(model, batch, rng):
    """Next-token cross-entropy of a language model, averaged exactly over the counted tokens.

    `batch` holds `x` and `y` (B, T) token ids and, for packed rows, `positions` and `segment_ids`
    (passed to the model) and `weights` (B, T): 0 on padding and on each document's last token,
    whose target would belong to the next document. Reports token accuracy.
    """
    extra = {k: batch[k] for k in ("positions", "segment_ids") if k in batch}
    logits = model(batch["x"], rng, **extra)  # (B, T, V)
    mask = batch.get("weights")
    ce = softmax_cross_entropy(logits, batch["y"], reduction="none")  # (B, T)
    return weighted_mean(ce, mask), {"accuracy": accuracy(logits, batch["y"], mask=mask)}


LOSS_FNS = {"mse": mse_loss, "bce": bce_loss, "softmax_ce": softmax_ce_loss, "lm": lm_loss}


def get_loss_fn(name: str):
    """The ready-made loss function called `name` (`mse`, `bce`, `softmax_ce`, `lm`)."""
    if name not in LOSS_FNS:
        close = difflib.get_close_matches(name, list(LOSS_FNS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown train.loss {name!r}: use one of {', '.join(LOSS_FNS)}{hint}")
    return LOSS_FNS[name]
