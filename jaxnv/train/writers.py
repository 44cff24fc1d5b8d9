"""Metric writers: `metrics.jsonl`, TensorBoard scalars and a tqdm progress bar.

Each takes `write(step, split, scalars)` with host-side Python floats and `close()`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import numpy as np


def to_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Host floats from device/numpy scalars (bools become 0.0/1.0)."""
    return {k: float(np.asarray(v, dtype=np.float64)) for k, v in metrics.items()}


class JsonlWriter:
    """One JSON object a line: `{"step": s, "split": "train", "loss": ...}`."""

    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
        row = {"step": int(step), "split": split}
        row.update({k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()})
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class TensorBoardWriter:
    """Scalars under `split/name` in a TensorBoard event file (tensorboardX)."""

    def __init__(self, logdir: str, purge_step: int | None = None):
        from tensorboardX import SummaryWriter

        # purge_step: TensorBoard discards this run's earlier points at or after it (a resume).
        # Event files are named by the second they were created in: the suffix keeps a resume
        # in the same second from overwriting the earlier file, and sorts it after that file.
        suffix = f".{purge_step or 0:012d}.{os.getpid()}"
        self._w = SummaryWriter(logdir, purge_step=purge_step, filename_suffix=suffix)

    def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self._w.add_scalar(f"{split}/{k}", v, global_step=int(step))

    def close(self) -> None:
        self._w.close()


class ProgressWriter:
    """Progress on the console: a tqdm bar over the steps (its rate is steps/s; the postfix shows
    loss, accuracy and tokens/s) on a terminal, else one line a logged window (logs, `launch`)."""

    KEYS = ("loss", "accuracy", "tokens_per_sec")

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, tty: bool | None = None):
        from tqdm import tqdm

        self.total, self.enabled = total, enabled
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._bar = tqdm(
            total=total, initial=initial, disable=not (enabled and self.tty), unit="step"
        )
        self._last = initial

    def start_at(self, step: int) -> None:
        self._bar.update(step - self._last)
        self._last = step

    def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
        shown = {k: scalars[k] for k in self.KEYS if k in scalars}
        if split == "train" and self.tty:
            self._bar.update(step - self._last)
            self._last = step
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})
            return
        if split == "train":
            if not self.enabled:
                return
            shown = {**shown, "steps_per_sec": scalars.get("steps_per_sec", float("nan"))}
        else:
            shown = scalars
        text = ", ".join(f"{k}={v:.4g}" for k, v in shown.items())
        self._bar.write(f"step {step}/{self.total} {split}: {text}")

    def close(self) -> None:
        self._bar.close()


class Writers:
    """Fan-out to several writers; `open(workdir)` makes the standard set."""

    def __init__(self, writers):
        self.writers = list(writers)

    @classmethod
    def open(
        cls,
        workdir: str | None,
        total_steps: int,
        *,
        tensorboard=True,
        progress=True,
        console=True,
        purge_step: int | None = None,
    ):
        writers: list[Any] = [ProgressWriter(total_steps, enabled=progress)] if console else []
        if workdir is not None:
            os.makedirs(workdir, exist_ok=True)
            writers.append(JsonlWriter(os.path.join(workdir, "metrics.jsonl")))
            if tensorboard:
                tb_dir = os.path.join(workdir, "tensorboard")
                writers.append(TensorBoardWriter(tb_dir, purge_step))
        return cls(writers)

    def start_at(self, step: int) -> None:
        """Resume the progress bar at `step`."""
        for w in self.writers:
            if isinstance(w, ProgressWriter):
                w.start_at(step)

    def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
        for w in self.writers:
            w.write(step, split, scalars)

    def close(self) -> None:
        for w in self.writers:
            w.close()


class Throughput:
    """Steps/s, examples/s (and tokens/s for token data) between successive `tick(step)` calls."""

    def __init__(self, step: int, batch_size: int, tokens_per_example: int = 0):
        self.batch_size, self.tokens_per_example = batch_size, tokens_per_example
        self._t, self._step = time.perf_counter(), step

    def tick(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        dt, n = now - self._t, step - self._step
        self._t, self._step = now, step
        sps = n / dt if dt > 0 else 0.0
        out = {"steps_per_sec": sps, "examples_per_sec": sps * self.batch_size}
        if self.tokens_per_example:
            out["tokens_per_sec"] = out["examples_per_sec"] * self.tokens_per_example
        return out


def tokens_per_example(batch) -> int:
    """Tokens in one example when inputs are integer tokens (language data), else 0."""
    x = batch.get("x") if isinstance(batch, dict) else None
    if x is None or not np.issubdtype(np.asarray(x).dtype, np.integer):
        return 0
    return int(np.prod(np.shape(x)[1:]))


class BestTracker:
    """The best value of one eval metric and the step it came from."""

    def __init__(self, metric: str, mode: str):
        self.metric, self.mode = metric, mode
        self.step: int | None = None
        self.value: float | None = None

    def update(self, step: int, scalars: dict[str, float]) -> bool:
        """Record `scalars` of `step`; True when it is a new best."""
        if not self.metric or self.metric not in scalars:
            return False
        v = scalars[self.metric]
        better = self.value is None or (v < self.value if self.mode == "min" else v > self.value)
        if better:
            self.step, self.value = step, v
        return better

    def summary(self) -> dict[str, Any]:
        if self.step is None:
            return {}
        return {f"best_eval_{self.metric}": self.value, "best_step": self.step}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "value": self.value}

    def load(self, saved: dict[str, Any]) -> None:
        self.step, self.value = saved.get("step"), saved.get("value")
