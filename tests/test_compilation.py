"""The persistent compilation cache: where it goes, the off switch, and hits in a second process."""

import json
import os
import subprocess
import sys

import jax
import pytest

from jaxnv.train.compilation import (
    ENV,
    cache_dir_setting,
    default_cache_dir,
    enable_compilation_cache,
)


@pytest.fixture
def restore_cache_dir():
    """Tests that enable another directory give the session's back afterwards."""
    saved = jax.config.jax_compilation_cache_dir
    yield
    if saved:
        enable_compilation_cache(saved)
    else:
        jax.config.update("jax_compilation_cache_dir", None)


def test_env_var_names_the_directory(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, str(tmp_path / "xla"))
    assert cache_dir_setting() == str(tmp_path / "xla")
    assert cache_dir_setting(str(tmp_path / "other")) == str(tmp_path / "other")  # argument wins


@pytest.mark.parametrize("word", ["off", "OFF", "0", "none"])
def test_off_leaves_jax_alone(monkeypatch, word):
    monkeypatch.setenv(ENV, word)
    before = jax.config.jax_compilation_cache_dir
    assert cache_dir_setting() is None
    assert enable_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir == before


def test_default_is_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == str(tmp_path / "jaxnv" / "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == str(tmp_path / "home" / ".cache" / "jaxnv" / "xla")


def test_a_directory_set_in_jax_is_kept(monkeypatch, tmp_path, restore_cache_dir):
    monkeypatch.delenv(ENV, raising=False)
    enable_compilation_cache(str(tmp_path / "mine"))
    assert cache_dir_setting() == str(tmp_path / "mine")


def test_enable_sets_jax_config(tmp_path, restore_cache_dir):
    path = enable_compilation_cache(str(tmp_path / "xla"))
    assert path == str(tmp_path / "xla") and os.path.isdir(path)
    assert jax.config.jax_compilation_cache_dir == path
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o700)


def test_unwritable_directory_warns_and_stays_off(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    before = jax.config.jax_compilation_cache_dir
    with pytest.warns(UserWarning, match="JAXNV_COMPILATION_CACHE"):
        assert enable_compilation_cache(str(blocker / "xla")) is None
    assert jax.config.jax_compilation_cache_dir == before


# A child process: build and run one step of a small experiment, and report what the persistent
# cache did (JAX's monitoring events) and how many entries the directory holds afterwards.
CHILD = """
import json, os, sys
import jax
from jax import monitoring
counts = {"hits": 0, "misses": 0}
def listen(event, **kw):
    if event == "/jax/compilation_cache/cache_hits":
        counts["hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":
        counts["misses"] += 1
monitoring.register_event_listener(listen)
from jaxnv import apply_overrides
from jaxnv.experiment import load_experiment
from jaxnv.train import train
from jaxnv.train.compilation import enable_compilation_cache
enable_compilation_cache()  # what the CLI does; a library call leaves JAX's settings alone
exp = load_experiment("house_prices")
exp.config = apply_overrides(exp.config, ["train.steps=2", "logging.progress=false",
    "logging.tensorboard=false", "logging.mfu=false"])
train(exp)
path = os.environ["JAXNV_COMPILATION_CACHE"]
counts["entries"] = len(os.listdir(path)) if os.path.isdir(path) else 0
print("COUNTS " + json.dumps(counts))
"""


def _child(env) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("COUNTS ")][-1]
    return json.loads(line.removeprefix("COUNTS "))


def test_second_process_compiles_from_the_cache(tmp_path):
    env = {**os.environ, ENV: str(tmp_path / "xla")}
    cold = _child(env)
    assert cold["hits"] == 0 and cold["misses"] > 0
    assert cold["entries"] >= cold["misses"]  # every compiled program was written
    warm = _child(env)
    assert warm["misses"] == 0, warm  # nothing compiled again
    assert warm["hits"] >= cold["misses"]
    assert warm["entries"] == cold["entries"]


def test_off_writes_nothing(tmp_path):
    env = {**os.environ, ENV: "off", "XDG_CACHE_HOME": str(tmp_path), "HOME": str(tmp_path)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    counts = _child(env)
    assert counts == {"hits": 0, "misses": 0, "entries": 0}
    assert not (tmp_path / "jaxnv").exists()  # not even the default directory
