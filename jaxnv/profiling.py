"""Throughput figures for the loop: FLOPs per step, device peak, MFU, and profiler windows.

flops = step_flops(train_step.fn, state, batch)       # from XLA's cost analysis
peak = measure_peak_flops(jnp.float32)                 # a large matmul, timed
mfu = flops * steps_per_sec / peak
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def step_flops(jitted, *args) -> float:
    """FLOPs of one call of a jitted function, from XLA's cost analysis (0.0 if unavailable).

    Uses the lowered (unoptimized) module, so it costs a trace but no second compilation.
    """
    try:
        cost = jitted.lower(*args).cost_analysis()
    except Exception:  # noqa: BLE001 - some backends have no cost model; MFU is then omitted
        return 0.0
    if isinstance(cost, list | tuple):  # older jax: one dict per device program
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def measure_peak_flops(dtype=jnp.float32, n: int | None = None, repeats: int = 3) -> float:
    """FLOP/s of the best of `repeats` timed `n x n @ n x n` matmuls in `dtype` on device 0."""
    if n is None:
        n = 1024 if jax.default_backend() == "cpu" else 8192
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def parse_window(spec: str) -> tuple[int, int] | None:
    """`"a:b"` -> (a, b) with 0 <= a < b; "" -> None; anything else is a one-line ValueError."""
    if not spec:
        return None
    try:
        a, b = (int(p) for p in spec.split(":"))
    except ValueError:
        a = b = -1
    if not 0 <= a < b:
        raise ValueError(
            f"logging.profile_steps={spec!r} is not a window 'a:b' with 0 <= a < b: "
            "write it like logging.profile_steps=10:15"
        )
    return a, b


class ProfileWindow:
    """Starts a `jax.profiler` trace before step `a` and stops it after step `b - 1`.

    The trace lands in `logdir/plugins/profile/`, where TensorBoard's profile tab finds it.
    """

    def __init__(self, spec: str, logdir: str | None):
        self.window = parse_window(spec)
        self.logdir = logdir
        self.active = False

    def before_step(self, step: int) -> None:
        if self.window and self.logdir and step == self.window[0]:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def after_step(self, step: int, state) -> None:
        if self.active and step + 1 >= self.window[1]:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
