"""The `jaxnv` command line as other people's scripts see it: exit codes, stderr, files written."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import flax
import jax
import pytest

import jaxnv
from jaxnv import cli
from jaxnv import config as config_lib
from jaxnv.core.precision import Policy
from jaxnv.experiment import load_experiment

SCRIPT = Path(sys.executable).with_name("jaxnv")  # the console script of this environment


def _env(**extra):
    """The parent's environment without its 8-device XLA flag (each test sets what it means)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXNV_CPU_DEVICES")}
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def _run(args, cwd, script=False, **env):
    cmd = [str(SCRIPT)] if script else [sys.executable, "-m", "jaxnv.cli"]
    return subprocess.run(
        [*cmd, *args], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=300
    )


def _one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("jaxnv: error: ")
    return lines[0]


def test_train_writes_metrics(tmp_path):
    workdir = tmp_path / "run"
    proc = _run(
        [
            "train",
            "house_prices",
            "--workdir",
            str(workdir),
            "train.steps=20",
            "logging.progress=false",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if r["split"] == "train"]
    assert train_steps == [10, 20]  # log_every=10 up to the overridden 20 steps
    assert [r["step"] for r in rows if r["split"] == "eval"] == [20]
    cfg = config_lib.from_dict(json.loads((workdir / "config.json").read_text()))
    assert cfg.train.steps == 20 and cfg.logging.progress is False
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 20
    assert summary["eval_loss"] == pytest.approx(rows[-1]["loss"], rel=1e-12)
    done = [ln for ln in proc.stdout.splitlines() if ln.startswith("jaxnv: done in ")]
    assert len(done) == 1 and "step 20" in done[0] and f"loss={rows[-1]['loss']:.4g}" in done[0]
    assert "\r" not in proc.stderr  # logging.progress=false: no progress bar
    assert not (tmp_path / "runs").exists()  # --workdir given: nothing under ./runs


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "house_prices", "--workdir", "W", "train.steps=3", "train.seed=4"],
        ["train", "house_prices", "train.steps=3", "--workdir", "W", "train.seed=4"],
        ["train", "--workdir", "W", "house_prices", "train.steps=3", "train.seed=4"],
        ["train", "house_prices", "train.steps=3", "train.seed=4", "--workdir", "W"],
    ],
)
def test_overrides_may_come_before_or_after_options(monkeypatch, argv):
    monkeypatch.delenv("JAXNV_CPU_DEVICES", raising=False)  # main() would set XLA_FLAGS
    seen = []
    monkeypatch.setattr(cli, "cmd_train", lambda args: seen.append(args) or 0)
    assert cli.main(argv) == 0
    (args,) = seen
    assert args.experiment == "house_prices" and args.workdir == "W"
    assert args.overrides == ["train.steps=3", "train.seed=4"]  # in the order given


def test_unknown_option_is_still_refused(monkeypatch, capsys):
    monkeypatch.delenv("JAXNV_CPU_DEVICES", raising=False)  # main() would set XLA_FLAGS
    monkeypatch.setattr(cli, "cmd_train", lambda args: pytest.fail("should not run"))
    with pytest.raises(SystemExit) as err:
        cli.main(["train", "house_prices", "--wrkdir", "W", "train.steps=3"])
    assert err.value.code == 2
    assert "unrecognized arguments: --wrkdir" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["train.stepz=3"], ["unknown config key 'train.stepz'", "did you mean 'train.steps'?"]),
        (["precision.policy=bf61"], ["'bf61'", "fp32", "bf16", "fp16", "auto"]),
        (["optimizer.name=adamm"], ["unknown optimizer 'adamm'", "did you mean 'adam'?"]),
        (["train.steps=1.5"], ["'train.steps' expects int"]),
        (["train.batch_size=30", "train.micro_batches=4"], ["train.micro_batches=4"]),
    ],
    ids=["key", "policy", "optimizer", "type", "validate"],
)
def test_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path, args, needles):
    workdir = tmp_path / "run"
    proc = _run(["train", "house_prices", "--workdir", str(workdir), *args], cwd=tmp_path)
    assert proc.returncode == 2
    line = _one_error_line(proc)
    for needle in needles:
        assert needle in line
    assert not workdir.exists()  # refused before anything was written
    assert "Traceback" not in proc.stderr


