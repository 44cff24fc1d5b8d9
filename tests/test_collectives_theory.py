"""Collective traffic read from compiled steps against the textbook figures (8 CPU devices)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnv import apply_overrides
from jaxnv.experiment import load_experiment
from jaxnv.parallel import MeshConfig, make_mesh
from jaxnv.parallel.report import (
    INSPECT_ONLY,
    collectives,
    compile_step,
    format_report,
    group_size,
    param_traffic,
    per_device_bytes,
    sent_bytes,
)
from jaxnv.train import build


def _build(name, overrides):
    exp = load_experiment(name)
    run = build(
        dataclasses.replace(exp, config=apply_overrides(exp.config, overrides)), abstract=True
    )
    return run, compile_step(run, INSPECT_ONLY)


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "line, n",
    [
        ("all-reduce(%a), replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add", 4),
        ("all-gather(%a), replica_groups=[4,2]<=[8], dimensions={0}", 2),
        ("all-gather(%a), replica_groups=[2,4]<=[4,2]T(1,0), dimensions={1}", 4),
        ("all-reduce(%a), replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, to_apply", 4),
        ("all-reduce(%a), replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2] {'axis_2'}", 2),
        (
            "all-gather(%a), replica_groups=mesh['axis_0'=4,'axis_1'=2], "
            "device_ids=([2,4]T(1,0)) {'axis_0'}, dimensions={0}",
            4,
        ),
        (
            "all-reduce(%a), replica_groups=mesh['axis_0'=1,'axis_1'=4,'axis_2'=2], "
            "device_ids=([2,4]T(1,0)) {'axis_2'}, to_apply=%add",
            2,
        ),
        ("all-reduce(%a), replica_groups={}, to_apply=%add", 8),
    ],
)
def test_group_size_reads_every_spelling(line, n):
    assert group_size(line, devices=8) == n


def test_dp_all_reduces_exactly_the_gradients_once():
    """dp on an MLP: one all-reduce of every gradient over 8 devices, 2 (n-1)/n of it sent."""
    run, compiled = _build(
        "mlp_regression",
        ["model.features=256,256", "train.batch_size=64", "mesh.rules=dp", "mesh.data=8"],
    )
    grads = _nbytes(run.state.params)  # fp32 grads, shaped like the params
    ops = collectives(compiled.as_text(), 8)
    reduced = sum(c.buffer * c.count for c in ops if c.kind == "all-reduce")
    assert grads <= reduced <= 1.10 * grads  # + the loss and metric scalars, nothing else
    assert all(c.group == 8 for c in ops) and not any(c.sliced for c in ops)
    theory = 2 * 7 / 8 * grads
    assert sent_bytes(ops)["all-reduce"] == pytest.approx(theory, rel=0.10)
    assert sum(param_traffic(run.plan, run.state.params).values()) == pytest.approx(theory)
    assert "textbook minimum: 0.46 MiB" in format_report(run, compiled)


def test_fsdp_holds_an_eighth_and_reduce_scatters_the_gradients():
    """fsdp on a transformer whose every dim splits 8 ways: 1/8 of the state per device; each
    param gathered once, each gradient reduced and sliced (a reduce-scatter on GPU)."""
    run, compiled = _build(
        "char_gpt",
        [
            "model.num_layers=1",
            "model.embed_dim=64",
            "data.seq_len=32",
            "train.batch_size=16",
            "mesh.rules=fsdp",
            "mesh.data=1",
            "mesh.fsdp=8",
        ],
    )
    full = _nbytes(run.state.params)
    assert per_device_bytes(run.state.params) == full // 8
    assert per_device_bytes(run.state.opt_state) == pytest.approx(2 * full / 8, abs=64)
    ops = collectives(compiled.as_text(), 8)
    # XLA's CPU pipeline all-reduces each gradient whole and keeps this device's slice
    assert sum(c.sliced for c in ops) == full
    gpu = sent_bytes(ops, as_gpu=True)
    theory = param_traffic(run.plan, run.state.params)
    assert theory["all-gather"] == theory["reduce-scatter"] == pytest.approx(7 / 8 * full)
    assert gpu["reduce-scatter"] == pytest.approx(theory["reduce-scatter"], rel=1e-3)
    assert gpu["all-gather"] == pytest.approx(theory["all-gather"], rel=0.10)
    assert sum(gpu.values()) == pytest.approx(sum(theory.values()), rel=0.10)


def test_collectives_in_a_loop_count_once_per_trip():
    mesh = make_mesh(MeshConfig(data=8))

    def body(x):
        def step(i, acc):
            return acc + jax.lax.psum(x * i, "data")

        return jax.lax.fori_loop(0, 3, step, jnp.zeros_like(x))

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
    x = jax.device_put(np.ones((8, 100), np.float32), NamedSharding(mesh, P("data")))
    ops = [c for c in collectives(fn.lower(x).compile().as_text(), 8) if c.kind == "all-reduce"]
    assert sum(c.buffer * c.count for c in ops) == 3 * 100 * 4
    assert sum(sent_bytes(ops).values()) == pytest.approx(3 * 2 * 7 / 8 * 100 * 4)
