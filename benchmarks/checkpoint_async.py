"""Checkpoints: how long a save blocks the loop (async against sync), and save/restore MB/s.

Run:  jaxnv bench checkpoint_async [--quick] [--repeats 7] [--dir DIR] [--record]

The state is a real jaxnv `TrainState` (MLP params and adamw moments, fp32, after a few steps so
the moments are not zeros) built by `jaxnv.train.build`. Everything is written under `--dir`
(default: a new temporary directory beside the system's temp files), `keep=2` so that old steps
are deleted as in a run. Per state size:

- blocking: `maybe_save(step, state, meta, force=True)` until it returns, nothing else running.
  That is how long the loop stands still at a save step. Target: async <= 0.10 x sync.
- commit: from the call until `wait()` returns (the step directory renamed into place).
- loop cost: `maybe_save` then K jitted train steps (about 1 s of them, state donated) until
  the last one and the save have both finished, minus the same K steps with no save. The async
  write shares the host with the steps, so this is the blocking time plus what the background
  write takes from the steps. Paired within each repeat (the order alternates); the table also
  gives its interquartile range, because the step time of a shared machine drifts by 10-20 %.
- save MB/s: state bytes over the time of one synchronous `Checkpointer` save (orbax: OCDBT,
  fsynced, old step deleted), against numpy writing the same arrays: `np.save` of each leaf
  into a new directory, each file fsynced, the directory renamed into place and the one from two
  saves back deleted. `compress=True` is jaxnv's old default (zstd), for before/after.
- restore MB/s: `Checkpointer.restore` onto the state's shardings until the arrays are ready,
  against `np.load(allow_pickle=False)` of each file plus `jax.device_put`. Both read files
  written moments before, so both come from the page cache: this is the software's speed, not
  the disk's.

Contenders run interleaved in one process after a warm-up round; medians of `repeats`; ratios
last (async/sync, jaxnv/numpy). `--quick`: one tiny state, 3 repeats, a short loop.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np
from _common import interleave, parser, report, timed
from absl import logging as absl_logging

from jaxnv import apply_overrides
from jaxnv import config as config_lib
from jaxnv.checkpoint import Checkpointer
from jaxnv.experiment import load_experiment
from jaxnv.parallel import put_batch
from jaxnv.train import build

CASES = {  # name: model.features of binary_classification's MLP (2 inputs, 1 output)
    "mlp 2-2048x2-1": "2048,2048",
    "mlp 2-2048x4-1": "2048,2048,2048,2048",
}
QUICK_CASES = {"mlp 2-256x2-1": "256,256"}


def _steps(run, state, batch, k):
    for _ in range(k):
        state, _ = run.train_step(state, batch)
    return jax.block_until_ready(state)


class NumpyCheckpoints:
    """The plain baseline: one `.npy` per leaf, fsynced, renamed into place, keep 2."""

    def __init__(self, directory: str):
        self.directory = directory
        self.steps: list[int] = []
        os.makedirs(directory, exist_ok=True)

    def save(self, step: int, state) -> None:
        arrays = [np.asarray(x) for x in jax.device_get(jax.tree.leaves(state))]
        tmp = os.path.join(self.directory, f"{step}.tmp")
        os.makedirs(tmp)
        for i, a in enumerate(arrays):
            with open(os.path.join(tmp, f"{i}.npy"), "wb") as f:
                np.save(f, a, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, os.path.join(self.directory, str(step)))
        self.steps.append(step)
        while len(self.steps) > 2:
            shutil.rmtree(os.path.join(self.directory, str(self.steps.pop(0))))

    def restore(self, target):
        leaves, treedef = jax.tree.flatten(target)
        folder = os.path.join(self.directory, str(self.steps[-1]))
        out = [
            jax.device_put(
                np.load(os.path.join(folder, f"{i}.npy"), allow_pickle=False), x.sharding
            )
            for i, x in enumerate(leaves)
        ]
        return jax.tree.unflatten(treedef, out)


def bench_case(features, repeats, root, loop_seconds):
    exp = load_experiment("binary_classification")
    exp.config = apply_overrides(
        exp.config, [f"model.features={features}", "train.batch_size=32", "logging.progress=false"]
    )
    run = build(exp, jax.devices()[:1])
    meta = {"config": config_lib.to_dict(run.cfg), "version": "bench"}
    batch = put_batch(run.batches[0], run.plan.batch)
    state = _steps(run, run.state, batch, 2)  # compiles; moments are no longer zeros
    start = time.perf_counter()
    state = _steps(run, state, batch, 5)
    k = max(5, round(loop_seconds / ((time.perf_counter() - start) / 5)))
    mb = sum(x.nbytes for x in jax.tree.leaves(state)) / 1e6
    info = {"params": sum(x.size for x in jax.tree.leaves(state.params)), "mb": mb, "k": k}
    path = os.path.join(root, features.replace(",", "x"))
    ckpts = {
        name: Checkpointer(os.path.join(path, name), keep=2, async_save=on)
        for name, on in (("sync", False), ("async", True))
    }
    zstd = Checkpointer(os.path.join(path, "zstd"), keep=2, async_save=False, compress=True)
    plain = NumpyCheckpoints(os.path.join(path, "numpy"))
    step = 0

    def save(ckpt):
        nonlocal step
        step += 1
        assert ckpt.maybe_save(step, state, meta, force=True)

    # 1. blocking and commit, sync against async
    commit = {"sync": [], "async": []}

    def blocking(name):
        def fn():
            ckpt = ckpts[name]
            ckpt.wait()
            t0 = time.perf_counter()
            save(ckpt)
            t1 = time.perf_counter()
            ckpt.wait()
            commit[name].append(time.perf_counter() - t0)
            return t1 - t0

        return fn

    block = interleave({n: blocking(n) for n in ckpts}, repeats)
    med = {("block", n): block[n] for n in ckpts}
    med |= {("commit", n): statistics.median(v[1:]) for n, v in commit.items()}  # no warm-up

    # 2. loop cost: K steps with a save minus K steps without, paired within each repeat
    loop_cost = {name: [] for name in ckpts}
    bare = []
    for r in range(repeats):
        order = ["none", *ckpts] if r % 2 == 0 else [*reversed(ckpts), "none"]
        loop = {}
        for name in order:
            ckpt = ckpts.get(name)
            t0 = time.perf_counter()
            if ckpt is not None:
                save(ckpt)
            state = _steps(run, state, batch, k)
            if ckpt is not None:
                ckpt.wait()
            loop[name] = time.perf_counter() - t0
        bare.append(loop["none"])
        for name in ckpts:
            loop_cost[name].append(loop[name] - loop["none"])
    med |= {("loop", n): statistics.median(v) for n, v in loop_cost.items()}
    iqr = {n: statistics.quantiles(v, n=4)[::2] for n, v in loop_cost.items()}

    # 3. save and restore throughput against numpy, same state, same disk
    state = jax.block_until_ready(state)

    def numpy_save():
        nonlocal step
        step += 1
        return timed(lambda: plain.save(step, state))

    writes = interleave(
        {
            "numpy": numpy_save,
            "jaxnv": lambda: timed(lambda: save(ckpts["sync"])),
            "jaxnv zstd": lambda: timed(lambda: save(zstd)),
        },
        repeats,
    )
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    reads = interleave(
        {
            "numpy": lambda: timed(lambda: jax.block_until_ready(plain.restore(target))),
            "jaxnv": lambda: timed(lambda: jax.block_until_ready(ckpts["sync"].restore(target))),
            "jaxnv zstd": lambda: timed(lambda: jax.block_until_ready(zstd.restore(target))),
        },
        repeats,
    )
    restored, _ = ckpts["sync"].restore(target)  # the restore really returns the state
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True)
    )
    for ckpt in [*ckpts.values(), zstd]:
        ckpt.close()
    info["bare"] = statistics.median(bare)
    return info, med, iqr, writes, reads


def rows_of(name, info, med, iqr, writes, reads):
    label = f"{name} ({info['params'] / 1e6:.2f}M params, {info['mb']:.1f} MB state)"
    k_label = f"{info['k']} steps, {info['bare'] * 1e3:.0f} ms bare"
    rows = []
    for what, title in (
        ("block", f"blocking per save, sync → async: {label}"),
        ("commit", f"save to commit, sync → async: {label}"),
        ("loop", f"loop cost per save ({k_label}), sync → async: {label}"),
    ):
        s, a = med[what, "sync"] * 1e3, med[what, "async"] * 1e3
        cells = [f"{s:.0f} ms", f"{a:.0f} ms"]
        if what == "loop":
            for i, n in enumerate(("sync", "async")):
                lo, hi = (x * 1e3 for x in iqr[n])
                cells[i] += f" (IQR {lo:.0f} to {hi:.0f})"
        rows.append((title, *cells, f"{a / s:.2f}"))
    mb = info["mb"]
    for what, times in (("save", writes), ("restore", reads)):
        base = mb / times["numpy"]
        for who in ("jaxnv", "jaxnv zstd"):
            rate = mb / times[who]
            who_label = who if who == "jaxnv" else "jaxnv compress=True (old default)"
            rows.append(
                (
                    f"{what} MB/s, numpy → {who_label}: {label}",
                    f"{base:.0f} MB/s ({times['numpy'] * 1e3:.0f} ms)",
                    f"{rate:.0f} MB/s ({times[who] * 1e3:.0f} ms)",
                    f"{rate / base:.2f}",
                )
            )
    return rows


def main():
    p = parser(__doc__)
    p.add_argument("--dir", default=None, help="where to write (default: a new temp dir)")
    args = p.parse_args()
    cases, loop_seconds = CASES, 1.0
    if args.quick:
        cases, loop_seconds, args.repeats = QUICK_CASES, 0.2, min(args.repeats, 3)
    # orbax adds the time of our explicit wait() calls to the next save's "waiting for previous
    # save" warning; the figures below are the real blocking times
    absl_logging.set_verbosity(absl_logging.ERROR)
    root = tempfile.mkdtemp(prefix="jaxnv-ckpt-bench-", dir=args.dir)
    start_load = os.getloadavg()[0]
    print(f"writing under {root}; load average {start_load:.1f} at the start", flush=True)
    rows = []
    try:
        for name, features in cases.items():
            result = bench_case(features, args.repeats, root, loop_seconds)
            rows += rows_of(name, *result)
            print("\n".join(" | ".join(r) for r in rows[-7:]), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(
        "checkpoint_async.py",
        ("case", "baseline", "measured", "ratio"),
        rows,
        args,
        notes=f"Load average {start_load:.1f} at the start.",
    )


if __name__ == "__main__":
    main()
