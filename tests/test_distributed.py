"""Many processes: 2 processes x 4 CPU devices (gloo) reproduce the 1-device loss curve."""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxnv import apply_overrides
from jaxnv.experiment import load_experiment
from jaxnv.parallel import distributed
from jaxnv.train import train

ARGS = [
    "logging.progress=false",
    "logging.mfu=false",
    "model.features=32,32",
    "train.steps=30",
    "train.eval_every=0",
    "logging.log_every=1",
    "optimizer.warmup_steps=5",
]


def _launch(*args, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "jaxnv.cli", "launch", "-n", "2", "--cpu-devices", "4", "--"]
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_processes_reproduce_the_single_device_curve(tmp_path):
    workdir = str(tmp_path / "mp")
    proc = _launch(
        "train",
        "binary_classification",
        "--workdir",
        workdir,
        *ARGS,
        "mesh.rules=fsdp",
        "mesh.data=2",
        "mesh.fsdp=4",
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    exp = load_experiment("binary_classification")
    exp.config = apply_overrides(exp.config, ARGS)
    single = train(exp, devices=jax.devices()[:1])
    expected = [r["loss"] for r in single.history if r["split"] == "train"]
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    got = [r["loss"] for r in rows if r["split"] == "train"]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 31))  # one writer
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert "[1] jaxnv: done in" not in proc.stdout and "[0] jaxnv: done in" in proc.stdout
    assert "[Gloo]" not in proc.stdout  # gloo's connection chatter is filtered
    assert "\r" not in proc.stdout  # not a terminal: a line a logged window, no bar redraws


@pytest.mark.slow
def test_a_dying_process_stops_the_others(tmp_path):
    crash = tmp_path / "crash_one.py"
    crash.write_text(
        "import os\n"
        "from jaxnv.config import Config\n"
        "def config():\n"
        "    if os.environ['JAXNV_PROCESS_ID'] == '1':\n"
        "        raise SystemExit(3)\n"
        "    return Config()\n"
    )
    start = time.monotonic()
    proc = _launch("train", str(crash), "--workdir", str(tmp_path / "w"), timeout=120)
    assert proc.returncode == 3
    assert time.monotonic() - start < 90
    assert "stopped the others" in proc.stderr


def test_initialize_is_a_no_op_for_one_process_and_checks_its_env(monkeypatch):
    for k in ("JAXNV_COORDINATOR", *distributed.CLUSTER_HINTS):
        monkeypatch.delenv(k, raising=False)
    assert distributed.initialize() is False
    monkeypatch.setenv("JAXNV_COORDINATOR", "127.0.0.1:1234")
    monkeypatch.delenv("JAXNV_NUM_PROCESSES", raising=False)
    with pytest.raises(ValueError, match="set all three"):
        distributed.initialize()


def test_gloo_chatter_is_dropped_even_when_two_reports_interleave():
    """gloo writes its connection reports in pieces from several threads (seen in CI)."""
    msg = (
        "[Gloo] Rank 3 is connected to 7 peer ranks. Expected number of connected peer ranks is : 7"
    )
    chatter = [
        msg + "\n",
        "[Gloo] Rank 1" + msg + "\n",  # one report started, another written inside it
        " is connected to 7 peer ranks. Expected number of connected peer ranks is : 7\n",
        "[Gloo] Rank 1 is connected to 1[Gloo] Rank 1 is connected to 1 peer ranks. Expected "
        "number of connected peer ranks is : 1\n",
        " peer ranks. Expected number of connected peer ranks is : 1\n",
    ]
    kept = ["step 30/30 eval: accuracy=0.87, loss=0.2865\n", "7\n", "\n", "my peer ranks: 3\n"]
    assert all(distributed.is_chatter(line) for line in chatter)
    assert not any(distributed.is_chatter(line) for line in kept)


def test_gloo_chatter_split_at_any_piece_and_its_stray_number_are_dropped():
    """Three reports interleaved, the last number on a line of its own (seen in CI)."""
    out = [
        "[Gloo] Rank 2 is connected to 7 peer ranks. Expected number of connected peer ranks is : "
        "[Gloo] Rank 1 is connected to 7 peer ranks. [Gloo] Rank 3 is connected to 7 peer ranks. "
        "Expected number of connected peer ranks is : 7\n",
        "Expected number of connected peer ranks is : 7\n",
        "7\n",
        "step 30/30 eval: accuracy=0.87, loss=0.2865\n",
        "12\n",  # a number of the user's own, not after chatter
        "jaxnv: done in 11.6 s\n",
    ]
    assert list(distributed.drop_chatter(out)) == out[3:]
