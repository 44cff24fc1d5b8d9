"""Hooks the loop calls on the host between steps, and early stopping built on them."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from jaxnv.core.state import TrainState

if TYPE_CHECKING:
    from jaxnv.train.loop import TrainResult


@dataclasses.dataclass
class StepInfo:
    """What a hook sees after a step: values already on the host. `state` is the live state,
    valid during the call only (the next step donates its buffers): copy what you keep."""

    step: int  # steps done
    metrics: dict[str, float]
    state: TrainState


class Callback:
    """Hooks called on the host between steps; override what you need. `on_step` and `on_eval`
    may return True to stop the run (after a checkpoint of that step)."""

    def on_step(self, info: StepInfo) -> bool | None:
        """After every step, with that step's metrics fetched (a device sync each step)."""

    def on_log(self, step: int, split: str, scalars: dict[str, float], state: TrainState):
        """After each logged window (`split="train"`) and each evaluation (`"eval"`)."""

    def on_eval(self, step: int, metrics: dict[str, float], state: TrainState) -> bool | None:
        """After each evaluation, with its metrics (custom evaluators' included)."""

    def on_save(self, step: int, directory: str):
        """After a checkpoint of `step` was started under `directory`."""

    def on_end(self, result: TrainResult):
        """Once, after the last step and the final evaluation."""


class EarlyStopping(Callback):
    """Stop when the eval `metric` has not improved by `min_delta` in `patience` evaluations."""

    def __init__(self, metric: str = "loss", patience: int = 3, mode: str = "min", min_delta=0.0):
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping mode={mode!r}: use 'min' or 'max'")
        self.metric, self.patience, self.mode, self.min_delta = metric, patience, mode, min_delta
        self.best: float | None = None
        self.waited = 0

    def on_eval(self, step, metrics, state):
        if self.metric not in metrics:
            raise KeyError(f"EarlyStopping: no eval metric {self.metric!r} in {sorted(metrics)}")
        value = metrics[self.metric] * (1 if self.mode == "min" else -1)
        if self.best is None or value < self.best - self.min_delta:
            self.best, self.waited = value, 0
            return False
        self.waited += 1
        return self.waited >= self.patience
