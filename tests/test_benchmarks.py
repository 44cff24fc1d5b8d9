"""Every benchmark script runs in its CI smoke mode and prints a well-formed results table.

Speed targets are not asserted here (they live in benchmarks/RESULTS.md); what is asserted is
that each script still runs end to end through `jaxnv bench NAME --quick`, leaves RESULTS.md
untouched (only `--record` appends), and ends with a table whose figures are finite numbers.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
SCRIPTS = sorted(f[:-3] for f in os.listdir(BENCH) if f.endswith(".py") and not f.startswith("_"))
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?|nan|inf", re.IGNORECASE)


def last_table(text: str) -> list[list[str]]:
    """The rows (header first, separator dropped) of the last markdown table in `text`."""
    blocks, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    assert blocks, "the script printed no markdown table"
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in blocks[-1]]
    return [r for r in rows if not all(set(c) <= {"-", " ", ":"} for c in r)]


def test_last_table_parses_the_final_block():
    text = "x\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\n| c |\n| --- |\n| 3.5 ms |\nend"
    assert last_table(text) == [["c"], ["3.5 ms"]]


def test_bench_lists_and_rejects_unknown_names():
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "jaxnv.cli", "bench", *a], capture_output=True, text=True, cwd=ROOT
    )
    listed = run()
    assert listed.returncode == 0
    for name in SCRIPTS:
        assert name in listed.stdout
    wrong = run("overhed")
    assert wrong.returncode == 2
    assert "did you mean 'overhead'" in wrong.stderr


def _common(monkeypatch, tmp_path):
    """benchmarks/_common.py, writing to a RESULTS.md in tmp_path."""
    spec = importlib.util.spec_from_file_location("bench_common", os.path.join(BENCH, "_common.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", str(tmp_path / "RESULTS.md"))
    return module


def test_report_appends_only_with_record(monkeypatch, tmp_path, capsys):
    common = _common(monkeypatch, tmp_path)
    results = tmp_path / "RESULTS.md"
    for flags in ([], ["--no-append"], ["--quick"]):  # the default and the old opt-out
        args = common.parser("doc").parse_args(flags)
        common.report("x.py", ("case", "ms"), [("a", "1.0")], args)
        assert not results.exists(), flags
        assert last_table(capsys.readouterr().out) == [["case", "ms"], ["a", "1.0"]]
    args = common.parser("doc").parse_args(["--record"])
    common.report("x.py", ("case", "ms"), [("a", "2.0")], args)
    text = results.read_text(encoding="utf-8")
    assert text.startswith("\n### x.py, ") and last_table(text) == [["case", "ms"], ["a", "2.0"]]
    with pytest.raises(SystemExit):  # asking for both is a usage error, not a silent choice
        common.parser("doc").parse_args(["--record", "--no-append"])


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_quick_mode(name):
    with open(os.path.join(BENCH, "RESULTS.md"), "rb") as f:
        before = f.read()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "jaxnv.cli", "bench", name, "--quick"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = last_table(proc.stdout)
    assert len(rows) >= 2, proc.stdout[-2000:]
    numbers = [float(m) for row in rows[1:] for cell in row[1:] for m in NUMBER.findall(cell)]
    assert numbers, f"no figures in the table of {name}: {rows}"
    assert all(math.isfinite(x) for x in numbers), rows
    with open(os.path.join(BENCH, "RESULTS.md"), "rb") as f:
        assert f.read() == before, "without --record a benchmark must leave RESULTS.md alone"
