"""Preemption: SIGTERM / SIGINT ask the loop to save and stop after the current step.

    with PreemptionGuard() as guard:
        for step in ...:
            ...
            if guard.should_stop(step):   # all processes agree
                save(step); raise Preempted(step)

A second signal aborts at once: it raises KeyboardInterrupt("second SIGINT: aborting") wherever
the main thread is, and the CLI reports that in one line (exit 128 + the signal's number).
`Preempted` carries the step that was saved; the CLI exits with `EXIT_PREEMPTED` (75, "temporary
failure: run again to resume").
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np

EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Training stopped on a signal after checkpointing `step`."""

    def __init__(self, step: int, signum: int):
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step} was checkpointed: "
            "run the same command again to resume"
        )
        self.step, self.signum = step, signum


class PreemptionGuard:
    """Catches SIGTERM/SIGINT while active (main thread only; elsewhere it never fires)."""

    def __init__(self, sync_every: int = 1):
        self.signum: int | None = None
        self.sync_every = max(1, sync_every)
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame):
        if self.signum is not None:  # second signal: give up at once
            for sig, old in self._previous.items():
                signal.signal(sig, old)
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting")
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous.clear()
        return False

    def should_stop(self, step: int) -> bool:
        """True when any process got a signal; in multi-process runs the processes agree every
        `sync_every` steps (a collective), so they stop and save at the same step."""
        if jax.process_count() == 1:
            return self.signum is not None
        if step % self.sync_every:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
        hit = int(np.max(flags))
        if hit and self.signum is None:
            self.signum = hit
        return bool(hit)
