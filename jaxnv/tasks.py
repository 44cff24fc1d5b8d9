"""Ready-made `loss_fn(model, batch, rng) -> (loss, aux)` for batches of `{"x": ..., "y": ...}`."""

from __future__ import annotations

import difflib

from jaxnv import losses


def mse_loss(model, batch, rng):
    """Mean squared error of `model(x)` against `y`."""
    pred = model(batch["x"], rng)  # (B, out)
    return losses.mse(pred, batch["y"]), {}


def bce_loss(model, batch, rng):
    """Binary cross-entropy of logits `model(x)` against 0/1 labels `y`; reports accuracy."""
    logits = model(batch["x"], rng)  # (B, 1)
    loss = losses.binary_cross_entropy_with_logits(logits, batch["y"])
    return loss, {"accuracy": losses.accuracy(logits, batch["y"])}


def softmax_ce_loss(model, batch, rng):
    """Softmax cross-entropy of `model(x)` against integer classes `y`; reports accuracy."""
    logits = model(batch["x"], rng)  # (B, C)
    loss = losses.softmax_cross_entropy(logits, batch["y"])
    return loss, {"accuracy": losses.accuracy(logits, batch["y"])}


LOSS_FNS = {"mse": mse_loss, "bce": bce_loss, "softmax_ce": softmax_ce_loss}


def get_loss_fn(name: str):
    """The ready-made loss function called `name` (`mse`, `bce`, `softmax_ce`)."""
    if name not in LOSS_FNS:
        close = difflib.get_close_matches(name, list(LOSS_FNS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown train.loss {name!r}: use one of {', '.join(LOSS_FNS)}{hint}")
    return LOSS_FNS[name]
