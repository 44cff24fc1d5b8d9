"""What every benchmark script shares: arguments, interleaved timing, the table and RESULTS.md.

    args = parser(__doc__).parse_args()          # --quick, --repeats, --record
    times = interleave({"plain": run_a, "jaxnv": run_b}, repeats=args.repeats)
    rows = [("case", f"{a:.1f} ms", f"{b:.1f} ms", f"{b / a:.3f}")]
    report("overhead.py", ("case", "plain", "jaxnv", "ratio"), rows, args)

Contenders run interleaved (a, b, a, b, ...) so that drift in the machine's speed hits both alike;
figures are medians over the repeats. The table is printed last. Only with `--record` is it
appended to benchmarks/RESULTS.md (tracked by git) under a heading naming the script, the date and
the machine; `--no-append`, the old way of saying "do not append", is still accepted and does
nothing more than the default.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def parser(doc: str, repeats: int = 7) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes."""
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and a few steps (CI smoke)")
    p.add_argument("--repeats", type=int, default=repeats, help="timed rounds per contender")
    record = p.add_mutually_exclusive_group()
    record.add_argument(
        "--record", action="store_true", help="append the table to benchmarks/RESULTS.md"
    )
    record.add_argument(
        "--no-append", action="store_true", help="do not append to RESULTS.md (the default)"
    )
    return p


def machine() -> str:
    """'x86_64 2 cores, cpu, jax 0.10.2' (the device kind of device 0, e.g. 'NVIDIA H100')."""
    import jax

    kind = jax.devices()[0].device_kind
    return f"{platform.machine()} {os.cpu_count()} cores, {kind}, jax {jax.__version__}"


def load() -> str:
    """The 1-minute load average, to say how busy the machine was."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of `fn` takes (fn must block until its work is done)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_steps(step, state, batch, steps: int):
    """Run `state, out = step(state, batch)` `steps` times; (final state, seconds per step)."""
    import jax

    start = time.perf_counter()
    for _ in range(steps):
        state, out = step(state, batch)
    jax.block_until_ready((state, out))
    return state, (time.perf_counter() - start) / steps


def interleave(
    contenders: dict[str, Callable[[], float]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median of `repeats` rounds per contender; each callable returns its own measurement.

    Rounds alternate between the contenders; the first `warmup` rounds (compilation, caches) are
    dropped.
    """
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(warmup + repeats):
        for name, fn in contenders.items():
            value = fn()
            if r >= warmup:
                samples[name].append(value)
    return {k: statistics.median(v) for k, v in samples.items()}


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(
    script: str,
    header: Sequence[str],
    rows: Sequence[Sequence[object]],
    args: argparse.Namespace,
    notes: str = "",
) -> str:
    """Print the table (last thing the script prints); with `--record`, append it to RESULTS.md."""
    text = table(header, rows)
    mode = " --quick" if getattr(args, "quick", False) else ""
    heading = (
        f"### {script}, {datetime.date.today()}, {machine()}\n\n"
        f"`--repeats {args.repeats}{mode}`; load average {load()} at the end."
    )
    if notes:
        heading += " " + notes
    print(f"\n{heading}\n\n{text}", flush=True)
    if getattr(args, "record", False):
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write(f"\n{heading}\n\n{text}\n")
        print(f"appended to {RESULTS}", file=sys.stderr, flush=True)
    return text