def test_unknown_experiment(tmp_path):
    proc = _run(["train", "nosuch"], cwd=tmp_path)
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert "unknown experiment 'nosuch'" in line
    for name in ("house_prices", "binary_classification", "mlp_regression"):
        assert name in line  # nothing close: the valid names are listed
    proc = _run(["train", "house_price"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "did you mean 'house_prices'?" in _one_error_line(proc)


def test_print_config_applies_overrides(tmp_path):
    proc = _run(
        ["train", "house_prices", "--print-config", "train.steps=7", "model.use_bias=false"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    printed = config_lib.from_dict(json.loads(proc.stdout))
    want = config_lib.apply_overrides(
        load_experiment("house_prices").config, ["train.steps=7", "model.use_bias=false"]
    )
    assert printed == want
    assert os.listdir(tmp_path) == []  # printing the config trains and writes nothing


def test_info(tmp_path):
    proc = _run(["info"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "backend: cpu" in lines
    assert any(ln.startswith("devices: 1 x ") for ln in lines)  # the parent's 8 did not leak
    auto = Policy.auto(jax.devices("cpu"))
    assert f"auto precision: {auto} (loss scale: {auto.default_loss_scale})" in lines
    assert f"  why: {auto.reason}" in lines
    for name, version in [("jaxnv", jaxnv.__version__), ("jax", jax.__version__)]:
        assert f"{name}: {version}" in lines
    assert f"flax: {flax.__version__}" in lines


def test_cpu_devices_env_sets_device_count(tmp_path):
    assert SCRIPT.is_file(), f"no console script at {SCRIPT}: pip install -e . first"
    proc = _run(["info"], cwd=tmp_path, script=True, JAXNV_CPU_DEVICES="4")
    assert proc.returncode == 0, proc.stderr
    assert any(ln.startswith("devices: 4 x ") for ln in proc.stdout.splitlines())


def test_cpu_devices_env_must_be_positive(monkeypatch):
    for bad in ("four", "0", "-2"):
        monkeypatch.setenv("JAXNV_CPU_DEVICES", bad)
        with pytest.raises(SystemExit) as err:
            cli._setup_devices()  # checked before jax starts, so in-process is faithful
        assert f"JAXNV_CPU_DEVICES={bad!r} must be a positive integer" in str(err.value.code)


def test_no_command_prints_usage(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main([])
    assert err.value.code == 2
    assert "usage: jaxnv" in capsys.readouterr().err


QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.mfu=false"]
TRAINED_WITH = ["model.name=mlp", "model.features=8"]  # what eval and export must not need again


@pytest.fixture(scope="module")
def mlp_workdir(tmp_path_factory):
    """house_prices trained as an MLP of width 8: only its config.json records that."""
    workdir = str(tmp_path_factory.mktemp("mlp") / "run")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("JAXNV_CPU_DEVICES", raising=False)  # main() would set XLA_FLAGS
        argv = ["train", "house_prices", "--workdir", workdir, "train.steps=10", *TRAINED_WITH]
        assert cli.main([*argv, *QUIET]) == 0
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        return workdir, json.load(f)


def test_eval_and_export_read_the_workdirs_config(mlp_workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("JAXNV_CPU_DEVICES", raising=False)
    workdir, summary = mlp_workdir
    capsys.readouterr()
    assert cli.main(["eval", "house_prices", "--workdir", workdir]) == 0, capsys.readouterr().err
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["step"] == 10
    assert row["loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
    # overrides still apply, on top of the workdir's config
    assert cli.main(["eval", "house_prices", "--workdir", workdir, "train.eval_batch_size=7"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(row["loss"], rel=1e-5)
    out = tmp_path / "export"
    argv = ["export", "house_prices", "--workdir", workdir, "--out", str(out), "--platforms", "cpu"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "step 10" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["model"]["name"] == "mlp"
    assert list(manifest["config"]["model"]["features"]) == [8]
    # an override that contradicts the checkpoints: one line, the differing params first
    assert cli.main(["eval", "house_prices", "--workdir", workdir, "model.features=16"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("jaxnv: error: checkpoint step 10 ")
    assert "does not match this model: params/" in line


def test_resume_goes_on_from_the_workdirs_config_and_names_what_changes(
    mlp_workdir, tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("JAXNV_CPU_DEVICES", raising=False)
    workdir = str(tmp_path / "run")
    shutil.copytree(mlp_workdir[0], workdir)
    capsys.readouterr()
    # no model overrides: the MLP of the config.json resumes (the experiment's own is linear)
    argv = ["train", "house_prices", "--workdir", workdir, "train.steps=14", "logging.log_every=7"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    warnings = [ln for ln in err.splitlines() if ln.startswith("jaxnv: warning: resuming")]
    assert len(warnings) == 1, err
    assert "train.steps 10 -> 14" in warnings[0]
    assert "logging" not in warnings[0]  # what is logged does not change the run
    summary = json.loads(open(os.path.join(workdir, "summary.json"), encoding="utf-8").read())
    assert summary["resumed_from"] == 10 and summary["steps"] == 14
    assert "resumed from 10" in out
    # without a change there is nothing to warn about
    cfg = json.loads(open(os.path.join(workdir, "config.json"), encoding="utf-8").read())
    assert cfg["train"]["steps"] in (10, 14)  # rewritten on resume, or kept as first trained
    steps = f"train.steps={cfg['train']['steps']}"
    assert cli.main(["train", "house_prices", "--workdir", workdir, steps]) == 0
    assert "jaxnv: warning: resuming" not in capsys.readouterr().err


def test_workdir_config_applies_overrides_on_top(tmp_path):
    base = load_experiment("house_prices").config
    trained = config_lib.apply_overrides(base, [*TRAINED_WITH, "train.steps=10"])
    (tmp_path / "config.json").write_text(json.dumps(config_lib.to_dict(trained)))
    overrides = ["train.steps=20", "logging.log_every=5"]
    cfg, changes = cli.workdir_config(base, str(tmp_path), overrides)
    assert cfg == config_lib.apply_overrides(trained, overrides)
    assert changes == ["train.steps 10 -> 20"]
    cfg, changes = cli.workdir_config(base, str(tmp_path / "nothing"), ["train.steps=20"])
    assert cfg == config_lib.apply_overrides(base, ["train.steps=20"]) and changes == []
    (tmp_path / "config.json").write_text('{"model": {"name": "mlp", "featurez": [8]}}')
    with pytest.raises(config_lib.ConfigError) as err:
        cli.workdir_config(base, str(tmp_path), [])
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'config.json'} does not load as a config (")
    assert "featurez" in message and "\n" not in message
