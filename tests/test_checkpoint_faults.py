"""Checkpoints under faults: a process killed in the middle of an async save, a truncated array
file, training steps that reuse the buffers being written, a workdir that cannot be written. Each
ends in the previous good checkpoint or a one-line error that names the path and the fix, never in
a half-written or torn checkpoint being used."""

import gc
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxnv import apply_overrides
from jaxnv.checkpoint import Checkpointer, CheckpointError
from jaxnv.experiment import load_experiment
from jaxnv.parallel import put_batch
from jaxnv.train import build, train

# orbax writes step S into `S.orbax-checkpoint-tmp` (items inside as `state.orbax-checkpoint-tmp`)
# and renames it to `S` once every file is written
TMP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")

# 4.2M params (50 MB with the adam moments): a save stays in flight for 0.2-0.9 s on 2 CPU cores
KILL_ARGS = [
    "model.features=2048,2048",
    "train.steps=120",
    "train.eval_every=0",
    "checkpoint.every=20",
    "logging.log_every=10",
    "logging.progress=false",
    "logging.mfu=false",
    "logging.tensorboard=false",
]


def _cli(workdir) -> int:
    """Run the CLI to the end; its exit status (stderr goes to a file: a pipe nobody reads while
    the test polls could fill up and stall the run)."""
    proc = _start(workdir)
    proc.wait(timeout=300)
    return proc.returncode


def _start(workdir):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "jaxnv.cli", "train", "binary_classification"]
    with open(f"{workdir}.stderr", "a", encoding="utf-8") as err:
        return subprocess.Popen(
            [*cmd, "--workdir", workdir, *KILL_ARGS], env=env, stdout=subprocess.DEVNULL, stderr=err
        )


def _stderr(workdir) -> str:
    with open(f"{workdir}.stderr", encoding="utf-8") as f:
        return f.read()[-2000:]


def _writing_arrays(tmp_dir) -> bool:
    """Whether array data has started to land in a step's temporary directory (OCDBT writes the
    chunks into content-named files under `.../ocdbt.process_0/d/`)."""
    return any(os.path.basename(d) == "d" and files for d, _, files in os.walk(tmp_dir))


def _kill_during_a_save(workdir, timeout=120) -> int | None:
    """Run the CLI and SIGKILL it once a save is writing array data, with an older checkpoint
    already complete; the step of the save it interrupted, or None if the run ended first."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    proc = _start(workdir)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
            complete = [int(n) for n in names if n.isdigit()]
            pending = [n for n in names if TMP.match(n)]
            if complete and any(_writing_arrays(os.path.join(ckpt_dir, n)) for n in pending):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return max(int(TMP.match(n).group(1)) for n in pending)
            time.sleep(0.0005)
        assert proc.returncode == 0, _stderr(workdir)
        return None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_kill_during_an_async_save_keeps_the_previous_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    for _ in range(3):  # a miss (the save committed before the signal landed) is retried
        interrupted = _kill_during_a_save(workdir)
        assert interrupted is not None, "the run ended before a save was caught in flight"
        left = os.listdir(ckpt_dir)
        half = [n for n in left if (m := TMP.match(n)) and int(m.group(1)) == interrupted]
        if half and _writing_arrays(os.path.join(ckpt_dir, half[0])):
            break
    else:
        pytest.fail(f"no save was caught in flight in 3 tries: {sorted(os.listdir(ckpt_dir))}")
    # the half-written step is on disk, but not as a checkpoint
    assert str(interrupted) not in left
    ckpt = Checkpointer(ckpt_dir)
    try:
        previous = ckpt.latest_step()
        assert previous == interrupted - 20
        assert interrupted not in ckpt.manager.all_steps()
    finally:
        ckpt.close()

    # the same command again resumes from the previous checkpoint and finishes the run
    assert _cli(workdir) == 0, _stderr(workdir)
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        assert json.load(f)["resumed_from"] == previous
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        steps = [json.loads(line)["step"] for line in f if '"train"' in line]
    assert steps == list(range(10, 121, 10))  # no duplicated, no missing rows
    ckpt = Checkpointer(ckpt_dir)
    try:
        assert ckpt.latest_step() == 120
    finally:
        ckpt.close()
    # re-saving the interrupted step replaced its stale temporary directory
    assert not [n for n in os.listdir(ckpt_dir) if TMP.match(n)]


def _small(steps):
    exp = load_experiment("binary_classification")
    exp.config = apply_overrides(
        exp.config,
        [
            "model.features=64,64",
            f"train.steps={steps}",
            "train.eval_every=0",
            "optimizer.warmup_steps=1",
            "checkpoint.every=10",
            "logging.progress=false",
            "logging.mfu=false",
            "logging.tensorboard=false",
        ],
    )
    return exp


def _snapshot(root) -> dict[str, str]:
    """Every directory and file under `root`, with each file's sha256."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


