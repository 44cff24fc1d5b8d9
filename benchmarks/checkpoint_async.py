"""Checkpoint saves: how long the training loop is blocked, async orbax save against a sync one.

Run:  .venv/bin/python benchmarks/checkpoint_async.py [--repeats 7] [--dir DIR] [--no-append]

The state is a real jaxnv `TrainState` (MLP params and adamw moments, fp32) built by
`jaxnv.train.build`. Two `Checkpointer`s write to `--dir` (default: a new temporary directory
beside the system's temp files), `keep=2` so that old steps are deleted as in a run. For each
state size, three figures per contender:

- blocking: `maybe_save(step, state, meta, force=True)` until it returns, nothing else running.
  That is how long the loop stands still at a save step.
- commit: from the call until `wait()` returns (the step directory renamed into place).
- loop cost: `maybe_save` then K jitted train steps (about 1 s of them, state donated) until
  the last one and the save have both finished, minus the same K steps with no save. The async
  write shares the host with the steps, so this is the blocking time plus what the background
  write takes from the steps. Paired within each repeat; the table also gives its interquartile
  range, because the step time of a shared machine drifts by 10-20 % over a run.

Contenders run interleaved in one process (the order alternates each repeat), after one warm-up
save each; medians of `repeats`; ratios (async/sync) last. Appends a table to
benchmarks/RESULTS.md unless --no-append.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import tempfile
import time

import jax
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
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
LOOP_SECONDS = 1.0


def _steps(run, state, batch, k):
    for _ in range(k):
        state, _ = run.train_step(state, batch)
    return jax.block_until_ready(state)


def bench_case(features, repeats, root):
    exp = load_experiment("binary_classification")
    exp.config = apply_overrides(
        exp.config, [f"model.features={features}", "train.batch_size=32", "logging.progress=false"]
    )
    run = build(exp, jax.devices()[:1])
    meta = {"config": config_lib.to_dict(run.cfg), "version": "bench"}
    batch = put_batch(run.batches[0], run.plan.batch)
    state = _steps(run, run.state, batch, 2)  # compiles
    start = time.perf_counter()
    state = _steps(run, state, batch, 5)
    k = max(5, round(LOOP_SECONDS / ((time.perf_counter() - start) / 5)))
    info = {
        "params": sum(x.size for x in jax.tree.leaves(state.params)),
        "mb": sum(x.nbytes for x in jax.tree.leaves(state)) / 1e6,
        "k": k,
    }
    ckpts = {
        name: Checkpointer(os.path.join(root, f"{features}-{name}"), keep=2, async_save=on)
        for name, on in (("sync", False), ("async", True))
    }
    step = 0

    def save(ckpt):
        nonlocal step
        step += 1
        assert ckpt.maybe_save(step, state, meta, force=True)

    for ckpt in ckpts.values():  # warm-up: compiles the finiteness check, opens orbax's threads
        save(ckpt)
        ckpt.wait()
    times = {(name, what): [] for name in ckpts for what in ("block", "commit", "loop")}
    bare = []
    for r in range(repeats):
        order = list(ckpts) if r % 2 == 0 else list(reversed(ckpts))
        for name in order:
            ckpt = ckpts[name]
            ckpt.wait()
            t0 = time.perf_counter()
            save(ckpt)
            t1 = time.perf_counter()
            ckpt.wait()
            t2 = time.perf_counter()
            times[name, "block"].append(t1 - t0)
            times[name, "commit"].append(t2 - t0)
        loop = {}
        for name in ["none", *order] if r % 2 == 0 else [*order, "none"]:
            ckpt = ckpts.get(name)
            t0 = time.perf_counter()
            if ckpt is not None:
                save(ckpt)
            state = _steps(run, state, batch, k)
            if ckpt is not None:
                ckpt.wait()
            loop[name] = time.perf_counter() - t0
        bare.append(loop["none"])
        for name in ckpts:  # paired within the repeat: slow drifts of the machine cancel
            times[name, "loop"].append(loop[name] - loop["none"])
    for ckpt in ckpts.values():
        ckpt.close()
    med = {key: statistics.median(v) for key, v in times.items()}
    iqr = {key: statistics.quantiles(v, n=4)[::2] for key, v in times.items() if key[1] == "loop"}
    return info, statistics.median(bare), med, iqr


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dir", default=None, help="where to write (default: a new temp dir)")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    # orbax adds the time of our explicit wait() calls to the next save's "waiting for previous
    # save" warning; the figures below are the real blocking times
    absl_logging.set_verbosity(absl_logging.ERROR)
    root = tempfile.mkdtemp(prefix="jaxnv-ckpt-bench-", dir=args.dir)
    machine = f"{platform.machine()} {os.cpu_count()} cores, {jax.devices()[0].device_kind}"
    load = os.getloadavg()[0]
    print(f"machine: {machine}, jax {jax.__version__}, load {load:.1f}, writing under {root}")
    print(f"{'case':58} {'sync ms':>9} {'async ms':>9} {'async/sync':>11}")
    rows = []
    try:
        for name, features in CASES.items():
            info, base, med, iqr = bench_case(features, args.repeats, root)
            label = f"{name} ({info['params'] / 1e6:.1f}M params, {info['mb']:.0f} MB state)"
            k_label = f"{info['k']} steps, {base * 1e3:.0f} ms bare"
            for what, title in (
                ("block", f"blocking per save: {label}"),
                ("commit", f"save to commit: {label}"),
                ("loop", f"loop cost per save ({k_label}): {label}"),
            ):
                s, a = med["sync", what] * 1e3, med["async", what] * 1e3
                cells = [f"{s:.0f} ms", f"{a:.0f} ms"]
                if what == "loop":
                    for i, name in enumerate(("sync", "async")):
                        lo, hi = (x * 1e3 for x in iqr[name, what])
                        cells[i] += f" (IQR {lo:.0f} to {hi:.0f})"
                rows.append(f"| {title} | {cells[0]} | {cells[1]} | {a / s:.2f} |")
                print(f"{what + ': ' + label:58} {s:9.0f} {a:9.0f} {a / s:11.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\n".join(rows))
    if not args.no_append:
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write(f"\n### checkpoint_async.py, {datetime.date.today()}, {machine}\n\n")
            end = os.getloadavg()[0]
            f.write(f"Load average {load:.1f} at the start, {end:.1f} at the end. ")
            f.write(f"`--repeats {args.repeats}`.\n\n")
            f.write("| case | sync save | async save | ratio |\n| --- | --- | --- | --- |\n")
            f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
