"""Throughput figures for the loop: FLOPs per step, device peak, MFU, and profiler windows.

flops = step_flops(train_step.fn, state, batch)       # from XLA's cost analysis
peak = measure_peak_flops(jnp.float32)                 # a large matmul, timed
mfu = flops * steps_per_sec / peak
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


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


def _trace_events(logdir: str) -> list[dict]:
    import glob
    import gzip
    import json

    files = sorted(glob.glob(f"{logdir}/**/*.trace.json.gz", recursive=True))
    if not files:
        return []
    with gzip.open(files[-1], "rt", encoding="utf-8") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def _hlo_ops(hlo_text: str) -> dict[str, str]:
    """instruction name -> 'shape  op_name' from a compiled module's text."""
    import re

    ops = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+) ", line)
        if m:
            source = re.search(r'op_name="([^"]*)"', line)
            ops[m.group(1)] = f"{m.group(2)}  {source.group(1) if source else ''}".strip()
    return ops


def op_profile(
    jitted, *args, steps: int = 3, top: int = 25, carry: bool = False
) -> list[tuple[str, float, str]]:
    """Where one call of `jitted(*args)` spends its time, by XLA op: `[(op, ms per call, what)]`.

    Runs `steps` calls under `jax.profiler.trace` and sums each compiled op's (fusion's,
    library call's) durations; `what` is the op's shape and the JAX source it came from. A
    `"[category] ..."` row per op kind (fusion names without their number) comes first. On the
    CPU, XLA emits per-op events only with XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true set
    before JAX starts; without it the list is empty. With `carry`, each call's first output
    becomes the next call's first argument (a train step that donates its state).

        rows = op_profile(train_step.fn, state, batch, carry=True)
    """
    import collections
    import re
    import tempfile

    compiled = jitted.lower(*args).compile()
    names = _hlo_ops(compiled.as_text())

    def call(args):
        out = compiled(*args)
        return out, ((out[0], *args[1:]) if carry else args)

    out, args = call(args)  # warm up outside the trace
    jax.block_until_ready(out)
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            for _ in range(steps):
                out, args = call(args)
            jax.block_until_ready(out)
        events = _trace_events(logdir)
    per_op, per_kind = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and name in names:
            per_op[name] += e.get("dur", 0) / 1e3 / steps
            per_kind[re.sub(r"\.\d+$", "", name)] += e.get("dur", 0) / 1e3 / steps
    rows = [(f"[category] {k}", ms, "") for k, ms in per_kind.most_common(top)]
    return rows + [(k, ms, names[k]) for k, ms in per_op.most_common(top)]


@functools.cache
def _peak(dtype_name: str) -> float:
    return measure_peak_flops(jnp.dtype(dtype_name))


def flops_and_peak(log, run, state, batch) -> tuple[float, float]:
    """Model FLOPs per step *per device* and one device's peak (declared or measured once), for
    a train `run` (`train.loop.Run`) and its logging section `log`.

    A model with `flops_per_token(seq_len)` (the transformer: 6N + attention) is counted by its
    formula over the batch's tokens, the usual MFU convention, which leaves out the recomputation
    of remat. Otherwise XLA's cost analysis of the step, which counts a loop body once: it is
    multiplied by the number of micro-batches (whose loop holds nearly all the work). Both count
    the global batch, which the mesh's devices share.
    """
    if not log.mfu:
        return 0.0, 0.0
    model = nnx.merge(run.graphdef, state.params, state.model_state)
    x = batch.get("x") if isinstance(batch, dict) else None
    if hasattr(model, "flops_per_token") and x is not None and np.ndim(x) == 2:
        flops = model.flops_per_token(x.shape[1]) * np.size(x)
    else:
        flops = step_flops(run.train_step.fn, state, batch) * run.micro_batches
    peak = log.peak_flops or _peak(jnp.dtype(run.policy.compute_dtype).name)
    return flops / run.plan.mesh.size, peak
