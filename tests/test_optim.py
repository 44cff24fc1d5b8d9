"""The optimizer factory against hand-built optax chains and numpy float64 update rules."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxnv.core.optim import OptimizerConfig, decay_mask_fn, make_optimizer, make_schedule

RTOL = 1e-6
STEPS = 5
PEAK, END, WARMUP, DECAY = 0.1, 0.01, 2, 8
MASK = {"b": False, "w": True}  # the expected decay mask, written by hand


def _params():
    rng = np.random.default_rng(0)
    return {
        "w": rng.normal(size=(4, 3)).astype(np.float32),
        "b": rng.normal(size=(3,)).astype(np.float32),
    }


def _grads(num=STEPS, scale=1.0, seed=1):
    rng = np.random.default_rng(seed)
    return [
        {
            "w": (scale * rng.normal(size=(4, 3))).astype(np.float32),
            "b": (scale * rng.normal(size=(3,))).astype(np.float32),
        }
        for _ in range(num)
    ]


def _run(tx, params, grads):
    """Apply ``tx`` to ``params`` for each gradient in ``grads``; return the final params."""
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads:
        updates, state = update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, updates)
    return params


def _assert_trees_close(got, expected, rtol=RTOL, atol=0.0):
    for key in expected:
        np.testing.assert_allclose(
            np.asarray(got[key], np.float64), expected[key], rtol=rtol, atol=atol, err_msg=key
        )


def _assert_close_to_float64(got, expected):
    """Relative error <= RTOL, measured against each param's scale (float32 rounds near-zeros)."""
    for key in expected:
        scale = np.abs(expected[key]).max()
        _assert_trees_close({key: got[key]}, {key: expected[key]}, atol=RTOL * scale)


def _f32(x):
    """A hyperparameter as the float32 value the optimizer actually uses (0.999 is not exact)."""
    return float(np.float32(x))


def _cfg(**kw):
    base = dict(
        learning_rate=PEAK,
        schedule="cosine",
        warmup_steps=WARMUP,
        decay_steps=DECAY,
        end_learning_rate=END,
        clip_norm=2.0,
    )
    return OptimizerConfig(**{**base, **kw})


# ---- numpy float64 references ---------------------------------------------------------------


def _lr64(step):
    """Warmup + cosine, by hand: the schedule `_cfg` describes."""
    if step < WARMUP:
        return PEAK * step / WARMUP
    t, length = min(step - WARMUP, DECAY - WARMUP), DECAY - WARMUP
    return END + (PEAK - END) * 0.5 * (1 + np.cos(np.pi * t / length))


def _clip64(g, max_norm):
    norm = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in g.values()))
    factor = 1.0 if norm < max_norm else max_norm / norm
    return {k: np.asarray(x, np.float64) * factor for k, x in g.items()}


def _sgd64(params, grads, *, momentum, nesterov, wd, clip):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    trace = {k: np.zeros_like(v) for k, v in p.items()}
    for step, g in enumerate(grads):
        g = _clip64(g, clip)
        for k in p:
            d = g[k] + wd * MASK[k] * p[k]  # decay before sgd: it goes through the momentum
            if momentum:
                trace[k] = d + momentum * trace[k]
                d = d + momentum * trace[k] if nesterov else trace[k]
            p[k] = p[k] - _lr64(step) * d
    return p


def _adamw64(params, grads, *, b1, b2, eps, wd, clip):
    b1, b2, eps = _f32(b1), _f32(b2), _f32(eps)  # `1 - b2 ** t` is sensitive to b2's rounding
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    nu = {k: np.zeros_like(v) for k, v in p.items()}
    for step, g in enumerate(grads):
        g = _clip64(g, clip)
        for k in p:
            mu[k] = b1 * mu[k] + (1 - b1) * g[k]
            nu[k] = b2 * nu[k] + (1 - b2) * g[k] ** 2
            mu_hat, nu_hat = mu[k] / (1 - b1 ** (step + 1)), nu[k] / (1 - b2 ** (step + 1))
            u = mu_hat / (np.sqrt(nu_hat) + eps) + wd * MASK[k] * p[k]
            p[k] = p[k] - _lr64(step) * u
    return p


