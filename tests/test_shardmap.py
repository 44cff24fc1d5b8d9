"""The shard_map data-parallel step against the jit-sharding path and a single device."""

import jax
import numpy as np
import pytest

from jaxnv.core.losses import mse_loss
from jaxnv.core.optim import OptimizerConfig, make_optimizer, make_schedule
from jaxnv.core.precision import get_policy, make_loss_scale
from jaxnv.core.state import abstract_model, abstract_state, init_state
from jaxnv.core.step import make_train_step
from jaxnv.models import MLP
from jaxnv.parallel import MeshConfig, make_mesh, make_plan, put_batch
from jaxnv.parallel.shardmap import make_dp_train_step, replicated

STEPS = 6
BATCH = 32
OPT = OptimizerConfig(
    name="adamw", learning_rate=1e-2, weight_decay=0.1, schedule="cosine", warmup_steps=2
)
POLICY = get_policy("fp32")
MESHES = {  # id -> (mesh config, the jit path's rule preset)
    "data8": (MeshConfig(data=8), "dp"),
    "data2_fsdp4": (MeshConfig(data=2, fsdp=4), "fsdp"),  # vs ZeRO-3 sharded jit params too
}


def _model_fn(rngs):
    return MLP(4, (32, 32), 1, policy=POLICY, rngs=rngs)


def _batches(n, batch=BATCH, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "x": rng.normal(size=(batch, 4)).astype(np.float32),
            "y": rng.normal(size=(batch, 1)).astype(np.float32),
        }
        for _ in range(n)
    ]


def _tx():
    return make_optimizer(OPT, STEPS), make_schedule(OPT, STEPS)


def _run(state, step, batches, put=lambda b: b):
    metrics = []
    for batch in batches:
        state, m = step(state, put(batch))
        metrics.append(jax.device_get(m))
    return state, metrics


def _shard_map_run(mesh, loss_scale=None):
    """A replicated state and the shard_map step on `mesh`."""
    tx, lr = _tx()
    graphdef, state = init_state(
        _model_fn,
        tx,
        POLICY,
        jax.random.PRNGKey(0),
        loss_scale=loss_scale,
        out_shardings=replicated(mesh),
    )
    step = make_dp_train_step(graphdef, mse_loss, tx, POLICY, mesh, learning_rate_fn=lr)
    return state, step


def _jit_run(mesh, rules, batches):
    """The jit-sharding path: shardings from the rule plan, batches placed by put_batch."""
    tx, lr = _tx()
    rng = jax.random.PRNGKey(0)
    template = abstract_state(_model_fn, tx, POLICY, rng)
    plan = make_plan(abstract_model(_model_fn), template, mesh, rules)
    graphdef, state = init_state(_model_fn, tx, POLICY, rng, out_shardings=plan.state)
    step = make_train_step(
        graphdef,
        mse_loss,
        tx,
        POLICY,
        learning_rate_fn=lr,
        state_sharding=plan.state,
        batch_sharding=plan.batch,
    )
    return _run(state, step, batches, lambda b: put_batch(b, plan.batch))


def _single_device_run(batches):
    tx, lr = _tx()
    graphdef, state = init_state(_model_fn, tx, POLICY, jax.random.PRNGKey(0))
    step = make_train_step(graphdef, mse_loss, tx, POLICY, learning_rate_fn=lr)
    return _run(state, step, batches)


