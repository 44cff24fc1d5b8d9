"""Input pipeline: the training loop fed by its data pipeline against batches already on the device.

Run:  .venv/bin/python benchmarks/pipeline.py [--repeats 9] [--quick] [--record]
      (or `jaxnv bench pipeline ...`)

Two MLPs on `binary_classification` (batch 256, adamw, fp32): a ~1 ms step (2-256-256-1) and a
~10 ms step (2-1024-1024-1). For each, interleaved rounds of the same jaxnv loop
(`jaxnv.train._train`, what `train()` runs after `build()`; built once so that rounds do not
compile again, a fresh copy of the initial state each round):

- `pipeline`: the real feed, `StepBatches.iterate(put=put_batch)`, batches gathered and copied
  to the device by grain's background threads;
- `resident`: the same loop, with `iterate` replaced by a list of the same batches placed on the
  device before the round starts: no host work for the input at all.

Steps/s are taken between the first and the last logged window of each round (start-up and
first step left out). `loop/resident` is the share of the input-free rate the loop keeps;
target >= 0.97. `CPU per step` is the process's CPU time (all threads: loop, grain, XLA) per
step over the same steps; its ratio resident/pipeline is what loop/resident would be if the
step kept every core busy; it moves less than wall time when other processes load the
machine. `pipeline alone` drains `StepBatches.iterate` (gather and device copy, nothing else
running) and reports batches/s over the steps/s the resident loop consumes; target >= 10.
Medians over `--repeats` rounds; the load average is recorded with the table.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
from _common import interleave, parser, report

from jaxnv import apply_overrides
from jaxnv.data import StepBatches
from jaxnv.experiment import load_experiment
from jaxnv.parallel import put_batch
from jaxnv.train.loop import Callback, _train, build

CASES = {  # name: (model.features, steps per round, log_every)
    "mlp 2-256-256-1 (~1 ms step)": ("256,256", 400, 50),
    "mlp 2-1024-1024-1 (~10 ms step)": ("1024,1024", 120, 20),
}
QUICK = {"mlp 2-64-64-1, batch 256": ("64,64", 60, 20)}


class ResidentBatches(StepBatches):
    """The batches of `source`, placed on the device up front; `iterate` only hands them out."""

    def __init__(self, source: StepBatches, placed: list):
        super().__init__(source.arrays, source.batch_size, source.seed)
        self.placed = placed

    def iterate(self, start, stop, *, prefetch=2, put=None):
        return iter(self.placed[start:stop])


def setup(features: str, steps: int, log_every: int):
    """The experiment and its built run (data, compiled step, initial state), on one device."""
    exp = load_experiment("binary_classification")
    exp.config = apply_overrides(
        exp.config,
        [
            "logging.progress=false",
            "logging.mfu=false",
            "logging.tensorboard=false",
            f"train.steps={steps}",
            "train.eval_every=0",
            f"logging.log_every={log_every}",
            "optimizer.warmup_steps=5",
            f"model.features={features}",
            "train.batch_size=256",
        ],
    )
    return exp, build(exp, jax.devices()[:1])


class Clock(Callback):
    """Wall and process CPU time at each logged train window."""

    def __init__(self):
        self.marks = []

    def on_log(self, step, split, scalars, state):
        if split == "train":
            self.marks.append((step, time.perf_counter(), time.process_time()))


CPU_US: dict[str, list[float]] = {}  # contender: CPU us per step of each round (all threads)


def loop_rate(exp, run, name: str) -> float:
    """Steps/s of the loop between its first and last logged window, from a fresh state.

    The first window (start-up, first step) is left out. Also records the process's CPU time per
    step over the same steps (all threads: loop, grain, XLA) in `CPU_US[name]`.
    """
    state = jax.tree.map(lambda x: x.copy(), run.state)  # the loop donates its state
    clock = Clock()
    with jax.set_mesh(run.plan.mesh):
        _train(dataclasses.replace(run, state=state), None, [clock])
    (s0, t0, c0), (s1, t1, c1) = clock.marks[0], clock.marks[-1]
    CPU_US.setdefault(name, []).append((c1 - c0) / (s1 - s0) * 1e6)
    return (s1 - s0) / (t1 - t0)


def pipeline_rate(run, steps: int) -> float:
    """Batches/s out of `StepBatches.iterate` with the device copy, nothing else running."""
    start = time.perf_counter()
    feed = run.batches.iterate(0, steps, put=lambda b: put_batch(b, run.plan.batch))
    jax.block_until_ready(list(feed)[-1])
    return steps / (time.perf_counter() - start)


def main():
    args = parser(__doc__, repeats=9).parse_args()
    if args.quick:
        args.repeats = min(args.repeats, 2)
    rows = []
    for name, (features, steps, log_every) in (QUICK if args.quick else CASES).items():
        exp, run = setup(features, steps, log_every)
        placed = [put_batch(run.batches.local(s), run.plan.batch) for s in range(steps)]
        resident = dataclasses.replace(run, batches=ResidentBatches(run.batches, placed))
        rates = interleave(
            {
                "pipeline": lambda exp=exp, run=run: loop_rate(exp, run, "pipeline"),
                "resident": lambda exp=exp, run=resident: loop_rate(exp, run, "resident"),
                "alone": lambda run=run, n=steps * 4: pipeline_rate(run, n),
            },
            repeats=args.repeats,
        )
        loop, ref, alone = rates["pipeline"], rates["resident"], rates["alone"]
        rows.append(
            (
                f"loop: {name}",
                f"{ref:.0f} steps/s",
                f"{loop:.0f} steps/s",
                f"{loop / ref:.3f}",
                ">= 0.97",
                "yes" if loop / ref >= 0.97 else "no",
            )
        )
        cpu = {k: statistics.median(v[1:] or v) for k, v in CPU_US.items()}  # warm-up dropped
        CPU_US.clear()
        rows.append(
            (
                f"CPU per step, all threads: {name}",
                f"{cpu['resident']:.0f} us",
                f"{cpu['pipeline']:.0f} us",
                f"{cpu['resident'] / cpu['pipeline']:.3f}",
                "-",
                "-",
            )
        )
        rows.append(
            (
                f"pipeline alone: {name}",
                f"{ref:.0f} steps/s consumed",
                f"{alone:.0f} batches/s",
                f"{alone / ref:.1f}",
                ">= 10",
                "yes" if alone / ref >= 10 else "no",
            )
        )
        print(f"{name}: {rates}", flush=True)
    header = ("case", "batches on device", "grain pipeline", "ratio", "target", "met?")
    report("pipeline.py", header, rows, args)


if __name__ == "__main__":
    main()