# ---- the optimizers ---------------------------------------------------------------------------


def _reference_schedule():
    return optax.warmup_cosine_decay_schedule(0.0, PEAK, WARMUP, DECAY, END)


SGD_CASES = {
    "sgd": dict(momentum=0.0, nesterov=False),
    "sgd_momentum": dict(momentum=0.9, nesterov=False),
    "sgd_nesterov": dict(momentum=0.9, nesterov=True),
}


@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd_matches_optax_chain_and_numpy(case):
    kw, wd = SGD_CASES[case], 0.05
    tx = make_optimizer(_cfg(name="sgd", weight_decay=wd, **kw), total_steps=100)
    got = _run(tx, _params(), _grads())
    reference = optax.chain(
        optax.clip_by_global_norm(2.0),
        optax.add_decayed_weights(wd, MASK),
        optax.sgd(_reference_schedule(), momentum=kw["momentum"] or None, nesterov=kw["nesterov"]),
    )
    _assert_trees_close(got, _run(reference, _params(), _grads()))
    _assert_close_to_float64(got, _sgd64(_params(), _grads(), wd=wd, clip=2.0, **kw))


def test_adamw_matches_optax_chain_and_numpy():
    hp = dict(b1=0.8, b2=0.95, eps=1e-6)
    tx = make_optimizer(_cfg(name="adamw", weight_decay=0.1, **hp), total_steps=100)
    got = _run(tx, _params(), _grads())
    reference = optax.chain(
        optax.clip_by_global_norm(2.0),
        optax.adamw(_reference_schedule(), weight_decay=0.1, mask=MASK, **hp),
    )
    _assert_trees_close(got, _run(reference, _params(), _grads()))
    _assert_close_to_float64(got, _adamw64(_params(), _grads(), wd=0.1, clip=2.0, **hp))


def test_adam_matches_optax_and_with_weight_decay_is_adamw():
    tx = make_optimizer(_cfg(name="adam"), total_steps=100)
    reference = optax.chain(optax.clip_by_global_norm(2.0), optax.adam(_reference_schedule()))
    _assert_trees_close(_run(tx, _params(), _grads()), _run(reference, _params(), _grads()))
    # b2=0.95: with 0.999, float32 `1 - b2 ** t` loses ~1e-5 relative in early steps (optax too)
    adam_wd = make_optimizer(_cfg(name="adam", b2=0.95, weight_decay=0.1), total_steps=100)
    expected = _adamw64(_params(), _grads(), b1=0.9, b2=0.95, eps=1e-8, wd=0.1, clip=2.0)
    _assert_close_to_float64(_run(adam_wd, _params(), _grads()), expected)


def test_lion_matches_optax_chain():
    tx = make_optimizer(_cfg(name="lion", b2=0.99, weight_decay=0.1), total_steps=100)
    reference = optax.chain(
        optax.clip_by_global_norm(2.0),
        optax.lion(_reference_schedule(), b1=0.9, b2=0.99, weight_decay=0.1, mask=MASK),
    )
    got = _run(tx, _params(), _grads())
    _assert_trees_close(got, _run(reference, _params(), _grads()))
    assert not np.allclose(got["w"], _params()["w"])


def test_adafactor_matches_optax_chain():
    tx = make_optimizer(_cfg(name="adafactor", weight_decay=0.01), total_steps=100)
    reference = optax.chain(
        optax.clip_by_global_norm(2.0),
        optax.adafactor(_reference_schedule(), weight_decay_rate=0.01, weight_decay_mask=MASK),
    )
    got = _run(tx, _params(), _grads())
    _assert_trees_close(got, _run(reference, _params(), _grads()))
    assert not np.allclose(got["w"], _params()["w"])