def _assert_same(got, want, metrics_got, metrics_want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert len(metrics_got) == len(metrics_want)
    for m, n in zip(metrics_got, metrics_want, strict=True):
        assert (
            set(m) == set(n) == {"loss", "grad_norm", "loss_scale", "grads_finite", "learning_rate"}
        )
        for k in ("loss", "grad_norm", "learning_rate", "loss_scale"):
            np.testing.assert_allclose(m[k], n[k], rtol=1e-6, err_msg=k)
        assert bool(m["grads_finite"]) and bool(n["grads_finite"])


@pytest.fixture(scope="module")
def single_device():
    state, metrics = _single_device_run(_batches(STEPS))
    return jax.device_get(state.params), metrics


@pytest.mark.parametrize("mesh_id", sorted(MESHES))
def test_shard_map_step_equals_jit_path_and_one_device(mesh_id, single_device):
    mesh_cfg, rules = MESHES[mesh_id]
    mesh = make_mesh(mesh_cfg)
    batches = _batches(STEPS)
    state, step = _shard_map_run(mesh)
    state, sm_metrics = _run(state, step, batches)
    jit_state, jit_metrics = _jit_run(mesh, rules, batches)
    # the state stays replicated: every device holds the whole of every leaf
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
    params = jax.device_get(state.params)
    _assert_same(params, jax.device_get(jit_state.params), sm_metrics, jit_metrics)
    _assert_same(params, single_device[0], sm_metrics, single_device[1])
    assert int(state.step) == STEPS


def test_gradient_mean_is_an_explicit_all_reduce():
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    batch = _batches(1)[0]
    state, step = _shard_map_run(mesh)
    jaxpr = str(jax.make_jaxpr(step.fn)(state, batch))
    assert "shard_map" in jaxpr and "psum" in jaxpr  # pmean = psum / shards, written by us
    hlo = step.fn.lower(state, batch).compile().as_text()
    assert "all-reduce" in hlo


def test_inf_in_one_shard_skips_the_update_on_every_device():
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    good = _batches(2)
    loss_scale = make_loss_scale("dynamic", init_scale=2.0**10, period=100)
    state, step = _shard_map_run(mesh, loss_scale=loss_scale)
    state, _ = step(state, good[0])  # one real step so the optimizer state is non-trivial
    before = jax.device_get((state.params, state.opt_state))
    bad = {k: v.copy() for k, v in good[1].items()}
    rows = BATCH // 8
    bad["x"][5 * rows + 1, 2] = np.inf  # only device 5's rows
    state, metrics = step(state, bad)
    assert not bool(metrics["grads_finite"])
    assert float(state.loss_scale.loss_scale) == 2.0**9
    assert int(state.step) == 2
    for leaf, old in zip(
        jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves(before), strict=True
    ):
        assert len(leaf.addressable_shards) == 8
        for shard in leaf.addressable_shards:  # bit-identical on every device
            np.testing.assert_array_equal(np.asarray(shard.data), old)


def test_batch_that_does_not_split_is_refused_before_compiling():
    mesh = make_mesh(MeshConfig(data=8))
    batch = _batches(1, batch=36)[0]
    state, step = _shard_map_run(mesh)
    with pytest.raises(ValueError, match=r"\(36, 4\) does not split over mesh data\*fsdp=8") as err:
        step.fn.trace(state, batch)  # tracing alone raises: nothing is lowered or compiled
    assert "\n" not in str(err.value) and "multiple of 8" in str(err.value)
    with pytest.raises(ValueError, match="does not split"):
        step(state, batch)


def test_each_shard_draws_from_its_own_key():
    """Shard i's loss_fn gets fold_in(fold_in(state.rng, step), i): dropout differs per shard."""
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))

    def loss_fn(model, batch, rng):
        loss, _ = mse_loss(model, batch, rng)
        return loss, {"u": jax.random.uniform(rng)}  # pmean'd over the shards

    tx, _ = _tx()
    graphdef, state = init_state(
        _model_fn, tx, POLICY, jax.random.PRNGKey(0), out_shardings=replicated(mesh)
    )
    step = make_dp_train_step(graphdef, loss_fn, tx, POLICY, mesh)
    for s, batch in enumerate(_batches(2)):
        base = jax.random.fold_in(state.rng, s)
        draws = [float(jax.random.uniform(jax.random.fold_in(base, i))) for i in range(8)]
        state, metrics = step(state, batch)
        assert len(set(draws)) == 8
        np.testing.assert_allclose(metrics["u"], np.mean(draws), rtol=1e-6)