# after a failed read orbax leaves the other arrays' read coroutines and their gathering future
# unretrieved; Python reports them when they are collected ("Exception ignored in: <coroutine
# _read_array_index_and_device_put>"). The test collects what it can itself, under this filter,
# rather than in whichever test runs next; the rest shows up after pytest's summary.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_truncated_array_file_gives_a_clear_error_and_changes_nothing(tmp_path):
    workdir = str(tmp_path / "run")
    result = train(_small(20), workdir=workdir, devices=jax.devices()[:1])
    step_dir = os.path.join(workdir, "checkpoints", "20")
    # OCDBT keeps the array chunks in content-named files under state/ocdbt.process_0/d/
    data = [
        os.path.join(dirpath, name)
        for dirpath, _, names in os.walk(os.path.join(step_dir, "state"))
        for name in names
        if os.path.basename(dirpath) == "d"
    ]
    victim = max(data, key=os.path.getsize)
    os.truncate(victim, os.path.getsize(victim) // 2)
    before = _snapshot(workdir)

    expected = (
        rf"checkpoint step 20 in .* cannot be read \(.+\): it may be corrupt; remove that step's "
        rf"directory {re.escape(step_dir)} to fall back to an older one \(step 10\)$"
    )
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        with pytest.raises(CheckpointError, match=expected) as err:
            ckpt.restore(result.state)
    finally:
        ckpt.close()
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match=expected):  # resuming stops at the same error
        train(_small(30), workdir=workdir, devices=jax.devices()[:1])
    gc.collect()
    assert _snapshot(workdir) == before  # nothing deleted, rewritten or added

    shutil.rmtree(step_dir)  # the fix the message names
    resumed = train(_small(30), workdir=workdir, devices=jax.devices()[:1])
    assert resumed.summary["resumed_from"] == 10
    gc.collect()


def test_steps_that_donate_the_state_during_an_async_save_do_not_change_it(tmp_path):
    exp = _small(10)
    exp.config = apply_overrides(exp.config, ["model.features=1024,1024"])
    run = build(exp, jax.devices()[:1])
    batch = put_batch(run.batches[0], run.plan.batch)
    state, _ = run.train_step(run.state, batch)
    expected = jax.device_get(state)
    ckpt = Checkpointer(str(tmp_path), async_save=True)
    try:
        assert ckpt.maybe_save(1, state, {}, force=True)
        for _ in range(10):  # the buffers being written are donated to, and reused by, the step
            state, _ = run.train_step(state, batch)
        ckpt.wait()
        restored, _ = ckpt.restore(state)
    finally:
        ckpt.close()
    leaves = jax.tree.leaves(jax.device_get(restored))
    for got, want in zip(leaves, jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(got, want)
    now, then = jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(expected.params)
    assert any(not np.array_equal(a, b) for a, b in zip(now, then, strict=True))  # they moved


@pytest.mark.parametrize("kind", ["file in the way", "workdir is a file", "read-only directory"])
def test_unwritable_workdir_gives_a_clear_error(tmp_path, kind):
    blocker = tmp_path / "blocker"
    if kind == "read-only directory":
        blocker.mkdir()
        blocker.chmod(0o500)
        if os.access(blocker, os.W_OK):  # root writes anyway
            blocker.chmod(0o700)
            pytest.skip("running as root: permission bits do not stop writes")
        workdir = str(blocker / "run")
    else:
        blocker.write_text("not a directory\n")
        workdir = str(blocker / "run") if kind == "file in the way" else str(blocker)
    before = _snapshot(tmp_path)
    try:
        with pytest.raises(CheckpointError) as err:
            train(_small(10), workdir=workdir, devices=jax.devices()[:1])
    finally:
        if kind == "read-only directory":
            blocker.chmod(0o700)
    message = str(err.value)
    assert "\n" not in message
    assert os.path.join(workdir, "checkpoints") in message
    assert "pass a --workdir that is a directory you can write to" in message
    assert _snapshot(tmp_path) == before


@flax.struct.dataclass
class _State:
    params: dict
    opt_state: dict
    step: jax.Array


def _two_steps(directory) -> _State:
    """Steps 1 and 2 of a small state in `directory`; the state."""
    state = _State({"w": jnp.arange(300.0)}, {"m": jnp.zeros(300)}, jnp.int32(2))
    ckpt = Checkpointer(str(directory), async_save=False)
    try:
        assert ckpt.maybe_save(1, state, {}, force=True)
        assert ckpt.maybe_save(2, state, {}, force=True)
    finally:
        ckpt.close()
    return state


def _restore_error(directory, state, step=None) -> str:
    ckpt = Checkpointer(str(directory))
    try:
        with pytest.raises(CheckpointError) as err:
            ckpt.restore(state, step)
    finally:
        ckpt.close()
    message = str(err.value)
    assert "\n" not in message
    return message


def _oom():
    # what orbax raises when the device_put of a read array fails: its wrapper around XLA's error
    inner = jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1073741824 bytes."
    )
    try:
        raise inner
    except Exception as err:
        wrapper = Exception("Encountered error while reading array index: (slice(0, 300, 1),).")
        wrapper.__cause__ = err
        return wrapper


