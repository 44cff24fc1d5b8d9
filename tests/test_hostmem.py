"""Host memory: with JAXNV_MALLOC=keep, XLA:CPU's per-step buffers reuse freed memory instead of
faulting in fresh pages every step, and CPU computations run on the calling thread; unset,
another value, an accelerator, or JAX already started leave glibc and JAX alone."""

import json
import os
import subprocess
import sys

import pytest

# a plain JAX step with a 64 MB temporary, which XLA:CPU allocates and frees on every call
# (glibc maps a block that large afresh by default); the minor page faults of 10 calls after
# a warm-up, counted by the kernel (getrusage)
SCRIPT = """
import json, resource, sys
import jaxnv
from jaxnv import hostmem
import jax, jax.numpy as jnp

@jax.jit
def step(x):
    h = jnp.tanh(x @ x.T)            # (4096, 4096)
    return x + 1e-3 * (h @ x)

x = jnp.ones((4096, 64), jnp.float32) * 1e-3
for _ in range(3):
    x = step(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    x = step(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(json.dumps({"faults": faults, "status": hostmem.status(),
                  "async_dispatch": jax.config.read("jax_cpu_enable_async_dispatch")}))
"""


def _run(script=SCRIPT, **env):
    unset = ("JAXNV_MALLOC", "JAX_PLATFORMS", "JAX_CPU_ENABLE_ASYNC_DISPATCH")
    full = {k: v for k, v in os.environ.items() if k not in unset}
    full.update(env, JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"))
    out = subprocess.run([sys.executable, "-c", script], env=full, capture_output=True,
                         text=True, timeout=300, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_step_buffers_reuse_memory_with_jaxnv_malloc_keep():
    kept = _run(JAXNV_MALLOC="keep")
    system = _run()
    assert kept["status"].startswith("freed memory kept for reuse")
    assert system["status"] == "glibc's and JAX's defaults (JAXNV_MALLOC=keep not set)"
    # the temporaries come from the calling thread's heap: JAX's dispatch threads would map them
    assert kept["async_dispatch"] is False and system["async_dispatch"] is True
    # glibc's defaults map every step's temporaries afresh: thousands of faults a step
    assert system["faults"] > 4000, system
    assert kept["faults"] < system["faults"] / 4, (kept, system)  # measured: 0-1,638 vs 16,546


def test_left_alone_unless_asked_and_on_an_accelerator(monkeypatch):
    from jaxnv import hostmem

    # the environment's rules only: JAX may have started in this test process (a subprocess
    # covers that case below)
    monkeypatch.setattr(hostmem, "_backend_started", lambda: False)
    monkeypatch.delenv("JAXNV_MALLOC", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert hostmem._why_not() == "JAXNV_MALLOC=keep not set"
    monkeypatch.setenv("JAXNV_MALLOC", "kep")
    assert hostmem._why_not() == "JAXNV_MALLOC='kep': only 'keep' changes it"
    monkeypatch.setenv("JAXNV_MALLOC", "keep")
    assert hostmem._why_not() is None
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert hostmem._why_not() == "JAX_PLATFORMS=cuda,cpu"
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(hostmem, "ACCELERATOR_PLUGINS", ("json",))  # an installed module
    assert hostmem._why_not() == "an accelerator plugin is installed (json)"
    monkeypatch.setattr(hostmem, "ACCELERATOR_PLUGINS", ())
    monkeypatch.setenv("JAX_CPU_ENABLE_ASYNC_DISPATCH", "true")
    assert hostmem._why_not() == (
        "JAX_CPU_ENABLE_ASYNC_DISPATCH is set: JAX's dispatch left as it says"
    )


# JAX started before jaxnv's import: too late to change its dispatch, so nothing is changed
LATE = """
import json
import jax
jax.numpy.ones(2).block_until_ready()
import jaxnv
from jaxnv import hostmem
print(json.dumps({"status": hostmem.status(),
                  "async_dispatch": jax.config.read("jax_cpu_enable_async_dispatch")}))
"""


def test_not_applied_once_jax_has_started():
    late = _run(LATE, JAXNV_MALLOC="keep")
    assert late["status"] == (
        "glibc's and JAX's defaults (JAX's backend had already started: import jaxnv before "
        "running JAX)"
    )
    assert late["async_dispatch"] is True


def test_jaxnv_info_reports_it():
    out = subprocess.run([sys.executable, "-m", "jaxnv.cli", "info"], capture_output=True,
                         text=True, timeout=120, check=True)  # fmt: skip
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("host memory: "))
    assert "freed memory kept for reuse" in line or "glibc's and JAX's defaults (" in line


def test_a_training_run_reports_it_only_when_asked(tmp_path):
    def run(**env):
        full = {k: v for k, v in os.environ.items() if k != "JAXNV_MALLOC"}
        full.update(env, JAX_PLATFORMS="cpu", JAXNV_CPU_DEVICES="1")
        cmd = [sys.executable, "-m", "jaxnv.cli", "train", "mlp_regression", "train.steps=4",
               "logging.progress=false", "--workdir", str(tmp_path / str(len(env)))]  # fmt: skip
        out = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return [ln for ln in out.stdout.splitlines() if ln.startswith("host memory: ")]

    assert run(JAXNV_MALLOC="keep") == [
        "host memory: freed memory kept for reuse (JAXNV_MALLOC=keep: no mmap, CPU computations "
        "run on the calling thread)"
    ]
    assert run() == []
