"""Reports before a run: per-device bytes, collective bytes from HLO, the dry run."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnv.parallel import MeshConfig, make_mesh
from jaxnv.parallel.report import collective_bytes, per_device_bytes


def test_per_device_bytes_follows_the_shardings():
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    tree = {
        "w": jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=NamedSharding(mesh, P("fsdp"))),
        "b": jax.ShapeDtypeStruct((32,), jnp.bfloat16, sharding=NamedSharding(mesh, P())),
    }
    assert per_device_bytes(tree) == 64 * 32 * 4 // 4 + 32 * 2


def test_collective_bytes_of_a_data_parallel_gradient_mean():
    mesh = make_mesh(MeshConfig(data=8))
    x = jax.device_put(np.ones((8, 1000), np.float32), NamedSharding(mesh, P("data")))
    fn = jax.jit(lambda x: jnp.sum(x, axis=0), out_shardings=NamedSharding(mesh, P()))
    moved = collective_bytes(fn.lower(x).compile().as_text())
    assert moved["all-reduce"] == 1000 * 4  # one f32[1000] all-reduce per device
    assert sum(moved.values()) == moved["all-reduce"]


def test_dry_run_prints_table_memory_and_collectives_without_training(tmp_path):
    env = {"JAXNV_CPU_DEVICES": "8", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "jaxnv.cli", "train", "binary_classification", "--dry-run"]
    out = subprocess.run(
        [*cmd, "mesh.rules=fsdp", "mesh.data=1", "mesh.fsdp=8", "model.features=64,64"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "hidden/1/kernel" in text and "P(None, 'fsdp')" in text
    assert "memory per device" in text and "collectives per step per device" in text
    assert "textbook minimum" in text
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written
