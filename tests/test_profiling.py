"""FLOPs from XLA's cost analysis, the profile window spec, and the per-op profile."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import pytest

from jaxnv.train.profiling import op_profile, parse_window, step_flops


def test_step_flops_counts_a_matmul_exactly():
    m, k, n = 64, 48, 32
    f = jax.jit(lambda a, b: a @ b)
    flops = step_flops(f, jnp.ones((m, k)), jnp.ones((k, n)))
    assert flops == pytest.approx(2 * m * k * n, rel=0.01)


def test_parse_window():
    assert parse_window("") is None
    assert parse_window("3:7") == (3, 7)
    for bad in ("7:3", "a:b", "5", "-1:2"):
        with pytest.raises(ValueError, match="logging.profile_steps=10:15"):
            parse_window(bad)


def test_op_profile_names_compiled_ops_and_carries_donated_state():
    def step(state, x):
        y = jnp.sort(jnp.tanh(x @ state["w"]), axis=0)  # a dot and a sort: separate ops
        return {"w": state["w"] + 1.0, "n": state["n"] + 1}, y.sum()

    fn = jax.jit(step, donate_argnums=0)
    state = {"w": jnp.ones((128, 128)), "n": jnp.zeros((), jnp.int32)}
    x = jnp.ones((256, 128))
    hlo = fn.lower(state, x).compile().as_text()
    start = time.perf_counter()
    rows = op_profile(fn, state, x, steps=3, carry=True)
    wall = time.perf_counter() - start
    ops = [r for r in rows if not r[0].startswith("[category]")]
    kinds = [r for r in rows if r[0].startswith("[category]")]
    assert ops and kinds
    for name, ms, _ in ops:
        assert f"%{name} = " in hlo, name  # every row is an op of the compiled module
        assert ms > 0
    # per-call op times add up to less than one call's share of the whole profiled run
    assert sum(ms for _, ms, _ in ops) / 1e3 < wall / 4
    assert sum(ms for _, ms, _ in kinds) == pytest.approx(sum(ms for _, ms, _ in ops), rel=1e-6)
