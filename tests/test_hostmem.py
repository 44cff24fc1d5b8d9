"""Host memory: with JAXNV_MALLOC=keep, XLA:CPU's per-step buffers reuse freed memory instead of
faulting in fresh pages every step; unset, another value, or an accelerator leave glibc alone."""

import json
import os
import subprocess
import sys

import pytest

# a plain JAX step whose temporaries (~100 MB) XLA:CPU allocates and frees on every call; the
# minor page faults of 5 calls after a warm-up, counted by the kernel (getrusage)
SCRIPT = """
import json, resource, sys
import jaxnv
from jaxnv import hostmem
import jax, jax.numpy as jnp

@jax.jit
def step(x):
    h = jnp.tanh(x @ x.T)            # (2048, 2048) temporaries
    return jnp.sum(jnp.tanh(h @ h) * h) + x

x = jnp.ones((2048, 512), jnp.float32) * 1e-3
for _ in range(2):
    x = step(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    x = step(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({"faults": faults, "status": hostmem.status()}))
"""


def _run(**env):
    full = {k: v for k, v in os.environ.items() if k not in ("JAXNV_MALLOC", "JAX_PLATFORMS")}
    full.update(env, JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=full, capture_output=True,
                         text=True, timeout=300, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_step_buffers_reuse_memory_with_jaxnv_malloc_keep():
    kept = _run(JAXNV_MALLOC="keep")
    system = _run()
    assert kept["status"].startswith("freed memory kept for reuse")
    assert system["status"] == "glibc's defaults (JAXNV_MALLOC=keep not set)"
    # glibc's defaults map every step's temporaries afresh: thousands of faults a step
    assert system["faults"] > 4000, system
    assert kept["faults"] < system["faults"] / 4, (kept, system)  # measured: 1,024 vs 10,055


def test_left_alone_unless_asked_and_on_an_accelerator(monkeypatch):
    from jaxnv import hostmem

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


def test_jaxnv_info_reports_it():
    out = subprocess.run([sys.executable, "-m", "jaxnv.cli", "info"], capture_output=True,
                         text=True, timeout=120, check=True)  # fmt: skip
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("host memory: "))
    assert "freed memory kept for reuse" in line or "glibc's defaults (" in line