NOT_CORRUPTION = {
    "out of memory (XLA)": (_oom, "Out of memory while trying to allocate"),
    "MemoryError": (MemoryError, "MemoryError"),
    "sharding mismatch": (
        lambda: ValueError("Sharding NamedSharding(mesh=Mesh('data': 8)) does not fit (3,)"),
        "does not fit (3,)",
    ),
    "device error": (
        lambda: RuntimeError("INTERNAL: Failed to execute XLA Runtime executable: device lost"),
        "device lost",
    ),
    "permission denied while reading": (  # names a read, but says nothing against the data
        lambda: ValueError('PERMISSION_DENIED: Error reading "params.w/0" in OCDBT database'),
        "PERMISSION_DENIED",
    ),
}


@pytest.mark.parametrize("kind", list(NOT_CORRUPTION))
def test_a_restore_failure_that_is_not_corruption_never_suggests_removing_a_step(
    tmp_path, monkeypatch, kind
):
    make, cause = NOT_CORRUPTION[kind]
    state = _two_steps(tmp_path)
    before = _snapshot(tmp_path)

    def failing_restore(self, step, *args, **kwargs):
        raise make()

    monkeypatch.setattr(ocp.CheckpointManager, "restore", failing_restore)
    message = _restore_error(tmp_path, state)
    assert message.startswith(f"checkpoint step 2 in {tmp_path} could not be restored")
    assert cause in message  # what failed
    for advice in ("remov", "delet", "corrupt", "fall back", "older", "rm "):
        assert advice not in message.lower(), message
    if kind.startswith(("out of memory", "MemoryError")):
        assert "out of memory" in message
    assert _snapshot(tmp_path) == before


def _data_files(step_dir):
    return [
        os.path.join(d, n)
        for d, _, names in os.walk(os.path.join(step_dir, "state"))
        for n in names
        if os.path.basename(d) == "d"
    ]


CORRUPTION = {
    "array data deleted": lambda step: [os.remove(f) for f in _data_files(step)],
    "array data truncated": lambda step: [os.truncate(f, 7) for f in _data_files(step)],
    "tree metadata deleted": lambda step: os.remove(os.path.join(step, "state", "_METADATA")),
    "meta item deleted": lambda step: shutil.rmtree(os.path.join(step, "meta")),
}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # see above
@pytest.mark.parametrize("kind", list(CORRUPTION))
def test_missing_or_short_files_are_corruption_with_the_step_to_fall_back_to(tmp_path, kind):
    state = _two_steps(tmp_path)
    step_dir = os.path.join(tmp_path, "2")
    CORRUPTION[kind](step_dir)
    message = _restore_error(tmp_path, state)
    assert re.fullmatch(
        rf"checkpoint step 2 in {re.escape(str(tmp_path))} cannot be read \(.+\): it may be "
        rf"corrupt; remove that step's directory {re.escape(step_dir)} to fall back to an older "
        r"one \(step 1\)",
        message,
    ), message
    gc.collect()


def test_a_step_that_is_not_on_disk_is_named_with_the_steps_there(tmp_path):
    state = _two_steps(tmp_path)
    message = _restore_error(tmp_path, state, step=7)
    assert message == f"no checkpoint step 7 in {tmp_path}: the steps there are 1, 2"


def test_a_model_mismatch_lists_param_paths_first(tmp_path):
    _two_steps(tmp_path)
    params = {"w": jnp.zeros(5), "v": jnp.zeros(2)}
    opt_state = {"m": jnp.zeros(5), "n": jnp.zeros(1)}
    message = _restore_error(tmp_path, _State(params, opt_state, jnp.int32(2)))
    # opt_state/ sorts before params/, but the params say what differs; the rest follows from them
    assert message.split("does not match this model: ")[1].split(" -- ")[0].split("; ") == [
        "params/v missing from the checkpoint",
        "params/w saved (300,) float32, model has (5,) float32",
        "opt_state/m saved (300,) float32, model has (5,) float32",
        "and 1 more",
    ]
