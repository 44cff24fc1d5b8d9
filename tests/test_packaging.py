"""`pip install` gives a jaxnv that works anywhere, and pyproject.toml states what it can live with.

- The wheel built from the source tree holds the experiments (as `jaxnv.experiments`); installed on
  its own, away from the checkout, it trains `house_prices` and prints `jaxnv info`.
- Runtime dependencies are compatible ranges, never `==`; requirements.lock pins the exact tree,
  and each of its pins lies inside the range pyproject.toml states for that package.
- Every package under jaxnv/ is in pyproject's package list, and every extra that a message or a
  doc names (`pip install ".[digits]"`, `jaxnv[tensorboard]`) exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py") if p.stem[0] != "_")
# `jaxnv[digits]`, `.[test,bench]` (the `.` of a path), in quotes or not
EXTRA = re.compile(r"(?<![\w\]\)])(?:jaxnv|\.)\[([a-z][\w\-]*(?:\s*,\s*[a-z][\w\-]*)*)\]")


def _lock() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not an exact NAME==VERSION pin"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_runtime_dependencies_are_ranges_that_hold_the_lock():
    lock = _lock()
    assert PROJECT["dependencies"]
    for text in PROJECT["dependencies"]:
        req = Requirement(text)
        operators = {spec.operator for spec in req.specifier}
        assert req.specifier, f"{text!r}: state a compatible range (>=tested,<next-breaking)"
        assert not operators & {"==", "==="}, f"{text!r}: a library states a range, not a pin"
        pin = lock.get(canonicalize_name(req.name))
        assert pin is not None, f"{req.name} is a dependency but not pinned in requirements.lock"
        assert req.specifier.contains(pin, prereleases=True), (
            f"requirements.lock pins {req.name}=={pin}, outside pyproject's {req.specifier}"
        )


def test_extras_hold_the_lock_and_torch_stays_in_bench():
    lock = _lock()
    extras = PROJECT["optional-dependencies"]
    assert {"test", "bench", "digits", "tensorboard"} <= set(extras)
    for extra, reqs in extras.items():
        for text in reqs:
            req = Requirement(text)
            pin = lock.get(canonicalize_name(req.name))
            if pin is not None:
                assert req.specifier.contains(pin, prereleases=True), (
                    f"extra {extra!r}: requirements.lock pins {req.name}=={pin}, "
                    f"outside {req.specifier}"
                )
            if canonicalize_name(req.name) == "torch":
                assert (extra, str(req.specifier)) == ("bench", "==2.13.0"), text
    runtime = {canonicalize_name(Requirement(t).name) for t in PROJECT["dependencies"]}
    assert "torch" not in runtime


def test_every_extra_named_in_messages_and_docs_exists():
    files = [
        *(ROOT / "jaxnv").rglob("*.py"),
        *(ROOT / "benchmarks").glob("*.py"),
        *(ROOT / "experiments").glob("*.py"),
        ROOT / "README.md",
        *(ROOT / "docs").glob("*.md"),
        ROOT / "Makefile",
    ]
    named = {}
    for path in files:
        for m in EXTRA.finditer(path.read_text(encoding="utf-8")):
            for extra in m[1].split(","):
                named.setdefault(extra.strip(), path.relative_to(ROOT).as_posix())
    assert "digits" in named, "the digits data set's message no longer names its extra"
    unknown = {e: f for e, f in named.items() if e not in PROJECT["optional-dependencies"]}
    assert not unknown, f"extras named but not defined in pyproject.toml: {unknown}"


def test_every_package_is_listed_and_experiments_map_to_jaxnv_experiments():
    on_disk = {
        ".".join(d.relative_to(ROOT).parts)
        for d in [ROOT / "jaxnv", *(ROOT / "jaxnv").rglob("*")]
        if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))
    }
    missing = sorted(on_disk - set(SETUPTOOLS["packages"]))
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"
    assert SETUPTOOLS["package-dir"] == {"jaxnv.experiments": "experiments"}
    assert "jaxnv.experiments" in SETUPTOOLS["packages"]
    assert (ROOT / "experiments" / "__init__.py").is_file()


def _copy_source(dest: Path) -> Path:
    """What the wheel is built from, copied: no stale build/ or egg-info of the checkout's."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("jaxnv", "experiments"):
        shutil.copytree(ROOT / name, dest / name, ignore=skip)
    return dest


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_wheel_installs_and_trains_outside_the_checkout(tmp_path):
    src = _copy_source(tmp_path / "src")
    dist, site, cwd = tmp_path / "dist", tmp_path / "site", tmp_path / "elsewhere"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    # offline: setuptools comes from this environment, dependencies are not installed by pip here
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src])
    (wheel,) = dist.glob("jaxnv-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "jaxnv/experiments/house_prices.py" in names
    assert {f"jaxnv/experiments/{n}.py" for n in EXPERIMENTS} <= set(names)
    assert not [n for n in names if n.startswith("experiments/")], "experiments/ is top-level"
    _run([*pip, "install", "--no-deps", "--no-index", "--target", site, wheel])

    # only the installed copy is importable: PYTHONPATH=site comes before the venv (which holds
    # the dependencies and an editable jaxnv whose finder runs after the path), and the checkout
    # is not on the path at all
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore")
    (cwd / "own").mkdir()
    shutil.copy2(ROOT / "experiments" / "house_prices.py", cwd / "own" / "exp.py")
    probe = (
        "import json, sys, jaxnv\n"
        "from jaxnv.experiment import _find, available_experiments, experiment_dirs\n"
        "print(json.dumps({'file': jaxnv.__file__, 'path': sys.path,\n"
        "    'dirs': [str(d) for d in experiment_dirs()], 'names': available_experiments(),\n"
        "    'own': str(_find('own/exp.py'))}))\n"
    )
    found = json.loads(_run([sys.executable, "-c", probe], cwd=cwd, env=env).stdout)
    assert Path(found["file"]).resolve().is_relative_to(site.resolve()), found["file"]
    assert not any(p and Path(p).resolve() == ROOT for p in found["path"]), found["path"]
    assert found["dirs"] == [str((site / "jaxnv" / "experiments").resolve())]
    assert found["names"] == EXPERIMENTS
    assert found["own"] == "own/exp.py"  # a user's own file still loads by path

    cli = [sys.executable, "-m", "jaxnv.cli"]
    workdir = cwd / "run"
    train = ["train", "house_prices", "train.steps=20", "logging.progress=false"]
    _run([*cli, *train, "--workdir", str(workdir)], cwd=cwd, env=env)
    assert (workdir / "metrics.jsonl").stat().st_size > 0
    info = _run([*cli, "info"], cwd=cwd, env=env)
    assert f"jaxnv: {PROJECT['version']}" in info.stdout.splitlines(), info.stdout
