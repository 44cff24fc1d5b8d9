"""Importing jaxnv and running a fit changes no JAX or NNX global setting."""

import json
import subprocess
import sys

CHILD = r"""
import json
import jax
from flax import nnx

def settings():
    names = ["jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes", "jax_numpy_rank_promotion",
             "jax_enable_x64", "jax_default_matmul_precision"]
    out = {n: str(getattr(jax.config, n)) for n in names}
    out["nnx_eager_sharding"] = nnx.using_eager_sharding()
    out["cpu_async_dispatch"] = jax.config.read("jax_cpu_enable_async_dispatch")
    return out

before = settings()
import numpy as np
import optax
import jaxnv
import jaxnv.models, jaxnv.data, jaxnv.parallel, jaxnv.checkpoint, jaxnv.train, jaxnv.serve.export
after_import = settings()
batches = [{"x": np.ones((8, 3), np.float32), "y": np.zeros((8, 1), np.float32)}]
jaxnv.fit(jaxnv.models.MLP(3, (4,), 1, rngs=nnx.Rngs(0)), jaxnv.losses.mse_loss, batches,
          steps=2, optimizer=optax.sgd(0.1), progress=False, tensorboard=False, mfu=False)
after_fit = settings()
print("SETTINGS " + json.dumps([before, after_import, after_fit]))
"""


def test_import_and_fit_leave_global_settings_alone():
    env_clean = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300, env=env_clean
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("SETTINGS ")][-1]
    before, after_import, after_fit = json.loads(line.removeprefix("SETTINGS "))
    assert after_import == before
    assert after_fit == before