def test_state_is_named():
    params = jax.tree.map(jnp.asarray, _params())
    assert list(make_optimizer(_cfg(name="adamw"), 100).init(params)) == ["clip", "optimizer"]
    sgd = make_optimizer(_cfg(name="sgd", weight_decay=0.1, clip_norm=0.0), 100)
    assert list(sgd.init(params)) == ["decay", "optimizer"]
    accumulated = make_optimizer(_cfg(accumulate_steps=2), 100).init(params)
    assert list(accumulated.inner_opt_state) == ["clip", "optimizer"]


# ---- schedules --------------------------------------------------------------------------------


def _schedule_values(cfg, steps, total_steps=0):
    fn = make_schedule(cfg, total_steps)
    return np.array([float(fn(s)) for s in steps])


def test_cosine_schedule_matches_formula():
    peak, end, warmup, total = 3e-3, 1e-4, 10, 110
    cfg = OptimizerConfig(
        learning_rate=peak, schedule="cosine", warmup_steps=warmup, end_learning_rate=end
    )
    steps = [0, 5, warmup, 60, 85, total, total + 50]
    length = total - warmup

    def cosine(s):
        t = min(s - warmup, length)
        return end + (peak - end) * 0.5 * (1 + np.cos(np.pi * t / length))

    expected = [0.0, peak / 2, peak, (peak + end) / 2, cosine(85), end, end]
    np.testing.assert_allclose(_schedule_values(cfg, steps, total), expected, rtol=RTOL, atol=1e-12)
    # decay_steps wins over total_steps
    explicit = dataclasses.replace(cfg, decay_steps=total)
    np.testing.assert_allclose(
        _schedule_values(explicit, steps, 999), expected, rtol=RTOL, atol=1e-12
    )


def test_linear_schedule_matches_formula():
    peak, end = 1e-2, 1e-3
    cfg = OptimizerConfig(
        learning_rate=peak, schedule="linear", warmup_steps=4, decay_steps=24, end_learning_rate=end
    )
    expected = [0.0, peak / 4, peak, (peak + end) / 2, end, end]
    got = _schedule_values(cfg, [0, 1, 4, 14, 24, 40])
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=1e-12)


def test_constant_schedule_with_and_without_warmup():
    np.testing.assert_allclose(
        _schedule_values(OptimizerConfig(learning_rate=0.5), [0, 7, 1000], 100), [0.5] * 3
    )
    cfg = OptimizerConfig(learning_rate=0.5, warmup_steps=4)
    np.testing.assert_allclose(
        _schedule_values(cfg, [0, 2, 4, 50], 100), [0.0, 0.25, 0.5, 0.5], rtol=RTOL
    )


# ---- clipping, decay masks, accumulation ------------------------------------------------------


def test_clip_bounds_global_norm():
    cfg = OptimizerConfig(name="sgd", learning_rate=1.0, clip_norm=0.5)
    tx = make_optimizer(cfg, 10)
    params = jax.tree.map(jnp.asarray, _params())
    big = jax.tree.map(jnp.asarray, _grads(1, scale=10.0)[0])
    updates, _ = tx.update(big, tx.init(params), params)
    norm = float(optax.tree.norm(updates))
    assert norm <= 0.5 * (1 + 1e-6) and norm == pytest.approx(0.5, rel=1e-6)
    # direction kept: updates are -grads scaled down
    scale = 0.5 / float(optax.tree.norm(big))
    np.testing.assert_allclose(np.asarray(updates["w"]), -scale * np.asarray(big["w"]), rtol=1e-5)
    small = jax.tree.map(lambda g: g * 1e-3, big)
    updates, _ = tx.update(small, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -np.asarray(small["w"]), rtol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "lion", "sgd", "adafactor", "adam"])
