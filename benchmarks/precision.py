"""Mixed precision: each preset's result against fp32, and its step time, on the same runs.

Run:  .venv/bin/python benchmarks/precision.py [--repeats 5] [--quick] [--record]
      (or `jaxnv bench precision ...`)

For every case and preset (`fp32`, `bf16`, `fp16` with dynamic loss scaling) the experiment trains
from the same seed with `jaxnv.train.train`; the table gives the final eval loss and accuracy (where
the experiment has one), the eval loss relative to fp32's, the steps fp16 skipped on overflow and
where its loss scale settled, and the median step time over `--repeats` interleaved rounds of 10
steps of the built train step (compiled once, outside the timing), relative to fp32's. On a CPU,
bf16 and fp16 have no fast matmuls (XLA:CPU converts them), so the GPU target (<= 0.5x fp32) is
measured only where a GPU is available (benchmarks/gpu.py).
"""

from __future__ import annotations

import jax
from _common import interleave, parser, report, time_steps

from jaxnv import apply_overrides
from jaxnv.experiment import load_experiment
from jaxnv.parallel import put_batch
from jaxnv.train import build, train

PRESETS = ("fp32", "bf16", "fp16")
QUIET = ["logging.progress=false", "logging.mfu=false"]
CASES = {  # name: (experiment, overrides)
    "digits_cnn (full run)": ("digits_cnn", []),
    "char_gpt (200 steps)": ("char_gpt", ["train.steps=200", "optimizer.warmup_steps=20"]),
    "sequence_lstm (full run)": ("sequence_lstm", []),
}
QUICK = {"house_prices (20 steps)": ("house_prices", ["train.steps=20"])}


def _exp(name, overrides, preset):
    exp = load_experiment(name)
    exp.config = apply_overrides(exp.config, [*overrides, *QUIET, f"precision.policy={preset}"])
    exp.summarize = None
    return exp


def _quality(name, overrides, preset) -> dict:
    result = train(_exp(name, overrides, preset), devices=jax.devices()[:1])
    scale = float(jax.device_get(result.state.loss_scale.loss_scale))
    return {
        "loss": result.eval_metrics["loss"],
        "accuracy": result.eval_metrics.get("accuracy"),
        "skipped": result.summary["nonfinite_skipped"],
        "scale": scale,
    }


def _stepper(name, overrides, preset):
    """A callable timing 10 steps of the preset's compiled train step (seconds per step)."""
    run = build(_exp(name, overrides, preset), jax.devices()[:1])
    batch = put_batch(run.batches[0], run.plan.batch)
    box = {"state": run.state}

    def measure() -> float:
        with jax.set_mesh(run.plan.mesh):
            box["state"], seconds = time_steps(run.train_step, box["state"], batch, 10)
        return seconds

    return measure


def main():
    args = parser(__doc__, repeats=5).parse_args()
    cases = QUICK if args.quick else CASES
    repeats = args.repeats = 2 if args.quick else args.repeats
    rows = []
    for case, (name, overrides) in cases.items():
        quality = {p: _quality(name, overrides, p) for p in PRESETS}
        times = interleave({p: _stepper(name, overrides, p) for p in PRESETS}, repeats=repeats)
        base = quality["fp32"]["loss"]
        for p in PRESETS:
            q = quality[p]
            acc = "" if q["accuracy"] is None else f"{q['accuracy']:.4f}"
            rows.append(
                (
                    f"{case} {p}",
                    f"{q['loss']:.4f}",
                    acc,
                    f"{q['loss'] / base:.3f}",
                    q["skipped"],
                    f"{q['scale']:g}",
                    f"{times[p] * 1e3:.2f} ms",
                    f"{times[p] / times['fp32']:.2f}",
                )
            )
    header = (
        "case",
        "eval loss",
        "eval accuracy",
        "loss / fp32",
        "skipped steps",
        "final loss scale",
        "step time",
        "time / fp32",
    )
    report("precision.py", header, rows, args)


if __name__ == "__main__":
    main()
