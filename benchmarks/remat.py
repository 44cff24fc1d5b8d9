"""Rematerialisation: step time and peak memory of the transformer with remat none / full / dots.

Run:  jaxnv bench remat [--quick] [--repeats 7] [--record]

The step is jaxnv's real train step: `jaxnv.train.build` on `experiments/char_gpt` (fp32,
adamw, 128 wide, 4 heads) with `model.remat=none|full|dots`, `data.seq_len=512`,
`train.batch_size=4`, 4 layers, lowered and compiled once per setting from the same initial state
and batch. At 4 x 512 the attention scores and probabilities (B, N, T, T) are 17 MB per tensor
per layer, so activations, not the 10 MB train state, fill the memory. The settings:

- none: every residual of the forward pass is kept for the backward pass (353 MB of residuals
  by `jax.ad_checkpoint.print_saved_residuals`, 200 MB of them the (B, N, T, T) tensors);
- full: each block under `jax.checkpoint`, saving only its input (13 MB), all recomputed;
- dots: `dots_with_no_batch_dims_saveable`, saving the projections' outputs (55 MB) and
  recomputing attention and the elementwise ops.

Figures per setting:

- step: median of `repeats` single steps, the three settings interleaved (state donated, the
  step's metrics fetched so the step is done).
- temp: `compiled.memory_analysis().temp_size_in_bytes`, XLA's buffer assignment for everything
  the step allocates besides its arguments and outputs: activations, residuals kept for the
  backward pass, gradients and scratch. This is the figure remat changes, and the one to read.
- peak (plan): temp + arguments + outputs - aliased (the donated state's buffers reused for the
  new state): the executable's whole footprint as XLA plans it.
- RSS growth: the process's resident memory sampled every ~0.5 ms during one step, highest
  value minus the value just before the step; freed pages are handed back first
  (`malloc_trim`), the larger of two tries. It confirms the plan's temp on the real allocator.

XLA's CPU backend schedules with its concurrency-optimised scheduler by default
(`--xla_cpu_enable_concurrency_optimized_scheduler`), which orders the step for parallelism, not
memory: with it, remat saves almost no memory, and the temp of a fully rematerialised step still
grows by a whole layer's attention tensors per layer (345 MB at 2 layers, 652 MB at 4, B=8), as
if the recomputed blocks were all alive at once. The second group of rows repeats the
measurement in a child process with that flag set to false. Loss and grad norm of the first step
must agree across settings (fp32, 1e-5 relative); the largest difference is given under the
table. `--quick`: 2 layers, 4 x 128, 3 repeats, no
timing in the child.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import threading
import time

import jax
import numpy as np
from _common import interleave, parser, report

from jaxnv import apply_overrides
from jaxnv.experiment import load_experiment
from jaxnv.parallel import put_batch
from jaxnv.train import build

SETTINGS = ("none", "full", "dots")
FULL = {"seq_len": 512, "batch": 4, "layers": 4}
QUICK = {"seq_len": 128, "batch": 4, "layers": 2}
NO_CONCURRENCY = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
PAGE = os.sysconf("SC_PAGE_SIZE")
_LIBC = ctypes.CDLL("libc.so.6")


def _rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * PAGE


def rss_growth(fn) -> int:
    """Highest resident memory while `fn()` runs, minus the value just before."""
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    # the previous step's buffers are freed just after it returns, and glibc keeps freed pages:
    # wait, then hand them back, or the baseline would already hold this step's memory
    time.sleep(0.05)
    _LIBC.malloc_trim(0)
    before = _rss()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    fn()
    done.set()
    thread.join()
    return max(peak[0], _rss()) - before


class Setting:
    """One remat setting: its compiled train step, its own state, the same first batch."""

    def __init__(self, remat: str, size: dict):
        exp = load_experiment("char_gpt")
        exp.config = apply_overrides(
            exp.config,
            [
                f"model.remat={remat}",
                f"model.num_layers={size['layers']}",
                f"data.seq_len={size['seq_len']}",
                f"train.batch_size={size['batch']}",
                "logging.progress=false",
                "logging.mfu=false",
            ],
        )
        run = build(exp, jax.devices()[:1])
        self.batch = put_batch(run.batches[0], run.plan.batch)
        self.compiled = run.train_step.fn.lower(run.state, self.batch).compile()
        self.memory = self.compiled.memory_analysis()
        self.state = run.state
        self.first = None  # the first step's metrics, from the shared initial state

    def step(self) -> float:
        start = time.perf_counter()
        self.state, metrics = self.compiled(self.state, self.batch)
        metrics = jax.device_get(metrics)  # waits for the step
        if self.first is None:
            self.first = {k: float(metrics[k]) for k in ("loss", "grad_norm")}
        return time.perf_counter() - start

    def figures(self) -> dict:
        m = self.memory
        args, out, alias = m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes
        return {
            "temp": m.temp_size_in_bytes,
            "peak": m.temp_size_in_bytes + args + out - alias,
        }


def measure(size: dict, repeats: int, timing: bool) -> dict:
    """Figures per setting: temp, peak, and (with `timing`) step seconds and RSS growth."""
    settings = {name: Setting(name, size) for name in SETTINGS}
    out = {name: s.figures() for name, s in settings.items()}
    if not timing:
        return out
    for s in settings.values():
        s.step()  # warm-up; records the first step's loss and grad norm
    for name, s in settings.items():
        out[name]["rss"] = max(rss_growth(s.step) for _ in range(2))  # see rss_growth
    steps = interleave({n: s.step for n, s in settings.items()}, repeats, warmup=0)
    for name, s in settings.items():
        out[name] |= {"step": steps[name], **s.first}
    return out


def child(size: dict, repeats: int, timing: bool) -> dict:
    """`measure` in a new process whose XLA does not use the concurrency-optimised scheduler."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + NO_CONCURRENCY).strip()
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import remat; "
        "print('RESULT ' + json.dumps(remat.measure(json.loads(sys.argv[2]), "
        "int(sys.argv[3]), sys.argv[4] == '1')))"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    argv = [sys.executable, "-c", code, here, json.dumps(size), str(repeats), str(int(timing))]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def rows_of(label: str, figures: dict) -> list[tuple]:
    base = figures["none"]
    rows = []
    for name in SETTINGS:
        f = figures[name]
        step = f"{f['step'] * 1e3:.0f} ms ({f['step'] / base['step']:.2f}x)" if "step" in f else "-"
        rss = f"{f['rss'] / 1e6:.0f} MB" if "rss" in f else "-"
        rows.append(
            (
                f"{label}, remat={name}",
                step,
                f"{f['temp'] / 1e6:.0f} MB",
                f"{f['temp'] / base['temp']:.2f}",
                f"{f['peak'] / 1e6:.0f} MB",
                rss,
            )
        )
    return rows