def test_decay_mask_auto_skips_vectors(name):
    cfg = OptimizerConfig(name=name, learning_rate=0.1, weight_decay=0.1)
    params = _params()
    zero_grads = [jax.tree.map(np.zeros_like, params)] * 3
    got = _run(make_optimizer(cfg, 10), params, zero_grads)
    np.testing.assert_array_equal(np.asarray(got["b"]), params["b"])  # 1-D: untouched, exactly
    assert np.all(np.abs(np.asarray(got["w"])) < np.abs(params["w"]))  # 2-D: shrinks
    # lr-scaled decay except adafactor, whose decay rate is not multiplied by the learning rate
    factor = (1 - 0.1) ** 3 if name == "adafactor" else (1 - 0.1 * 0.1) ** 3
    np.testing.assert_allclose(np.asarray(got["w"]), params["w"] * factor, rtol=1e-5)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_decay_mask_all_and_none(name):
    params = _params()
    zero_grads = [jax.tree.map(np.zeros_like, params)] * 2
    cfg = OptimizerConfig(name=name, learning_rate=0.1, weight_decay=0.1, decay_mask="all")
    got = _run(make_optimizer(cfg, 10), params, zero_grads)
    np.testing.assert_allclose(np.asarray(got["b"]), params["b"] * 0.99**2, rtol=1e-6)
    got = _run(make_optimizer(dataclasses.replace(cfg, decay_mask="none"), 10), params, zero_grads)
    np.testing.assert_array_equal(np.asarray(got["w"]), params["w"])


def test_accumulate_equals_one_update_with_mean_gradient():
    k = 3
    cfg = _cfg(name="adamw", weight_decay=0.1, clip_norm=0.5)
    tx = make_optimizer(dataclasses.replace(cfg, accumulate_steps=k), total_steps=100)
    micro = _grads(2 * k)
    params = jax.tree.map(jnp.asarray, _params())
    state, update = tx.init(params), jax.jit(tx.update)
    for i, g in enumerate(micro):
        updates, state = update(jax.tree.map(jnp.asarray, g), state, params)
        if (i + 1) % k:
            for u in jax.tree.leaves(updates):
                np.testing.assert_array_equal(np.asarray(u), 0.0)
        params = optax.apply_updates(params, updates)
    means = [
        jax.tree.map(lambda *g: np.mean(np.stack(g), axis=0), *micro[j : j + k])
        for j in range(0, 2 * k, k)
    ]
    expected = _run(make_optimizer(cfg, total_steps=100), _params(), means)
    _assert_trees_close(params, {key: np.asarray(v) for key, v in expected.items()}, atol=1e-7)


# ---- flax NNX params --------------------------------------------------------------------------


def test_nnx_state_params():
    params = nnx.state(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), nnx.Param)
    mask = nnx.to_pure_dict(decay_mask_fn(params))
    assert mask == {"kernel": True, "bias": False}

    bias = jnp.full((2,), 0.5)  # nnx initializes the bias to zero: make it visible to decay
    params = jax.tree.map(lambda x: x if x.ndim == 2 else bias, params)
    tx = make_optimizer(OptimizerConfig(name="adamw", learning_rate=0.1, weight_decay=0.1), 10)
    state = tx.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, state = jax.jit(tx.update)(zero, state, params)
    new = nnx.to_pure_dict(optax.apply_updates(params, updates))
    old = nnx.to_pure_dict(params)
    np.testing.assert_array_equal(np.asarray(new["bias"]), np.asarray(old["bias"]))
    np.testing.assert_allclose(
        np.asarray(new["kernel"]), np.asarray(old["kernel"]) * 0.99, rtol=1e-6
    )


# ---- config errors ----------------------------------------------------------------------------

