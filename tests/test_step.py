"""train_step against hand-written plain JAX + optax, accumulation, mixed precision, overflow."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnv.core.losses import mse_loss
from jaxnv.core.optim import OptimizerConfig, make_optimizer, make_schedule
from jaxnv.core.precision import DynamicLossScale, get_policy, make_loss_scale
from jaxnv.core.state import init_state
from jaxnv.core.step import batch_spec_of, check_batch_fits, make_eval_step, make_train_step
from jaxnv.models import MLP

STEPS = 5


def _batches(n, batch=16, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "x": rng.normal(size=(batch, 4)).astype(np.float32),
            "y": rng.normal(size=(batch, 1)).astype(np.float32),
        }
        for _ in range(n)
    ]


def _model_fn(policy, dropout=0.0):
    return lambda rngs: MLP(4, (8,), 1, dropout=dropout, policy=policy, rngs=rngs)


def _setup(opt_cfg, policy="fp32", loss_scale=None, micro_batches=1, total=STEPS):
    policy = get_policy(policy)
    tx = make_optimizer(opt_cfg, total)
    graphdef, state = init_state(
        _model_fn(policy), tx, policy, jax.random.PRNGKey(0), loss_scale=loss_scale
    )
    step = make_train_step(
        graphdef,
        mse_loss,
        tx,
        policy,
        learning_rate_fn=make_schedule(opt_cfg, total),
        micro_batches=micro_batches,
    )
    return graphdef, state, step


def _pure(params):
    """{'w1','b1','w2','b2'} numpy copies of the MLP's params."""
    p = params
    h, o = p["hidden"][0], p["head"]
    return {"w1": h["kernel"], "b1": h["bias"], "w2": o["kernel"], "b2": o["bias"]}


def _reference_loss(p, batch):
    hidden = jax.nn.relu(batch["x"] @ p["w1"] + p["b1"][None, :])
    return jnp.mean((hidden @ p["w2"] + p["b2"][None, :] - batch["y"]) ** 2)


