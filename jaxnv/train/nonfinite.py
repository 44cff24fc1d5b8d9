"""What the loop does when a step goes non-finite: `train.on_nonfinite=skip|stop|rollback`.

A step is *bad* when its loss is not finite, or when its gradients are not finite and no dynamic
loss scale is there to absorb it (with fp16 dynamic loss scaling, an overflow that halves the
scale is routine and never counts). The train step itself never applies a non-finite update;
this decides what the run does next. Checked on the host at every log step, from the per-step
metrics of the window (no extra device syncs): `skip` goes on, `stop` raises NonFiniteError naming
the step and the last good checkpoint, `rollback` reloads that checkpoint and goes on after the
logged window that held the bad step (the batches from the checkpoint to there are skipped).
"""

from __future__ import annotations

import math

POLICIES = ("skip", "stop", "rollback")


class NonFiniteError(RuntimeError):
    """The run stopped on a non-finite step; the message names the step and the last checkpoint."""


class NonFiniteMonitor:
    """Finds the first bad step of a logged window and applies the policy."""

    def __init__(self, policy: str, dynamic_loss_scale: bool, max_rollbacks: int = 3):
        if policy not in POLICIES:
            raise ValueError(
                f"unknown train.on_nonfinite {policy!r}: use one of {', '.join(POLICIES)}"
            )
        self.policy, self.dynamic = policy, dynamic_loss_scale
        self.max_rollbacks, self.rollbacks, self.skipped = max_rollbacks, 0, 0

    def first_bad(self, first_step: int, rows: list[dict[str, float]]) -> tuple[int | None, int]:
        """(step number of the first bad row, number of bad rows); rows are steps first_step, ..."""
        bad = [
            first_step + i
            for i, row in enumerate(rows)
            if not math.isfinite(row.get("loss", 0.0))
            or (row.get("grads_finite", 1.0) < 1.0 and not self.dynamic)
        ]
        return (bad[0] if bad else None), len(bad)

    def stop_message(self, step: int, last_good: int | None) -> str:
        where = f"step {last_good}" if last_good is not None else "none (no checkpoint yet)"
        return (
            f"non-finite loss or gradients at step {step}; the last good checkpoint is {where}: "
            "lower the learning rate, clip gradients, use loss scaling, or set "
            "train.on_nonfinite=rollback"
        )

    def should_rollback(self, step: int, last_good: int | None, count: int = 1) -> bool:
        """Apply the policy to a window whose first bad step is `step` (`count` bad steps): False
        to go on (skip), True to roll back; raises NonFiniteError to stop (also when rollback is
        impossible or keeps failing)."""
        if self.policy == "skip":
            self.skipped += count
            return False
        if self.policy == "rollback" and last_good is not None:
            if self.rollbacks < self.max_rollbacks:
                self.rollbacks += 1
                return True
        raise NonFiniteError(self.stop_message(step, last_good))