CONFIG_ERRORS = {
    "name": (dict(name="adamm"), ["unknown optimizer 'adamm'", "adamw, adam, sgd", "'adam'?"]),
    "schedule": (dict(schedule="cosin"), ["unknown schedule 'cosin'", "did you mean 'cosine'"]),
    "decay_mask": (dict(decay_mask="autoo"), ["did you mean 'auto'"]),
    "negative_lr": (dict(learning_rate=-1.0), ["learning_rate=-1.0", ">= 0"]),
    "warmup_fraction": (dict(warmup_steps=1.5), ["warmup_steps=1.5", "fraction in (0, 1)"]),
    "warmup_negative": (dict(warmup_steps=-0.5), ["warmup_steps=-0.5", "negative"]),
    "nesterov": (dict(name="sgd", nesterov=True), ["nesterov needs momentum"]),
    "momentum": (dict(momentum=0.9), ["optimizer.momentum applies only to sgd"]),
    "accumulate": (dict(accumulate_steps=0), ["accumulate_steps=0", ">= 1"]),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_errors_are_one_line_and_name_the_fix(case):
    overrides, fragments = CONFIG_ERRORS[case]
    with pytest.raises(ValueError) as excinfo:
        make_optimizer(OptimizerConfig(**overrides), total_steps=100)
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_decaying_schedule_needs_a_length():
    with pytest.raises(ValueError, match="decay_steps"):
        make_schedule(OptimizerConfig(schedule="linear"), total_steps=0)
    assert float(make_schedule(OptimizerConfig(), total_steps=0)(10)) == pytest.approx(1e-3)


# ---- warmup: clamped when the run is shorter, or a fraction of the steps ----------------------


def _values(fn, steps):
    return np.array([float(fn(s)) for s in steps])


def _warning_lines(capsys):
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize(("total", "clamped"), [(20, 2), (50, 5), (35, 3), (7, 0)])
def test_warmup_longer_than_the_run_is_clamped_to_a_tenth_with_one_line(capsys, total, clamped):
    cfg = OptimizerConfig(
        learning_rate=3e-3, schedule="cosine", warmup_steps=50, end_learning_rate=1e-4
    )
    fn = make_schedule(cfg, total)
    # by hand: optax's own warmup + cosine with `clamped` = floor(10 % of total) warmup steps
    if clamped:
        want = optax.warmup_cosine_decay_schedule(0.0, 3e-3, clamped, total, 1e-4)
    else:
        want = optax.cosine_decay_schedule(3e-3, total, alpha=1e-4 / 3e-3)
    steps = list(range(total + 5))
    np.testing.assert_allclose(_values(fn, steps), _values(want, steps), rtol=1e-6, atol=1e-12)
    lines = _warning_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith("jaxnv: warning: optimizer.warmup_steps=50 ")
    assert f"{total} steps" in lines[0] and f"over {clamped} " in lines[0]


def test_make_optimizer_clamps_the_same_warmup_silently(capsys):
    """`train` builds both; the line comes once, from make_schedule."""
    cfg = OptimizerConfig(name="sgd", learning_rate=1.0, schedule="linear", warmup_steps=30)
    tx = make_optimizer(cfg, 20)
    assert _warning_lines(capsys) == []
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    lrs = []
    for _ in range(6):  # sgd without momentum: the update is -lr * grad, grad = 1
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        lrs.append(-float(updates["w"]))
    # warmup of 2 (10 % of 20) from 0 to 1, then linear to 0 at step 20: 1 - (s - 2) / 18
    want = [0.0, 0.5, 1.0, 1 - 1 / 18, 1 - 2 / 18, 1 - 3 / 18]
    np.testing.assert_allclose(lrs, want, rtol=1e-6)


@pytest.mark.parametrize(
    ("cfg", "total"),
    [
        (dict(schedule="cosine", warmup_steps=50), 50),  # equal: no step left to decay
        (dict(schedule="constant", warmup_steps=101), 100),
        (dict(schedule="linear", warmup_steps=40, decay_steps=30), 1000),  # decay_steps counts
    ],
)
def test_every_warmup_that_does_not_fit_warns(capsys, cfg, total):
    make_schedule(OptimizerConfig(**cfg), total)
    assert len(_warning_lines(capsys)) == 1


def test_warmup_that_fits_is_kept_without_a_word(capsys):
    make_schedule(OptimizerConfig(schedule="cosine", warmup_steps=19), 20)
    make_schedule(OptimizerConfig(warmup_steps=20), 20)  # constant: a ramp over the whole run
    make_schedule(OptimizerConfig(warmup_steps=500), 0)  # constant, no length: nothing to fit
    assert _warning_lines(capsys) == []


@pytest.mark.parametrize(("fraction", "total", "warmup"), [(0.05, 200, 10), (0.1, 35, 3)])
def test_fractional_warmup_is_that_share_of_the_steps(capsys, fraction, total, warmup):
    cfg = OptimizerConfig(
        learning_rate=0.2, schedule="cosine", warmup_steps=fraction, end_learning_rate=0.01
    )
    want = optax.warmup_cosine_decay_schedule(0.0, 0.2, warmup, total, 0.01)
    steps = list(range(total + 3))
    got = _values(make_schedule(cfg, total), steps)
    np.testing.assert_allclose(got, _values(want, steps), rtol=1e-6, atol=1e-12)
    assert _warning_lines(capsys) == []


def test_fractional_warmup_of_decay_steps_and_of_a_constant_schedule():
    explicit = OptimizerConfig(
        learning_rate=1.0, schedule="linear", warmup_steps=0.25, decay_steps=8
    )
    np.testing.assert_allclose(
        _values(make_schedule(explicit, 1000), [0, 1, 2, 5, 8]), [0.0, 0.5, 1.0, 0.5, 0.0]
    )
    const = OptimizerConfig(learning_rate=1.0, warmup_steps=0.5)
    np.testing.assert_allclose(
        _values(make_schedule(const, 8), [0, 2, 4, 6]), [0.0, 0.5, 1.0, 1.0], rtol=1e-6
    )
    with pytest.raises(ValueError, match="warmup_steps=0.5 is a fraction") as err:
        make_schedule(const, 0)  # no length to take a share of
    assert "\n" not in str(err.value)


def test_fractional_warmup_from_the_command_line_round_trips():
    from jaxnv.config import Config, apply_overrides, from_dict, to_dict

    cfg = apply_overrides(Config(), ["optimizer.warmup_steps=0.05"])
    assert cfg.optimizer.warmup_steps == 0.05
    steps = apply_overrides(Config(), ["optimizer.warmup_steps=50"]).optimizer.warmup_steps
    assert steps == 50 and type(steps) is int  # a whole number stays a count of steps
    assert from_dict(to_dict(cfg)) == cfg


def test_stacked_layers_decay_by_one_layers_shape():
    """The transformer stores its blocks stacked, (L, ...) per param: a norm scale is (L, D) but
    a vector per layer, so it must not decay; a kernel (L, D, F) decays as the 2-D matrix it is."""
    from jaxnv.core.state import stacked_paths
    from jaxnv.models.transformer import Transformer

    model = Transformer(32, num_layers=3, num_heads=2, embed_dim=16, max_seq_len=8,
                        rngs=nnx.Rngs(0))  # fmt: skip
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    stacked = stacked_paths(model)
    assert "blocks/attn_norm/scale" in stacked and "embedding" not in stacked
    mask = decay_mask_fn(params, stacked=stacked)
    assert mask["blocks"]["attn_norm"]["scale"] is False and mask["final_norm"]["scale"] is False
    assert all(jax.tree.leaves(mask["blocks"]["attn"])) and mask["embedding"] is True

    cfg = OptimizerConfig(name="adamw", learning_rate=0.1, weight_decay=0.1)
    zero = [jax.tree.map(np.zeros_like, params)] * 2
    got = _run(make_optimizer(cfg, 10, stacked=stacked), params, zero)
    np.testing.assert_array_equal(
        np.asarray(got["blocks"]["mlp_norm"]["scale"]), params["blocks"]["mlp_norm"]["scale"]
    )
    for path, x in jax.tree_util.tree_leaves_with_path(params["blocks"]):
        want = x * (0.99**2 if x[0].ndim >= 2 else 1.0)  # one layer's shape decides
        leaf = got["blocks"]
        for k in path:
            leaf = leaf[k.key]
        np.testing.assert_allclose(np.asarray(leaf), want, rtol=1e-6, err_msg=str(path))