def main():
    args = parser(__doc__).parse_args()
    size = QUICK if args.quick else FULL
    if args.quick:
        args.repeats = min(args.repeats, 3)
    start_load = os.getloadavg()[0]
    default = measure(size, args.repeats, timing=True)
    no_conc = child(size, args.repeats, timing=not args.quick)
    loss = np.array([default[n]["loss"] for n in SETTINGS])
    norm = np.array([default[n]["grad_norm"] for n in SETTINGS])
    diff = max(np.ptp(loss) / abs(loss[0]), np.ptp(norm) / abs(norm[0]))
    for name in SETTINGS:  # the child's first steps must agree with the parent's too
        if "loss" in no_conc[name]:
            diff = max(diff, abs(no_conc[name]["loss"] - loss[0]) / abs(loss[0]))
    assert diff < 1e-5, f"remat settings disagree: relative difference {diff:.2e}"
    shape = f"{size['layers']} layers, B={size['batch']}, T={size['seq_len']}"
    rows = rows_of(f"XLA CPU defaults, {shape}", default)
    rows += rows_of(f"concurrency-optimised scheduler off, {shape}", no_conc)
    notes = (
        f"Load average {start_load:.1f} at the start. First-step loss "
        f"{loss[0]:.6f} and grad norm {norm[0]:.6f} agree across settings to {diff:.1e} "
        "(relative)."
    )
    report(
        "remat.py",
        ("case", "step (vs none)", "temp memory", "temp vs none", "peak (plan)", "RSS growth"),
        rows,
        args,
        notes=notes,
    )


if __name__ == "__main__":
    main()