def _reference_run(params, tx, batches):
    """Plain JAX + optax: the same model written by hand."""
    params = jax.tree.map(jnp.asarray, params)
    opt_state = tx.init(params)
    for batch in batches:
        grads = jax.grad(_reference_loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params


def _decay_mask(p):
    return {k: v.ndim >= 2 for k, v in p.items()}


REFERENCES = {
    "sgd": (
        OptimizerConfig(name="sgd", learning_rate=0.1, momentum=0.9),
        lambda: optax.sgd(0.1, momentum=0.9),
    ),
    "adamw": (
        OptimizerConfig(
            name="adamw", learning_rate=1e-2, weight_decay=0.1, schedule="cosine", warmup_steps=2
        ),
        lambda: optax.adamw(
            optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, STEPS, 0.0),
            weight_decay=0.1,
            mask=_decay_mask,
        ),
    ),
    "lion": (
        OptimizerConfig(name="lion", learning_rate=1e-3, b1=0.9, b2=0.99, weight_decay=0.01),
        lambda: optax.lion(1e-3, b1=0.9, b2=0.99, weight_decay=0.01, mask=_decay_mask),
    ),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_train_step_matches_plain_jax_optax(name):
    opt_cfg, reference_tx = REFERENCES[name]
    _, state, step = _setup(opt_cfg)
    init = jax.device_get(_pure(state.params))
    batches = _batches(STEPS)
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    expected = _reference_run(init, reference_tx(), batches)
    got = _pure(state.params)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert int(state.step) == STEPS
    # the first loss is the reference loss at the initial params
    np.testing.assert_allclose(losses[0], _reference_loss(init, batches[0]), rtol=1e-6)


def test_gradient_accumulation_equals_full_batch():
    opt_cfg = OptimizerConfig(name="adamw", learning_rate=1e-2, weight_decay=0.1)
    _, full, full_step = _setup(opt_cfg)
    _, accum, accum_step = _setup(opt_cfg, micro_batches=4)
    for batch in _batches(3):
        full, m_full = full_step(full, batch)
        accum, m_acc = accum_step(accum, batch)
        np.testing.assert_allclose(m_acc["loss"], m_full["loss"], rtol=1e-6)
        np.testing.assert_allclose(m_acc["grad_norm"], m_full["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(accum.params), jax.tree.leaves(full.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _dot_dtypes(jaxpr) -> list[tuple[str, ...]]:
    """Operand dtypes of every dot_general in a jaxpr, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(v.aval.dtype.name for v in eqn.invars))
        for sub in jax.core.subjaxprs(eqn.params) if hasattr(jax.core, "subjaxprs") else []:
            found += _dot_dtypes(sub)
        for p in eqn.params.values():
            inner = getattr(p, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                found += _dot_dtypes(inner)
            elif hasattr(p, "eqns"):
                found += _dot_dtypes(p)
    return found


def test_bf16_matmuls_run_in_bf16_and_master_state_stays_fp32():
    opt_cfg = OptimizerConfig(name="adamw", learning_rate=1e-2)
    _, state, step = _setup(opt_cfg, policy="bf16")
    batch = _batches(1)[0]
    jaxpr = jax.make_jaxpr(step.fn)(state, batch).jaxpr
    dots = _dot_dtypes(jaxpr)
    # forward: 2 layers; backward: dx and dW for the head, dW for the first layer
    assert len(dots) >= 5, dots
    assert all(d == ("bfloat16", "bfloat16") for d in dots), dots
    state, metrics = step(state, batch)
    for leaf in jax.tree.leaves((state.params, state.opt_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32
    assert metrics["loss"].dtype == jnp.float32


def test_fp32_matmuls_stay_fp32():
    _, state, step = _setup(OptimizerConfig(name="sgd", learning_rate=0.1))
    dots = _dot_dtypes(jax.make_jaxpr(step.fn)(state, _batches(1)[0]).jaxpr)
    assert dots and all(d == ("float32", "float32") for d in dots), dots


@pytest.mark.parametrize("policy", ["bf16", "fp16"])
def test_low_precision_training_tracks_fp32(policy):
    """200 steps on a teacher regression: final loss within 5% (relative) of fp32's."""
    opt_cfg = OptimizerConfig(name="adam", learning_rate=1e-2)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(4, 1))).astype(np.float32)
    batch = {"x": x, "y": y}
    final = {}
    for p in ("fp32", policy):
        ls = make_loss_scale("auto", get_policy(p), init_scale=2.0**10)
        _, state, step = _setup(opt_cfg, policy=p, loss_scale=ls, total=200)
        for _ in range(200):
            state, metrics = step(state, batch)
        final[p] = float(metrics["loss"])
    assert final["fp32"] < 0.05  # it learned something
    assert abs(final[policy] - final["fp32"]) <= 0.05 * final["fp32"] + 2e-3, final


def test_fp16_overflow_skips_update_and_halves_scale():
    opt_cfg = OptimizerConfig(name="adamw", learning_rate=1e-2)
    ls = make_loss_scale("dynamic", init_scale=2.0**10, period=3)
    _, state, step = _setup(opt_cfg, policy="fp16", loss_scale=ls)
    assert isinstance(state.loss_scale, DynamicLossScale)
    good = _batches(4)
    state, _ = step(state, good[0])  # one ordinary step so opt_state is non-trivial
    before = jax.device_get((state.params, state.opt_state))
    bad = dict(good[1], x=good[1]["x"].copy())
    bad["x"][3, 1] = np.inf
    state, metrics = step(state, bad)
    assert not bool(metrics["grads_finite"])
    after = jax.device_get((state.params, state.opt_state))
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)  # bit-identical
    assert float(state.loss_scale.loss_scale) == 2.0**9
    assert int(state.step) == 2  # the step still counts: the next batch is a new one
    # three finite steps in a row double the scale, not before
    scales = []
    for batch in good[1:]:
        state, metrics = step(state, batch)
        assert bool(metrics["grads_finite"])
        scales.append(float(state.loss_scale.loss_scale))
    assert scales == [2.0**9, 2.0**9, 2.0**10]


def test_nan_gradients_skipped_in_fp32_too():
    _, state, step = _setup(OptimizerConfig(name="sgd", learning_rate=0.1))
    before = jax.device_get(state.params)
    bad = _batches(1)[0]
    bad["y"][0, 0] = np.nan
    state, metrics = step(state, bad)
    assert not bool(metrics["grads_finite"])
    after = jax.tree.leaves(jax.device_get(state.params))
    for a, b in zip(after, jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)


