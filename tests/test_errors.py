"""Errors that point at the right place: an exception out of the user's own code (an experiment
file, a module it imports, its loss) is a traceback of the user's frames only, then one
`jaxnv: error:` line; jaxnv's own input errors stay one line; a second Ctrl-C is one line."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxnv import cli
from jaxnv.errors import frame_kind

JAXNV_DIR = Path(cli.__file__).resolve().parent

# a small regression experiment; each test adds the mistake it is about
CONFIG = """\
from jaxnv.config import Config, DataConfig, TrainConfig


def config() -> Config:
    return Config(
        data=DataConfig(name="house_prices", num_train=64, num_eval=16),
        train=TrainConfig(steps=2, batch_size=8, eval_every=0),
    )
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXNV_CPU_DEVICES")}
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


def _run(args, cwd, **env):
    return subprocess.run(
        [sys.executable, "-m", "jaxnv.cli", *args],
        cwd=cwd,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def _line_of(path: Path, needle: str) -> int:
    (n,) = [i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line]
    return n


def _frame_files(stderr: str) -> list[str]:
    return re.findall(r'^\s*File "([^"]+)", line \d+', stderr, flags=re.M)


def _assert_only_user_frames(stderr: str, *user_files: Path) -> None:
    files = _frame_files(stderr)
    assert files, stderr
    assert {Path(f).resolve() for f in files} <= {p.resolve() for p in user_files}, stderr
    assert not any(Path(f).resolve().is_relative_to(JAXNV_DIR) for f in files), stderr
    assert "importlib" not in stderr and "site-packages" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("jaxnv: error: "), stderr
    assert sum(line.startswith("jaxnv: error:") for line in lines) == 1, stderr


def test_syntax_error_in_an_experiment_file_shows_its_file_and_line(tmp_path):
    exp = _write(tmp_path / "broken.py", CONFIG.replace("eval_every=0)", "eval_every=0"))
    proc = _run(["train", str(exp), "--workdir", str(tmp_path / "run")], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert f'File "{exp}", line ' in proc.stderr
    _assert_only_user_frames(proc.stderr, exp)
    assert proc.stderr.strip().splitlines()[-1].startswith("jaxnv: error: SyntaxError: ")
    assert "broken.py, line" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_exception_while_importing_a_user_module_shows_the_users_frames(tmp_path):
    _write(tmp_path / "helpers.py", "SCALE = {'a': 1}['b']\n")
    exp = _write(tmp_path / "uses_helpers.py", "import helpers  # noqa: F401\n" + CONFIG)
    proc = _run(["train", str(exp)], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert f'File "{exp}", line 1, in <module>' in proc.stderr
    assert f'File "{tmp_path / "helpers.py"}", line 1, in <module>' in proc.stderr
    _assert_only_user_frames(proc.stderr, exp, tmp_path / "helpers.py")
    assert proc.stderr.strip().splitlines()[-1] == "jaxnv: error: KeyError: 'b'"


@pytest.mark.parametrize(
    ("body", "last"),
    [
        # a shape error inside jnp, which jaxnv also explains as "the model cannot take this batch"
        ("    bad = jnp.dot(pred, jnp.ones((5, 2)))  # the failing line\n", "ValueError: "),
        # the user's own exception, raised while JAX traces the loss
        ("    raise RuntimeError('my loss is broken')  # the failing line\n", "RuntimeError: my"),
    ],
    ids=["jax-shape-error", "own-exception"],
)
def test_exception_in_a_user_loss_shows_its_file_and_line(tmp_path, body, last):
    loss = (
        "\n\nimport jax.numpy as jnp\n\n\ndef loss_fn(model, batch, rng):\n"
        "    pred = model(batch['x'])\n" + body + "    return jnp.mean((pred - batch['y']) ** 2)\n"
    )
    exp = _write(tmp_path / "my_loss.py", CONFIG + loss)
    proc = _run(
        ["train", str(exp), "--workdir", str(tmp_path / "run"), "logging.progress=false"],
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr
    line = _line_of(exp, "# the failing line")
    assert f'File "{exp}", line {line}, in loss_fn' in proc.stderr
    _assert_only_user_frames(proc.stderr, exp)
    assert proc.stderr.strip().splitlines()[-1].startswith(f"jaxnv: error: {last}")


def test_traceback_flag_and_env_show_every_frame(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("JAXNV_CPU_DEVICES", raising=False)  # main() would set XLA_FLAGS
    exp = _write(tmp_path / "broken.py", CONFIG.replace("def config()", "def config(:"))
    assert cli.main(["train", str(exp)]) == 1
    filtered = capsys.readouterr().err
    assert "experiment.py" not in filtered and f'File "{exp}", line 4' in filtered
    for argv, env in [(["--traceback", "train", str(exp)], None), (["train", str(exp)], "full")]:
        if env:
            monkeypatch.setenv("JAXNV_TRACEBACK", env)
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert str(JAXNV_DIR / "experiment.py") in err  # jaxnv's frames too
        assert err.strip().splitlines()[-1].startswith("jaxnv: error: SyntaxError: ")


def test_jaxnv_input_errors_stay_one_line_even_under_user_code(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("JAXNV_CPU_DEVICES", raising=False)
    # the experiment's make_data hands a config typo to jaxnv, which refuses it in one line
    exp = _write(
        tmp_path / "own_data.py",
        CONFIG + "\n\ndef make_data(cfg):\n"
        "    from jaxnv.data.builtin import make_dataset\n\n"
        "    return make_dataset(cfg.data)\n",
    )
    workdir = str(tmp_path / "run")
    for typo, needle in [
        ("train.stepz=3", "did you mean 'train.steps'?"),
        ("data.name=house_pricez", "unknown data.name 'house_pricez'"),
    ]:
        assert cli.main(["train", str(exp), "--workdir", workdir, typo]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("jaxnv: error: ") and needle in err[0], err


def test_frames_are_told_apart_by_their_files(tmp_path):
    assert frame_kind(cli.__file__) == "jaxnv"
    assert frame_kind(jax.__file__) == "hidden"
    assert frame_kind("<frozen importlib._bootstrap>") == "hidden"
    assert frame_kind(np.__file__) == "library"  # shown, but never the owner
    assert frame_kind(os.__file__) == "library"
    assert frame_kind(str(tmp_path / "exp.py")) == "user"
    assert frame_kind(str(JAXNV_DIR / "experiments" / "house_prices.py")) == "user"  # shipped


def test_second_ctrl_c_is_one_line(monkeypatch, capsys):
    monkeypatch.delenv("JAXNV_CPU_DEVICES", raising=False)

    def aborted(args):  # what PreemptionGuard raises on the second signal
        raise KeyboardInterrupt("second SIGINT: aborting")

    monkeypatch.setattr(cli, "cmd_train", aborted)
    try:
        code = cli.main(["train", "house_prices"])
    except KeyboardInterrupt:
        pytest.fail("the second Ctrl-C escaped main() (a traceback for the user)")
    assert code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "jaxnv: interrupted (second SIGINT: aborting): run the same command again to resume"
    ]


@pytest.mark.slow
def test_ctrl_c_twice_during_training_ends_in_one_line_and_the_workdir_restarts(tmp_path):
    workdir = tmp_path / "run"
    args = ["train", "mlp_regression", "--workdir", str(workdir), "logging.progress=false"]
    args += ["logging.log_every=1", "logging.tensorboard=false", "logging.mfu=false"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxnv.cli", *args, "train.steps=1000000"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics, deadline = workdir / "metrics.jsonl", time.monotonic() + 120
        while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # the loop is stepping: the guard is on
        time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = stderr.strip().splitlines()
    # two signals so close may reach Python as one: then it is the usual preemption, also a line
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    if proc.returncode == 130:
        assert lines[0].startswith("jaxnv: interrupted (second SIGINT: aborting)")
    else:
        assert proc.returncode == 75 and lines[0].startswith("jaxnv: stopped by SIGINT"), stderr
    again = _run([*args, "train.steps=3"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
