"""Compilation: time to the first step with an empty persistent compilation cache and a full one.

Run:  .venv/bin/python benchmarks/compile_cache.py [--repeats 5] [--quick] [--record]
      (or `jaxnv bench compile_cache ...`)

Each measurement is a fresh Python process that runs `jaxnv.train.train` on the experiment's own
config (metrics logged every step, no workdir) and stops it once the first step is logged; it
reports the seconds from calling `train` to that moment: data, model init, tracing, compilation
(or loading from the cache), the MFU set-up and the step itself. Interpreter and import time are
not counted (the cache does not change them). Contenders, interleaved per round:

- `off`: `JAXNV_COMPILATION_CACHE=off`, no persistent cache;
- `cold`: a new, empty cache directory (everything is compiled, then written to it);
- `warm`: a directory filled once by an untimed run of the same experiment.

`warm/cold` is the share of the cold start-up time left with a full cache; target <= 0.3.
Medians over `--repeats` rounds; the load average is recorded with the table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from _common import interleave, parser, report

CASES = {  # name: (experiment, extra overrides)
    "char_gpt (transformer 4x128)": ("char_gpt", []),
    "digits_cnn (resnet 32-64)": ("digits_cnn", []),
}
QUICK = {"house_prices (linear)": ("house_prices", [])}

CHILD = """
import json, sys, time
from jaxnv import apply_overrides
from jaxnv.experiment import load_experiment
from jaxnv.train import Callback, train
from jaxnv.train.compilation import enable_compilation_cache

class FirstStep(Exception):
    pass

class StopAtFirstStep(Callback):
    def on_log(self, step, split, scalars, state):
        raise FirstStep(time.perf_counter() - start)

exp = load_experiment(sys.argv[1])
overrides = ["logging.log_every=1", "logging.progress=false", "logging.tensorboard=false",
             *sys.argv[2:]]
exp.config = apply_overrides(exp.config, overrides)
start = time.perf_counter()
enable_compilation_cache()  # as the CLI does: $JAXNV_COMPILATION_CACHE names the directory
try:
    train(exp, callbacks=[StopAtFirstStep()])
except FirstStep as e:
    print("FIRST_STEP " + json.dumps(e.args[0]))
"""


def first_step_seconds(experiment: str, overrides: list[str], cache: str) -> float:
    """Seconds to the first step in a new process with `JAXNV_COMPILATION_CACHE=cache`."""
    env = {**os.environ, "JAXNV_COMPILATION_CACHE": cache}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, experiment, *overrides],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"{experiment} failed:\n{out.stderr[-3000:]}")
    line = [x for x in out.stdout.splitlines() if x.startswith("FIRST_STEP ")][-1]
    return float(json.loads(line.removeprefix("FIRST_STEP ")))


def main():
    args = parser(__doc__, repeats=5).parse_args()
    if args.quick:
        args.repeats = 1
    rows = []
    root = tempfile.mkdtemp(prefix="jaxnv-bench-xla-")
    try:
        for name, (experiment, overrides) in (QUICK if args.quick else CASES).items():
            warm_dir = os.path.join(root, experiment + "-warm")
            first_step_seconds(experiment, overrides, warm_dir)  # fills the warm cache
            entries = len(os.listdir(warm_dir))

            def cold(experiment=experiment, overrides=overrides):
                path = tempfile.mkdtemp(prefix=experiment + "-cold-", dir=root)
                try:
                    return first_step_seconds(experiment, overrides, path)
                finally:
                    shutil.rmtree(path, ignore_errors=True)

            contenders = {
                "off": lambda e=experiment, o=overrides: first_step_seconds(e, o, "off"),
                "cold": cold,
                "warm": lambda e=experiment, o=overrides, d=warm_dir: first_step_seconds(e, o, d),
            }
            if args.quick:
                del contenders["off"]
            t = interleave(contenders, repeats=args.repeats, warmup=0 if args.quick else 1)
            ratio = t["warm"] / t["cold"]
            rows.append(
                (
                    f"{name}, {entries} cached programs",
                    f"{t['off']:.2f} s" if "off" in t else "-",
                    f"{t['cold']:.2f} s",
                    f"{t['warm']:.2f} s",
                    f"{ratio:.2f}",
                    "<= 0.3",
                    "yes" if ratio <= 0.3 else "no",
                )
            )
            print(f"{name}: {t}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    header = ("time to first step", "cache off", "cold (empty cache)", "warm", "warm/cold")
    report("compile_cache.py", (*header, "target", "met?"), rows, args)


if __name__ == "__main__":
    main()