def test_grad_norm_matches_optax_and_an_overflowing_norm_counts_as_non_finite():
    _, state, step = _setup(OptimizerConfig(name="sgd", learning_rate=0.1))
    batch = _batches(1)[0]
    params = jax.device_get(state.params)
    grads = jax.grad(lambda p: _reference_loss(_pure(p), batch))(params)
    state, metrics = step(state, batch)
    assert bool(metrics["grads_finite"])
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-5)
    # finite targets whose error is ~1e20: every gradient finite, their squares overflow
    huge = dict(batch, y=np.full_like(batch["y"], 1e20))
    before = jax.device_get(state.params)
    state, metrics = step(state, huge)
    assert not bool(metrics["grads_finite"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)


def test_metrics_report_learning_rate_and_loss_scale():
    opt_cfg = OptimizerConfig(name="sgd", learning_rate=0.1, schedule="linear", warmup_steps=2)
    _, state, step = _setup(opt_cfg, total=4)
    sched = make_schedule(opt_cfg, 4)
    for i, batch in enumerate(_batches(4)):
        state, metrics = step(state, batch)
        np.testing.assert_allclose(metrics["learning_rate"], sched(i), rtol=1e-6)
        assert float(metrics["loss_scale"]) == 1.0
        assert {"loss", "grad_norm", "grads_finite"} <= set(metrics)


def test_dropout_uses_the_step_rng_deterministically():
    policy = get_policy("fp32")
    tx = make_optimizer(OptimizerConfig(name="sgd", learning_rate=0.1), STEPS)

    def run(seed):
        graphdef, state = init_state(
            _model_fn(policy, dropout=0.5), tx, policy, jax.random.PRNGKey(seed)
        )
        step = make_train_step(graphdef, mse_loss, tx, policy)
        losses = []
        for batch in _batches(3):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        evals = make_eval_step(graphdef, mse_loss, policy)
        return losses, float(evals(state, _batches(1)[0])["loss"]), graphdef, state

    a, b = run(0), run(0)
    assert a[0] == b[0] and a[1] == b[1]  # reproducible
    # dropout is on in training (the step's loss differs from the deterministic forward on the
    # same params and batch) and off in eval (the same result twice)
    graphdef, state = init_state(_model_fn(policy, dropout=0.5), tx, policy, jax.random.PRNGKey(0))
    evals = make_eval_step(graphdef, mse_loss, policy)
    batch = _batches(1)[0]
    e1, e2 = float(evals(state, batch)["loss"]), float(evals(state, batch)["loss"])
    assert e1 == e2
    step = make_train_step(graphdef, mse_loss, tx, policy)
    _, metrics = step(state, batch)
    assert float(metrics["loss"]) != e1


def test_batch_shape_and_dtype_errors_are_one_line():
    policy = get_policy("fp32")
    tx = make_optimizer(OptimizerConfig(name="sgd", learning_rate=0.1), STEPS)
    graphdef, state = init_state(_model_fn(policy), tx, policy, jax.random.PRNGKey(0))
    batch = _batches(1)[0]
    step = make_train_step(graphdef, mse_loss, tx, policy, batch_spec=batch_spec_of(batch))
    short = {k: v[:15] for k, v in batch.items()}
    with pytest.raises(ValueError, match=r"\(15, 4\).*built for \(16, 4\).*train.batch_size"):
        step(state, short)
    wrong_dtype = dict(batch, x=batch["x"].astype(np.float64).astype(np.int32))
    with pytest.raises(ValueError, match="int32") as err:
        step(state, wrong_dtype)
    assert "\n" not in str(err.value)
    wide = {"x": np.zeros((16, 5), np.float32), "y": batch["y"]}
    with pytest.raises(ValueError, match=r"model cannot take this batch.*\(16, 5\)") as err:
        check_batch_fits(graphdef, mse_loss, policy, state, batch_spec_of(wide))
    assert "\n" not in str(err.value)


def test_learning_rate_metric_is_the_applied_rate_after_skips():
    """After a skipped overflow step the logged rate follows optax's count, not state.step."""
    opt_cfg = OptimizerConfig(name="sgd", learning_rate=1.0, schedule="linear", warmup_steps=4)
    _, state, step = _setup(opt_cfg, total=8)
    sched = make_schedule(opt_cfg, 8)
    batches = _batches(4)
    bad = dict(batches[1], x=batches[1]["x"].copy())
    bad["x"][0, 0] = np.inf
    rates = []
    for batch in (batches[0], bad, batches[2], batches[3]):
        before = jax.device_get(state.params)
        state, metrics = step(state, batch)
        rates.append(float(metrics["learning_rate"]))
    # updates applied at counts 0, (skip), 1, 2
    np.testing.assert_allclose(rates, [sched(0), sched(1), sched(1), sched(2)], rtol=1e-6)
    # plain sgd: the last update is exactly -lr * grad, so the logged rate is the applied one
    grads = jax.grad(_reference_loss)(_pure(before), batches[3])
    delta = jax.tree.map(lambda a, b: a - b, _pure(jax.device_get(state.params)), _pure(before))
    np.testing.assert_allclose(delta["w1"], -rates[-1] * grads["w1"], rtol=1e-5, atol=1e-7)
