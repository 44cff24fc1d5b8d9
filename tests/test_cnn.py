"""CNN against a numpy float64 forward (convs, norms, residuals); precision, names, jaxnv step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxnv.core import losses
from jaxnv.core.precision import get_policy
from jaxnv.core.state import abstract_model, init_state, split_model
from jaxnv.core.step import make_eval_step, make_train_step
from jaxnv.models.cnn import CNN

EPS, MOMENTUM, GROUPS = 1e-5, 0.9, 2
TINY = dict(features=(4, 6), blocks_per_stage=2, groups=GROUPS)


def _f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _model(seed=0, scale=0.3, **kwargs):
    """A CNN(2, 3, **TINY) with random params (biases, norm scales included) and running stats.

    Built from shapes, so no initialiser compiles (real initialisation is covered by the step
    tests, which build through `init_state`).
    """
    kwargs = {"in_channels": 2, "num_classes": 3, **TINY, **kwargs}
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CNN(**kwargs, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def value(path, s):
        if path[-1].key == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, s.shape), s.dtype)
        std = 1.0 if path[-1].key == "mean" else scale
        return jnp.asarray(std * rng.normal(size=s.shape), s.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(value, nnx.to_pure_dict(state)))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x, rng):
    model = nnx.merge(graphdef, state)
    return model(x, rng), nnx.state(model)


def _call(model, x, rng=None):
    """`model(x, rng)`, jitted (eager calls compile every op: slow); updates the model's state."""
    graphdef, state = nnx.split(model)
    y, state = _forward(graphdef, state, jnp.asarray(x), rng)
    nnx.update(model, state)
    return y


def _np_conv(x, conv):
    """A 'SAME' conv padded as XLA pads (low side total // 2); x (B, S, S, C)."""
    k, stride = conv["kernel"], conv["stride"]
    size, width = x.shape[1], k.shape[0]
    out = -(-size // stride)
    total = max((out - 1) * stride + width - size, 0)
    lo = total // 2
    xp = np.pad(x, ((0, 0), (lo, total - lo), (lo, total - lo), (0, 0)))
    y = np.zeros((x.shape[0], out, out, k.shape[-1]))
    for i in range(width):
        for j in range(width):
            patch = xp[
                :, i : i + (out - 1) * stride + 1 : stride, j : j + (out - 1) * stride + 1 : stride
            ]
            y += patch @ k[i, j]  # (B, out, out, C_out)
    return y + conv.get("bias", 0.0)


def _np_norm(x, p, s, kind, training):
    """Batch/group norm in float64; returns (y, updated running stats or None)."""
    if kind == "none":
        return x, None
    p = p["norm"]
    if kind == "group":
        b, h, w, c = x.shape
        g = x.reshape(b, h, w, GROUPS, c // GROUPS)
        mean, var = g.mean(axis=(1, 2, 4), keepdims=True), g.var(axis=(1, 2, 4), keepdims=True)
        x = ((g - mean) / np.sqrt(var + EPS)).reshape(x.shape)
        return x * p["scale"] + p["bias"], None
    s = s["norm"]
    if training:
        mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
        batch = {"mean": mean, "var": var}
        new = {"norm": {k: MOMENTUM * s[k] + (1 - MOMENTUM) * v for k, v in batch.items()}}
    else:
        mean, var, new = s["mean"], s["var"], None
    return (x - mean) / np.sqrt(var + EPS) * p["scale"] + p["bias"], new


def _np_cnn(p, s, x, kind, training):
    """float64 forward of `CNN(..., **TINY)`; returns logits and the updated running stats."""
    new = {"blocks": {}}

    def norm(x, path):
        get = lambda tree: functools.reduce(lambda t, k: t.get(k, {}), path, tree)  # noqa: E731
        y, stats = _np_norm(x, get(p), get(s), kind, training)
        if stats is not None:
            functools.reduce(lambda t, k: t.setdefault(k, {}), path[:-1], new)[path[-1]] = stats
        return y

    conv = lambda c, stride: {**c, "stride": stride}  # noqa: E731
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    h = relu(norm(_np_conv(x, conv(p["stem"], 1)), ["stem_norm"]))
    strides = [1, 1, 2, 1]  # two stages of two blocks: stride 2 entering the second stage
    for i, stride in enumerate(strides):
        blk = p["blocks"][i]
        y = relu(norm(_np_conv(h, conv(blk["conv1"], stride)), ["blocks", i, "norm1"]))
        y = norm(_np_conv(y, conv(blk["conv2"], 1)), ["blocks", i, "norm2"])
        skip = h
        if "proj" in blk:
            skip = norm(_np_conv(h, conv(blk["proj"], stride)), ["blocks", i, "proj_norm"])
        h = relu(y + skip)
    pooled = h.mean(axis=(1, 2))
    return pooled @ p["head"]["kernel"] + p["head"]["bias"], new


def _images(batch=4, size=7, channels=2, seed=1):
    return np.random.default_rng(seed).normal(size=(batch, size, size, channels)).astype(np.float32)


@pytest.mark.parametrize(("kind", "size"), [("batch", 7), ("batch", 8), ("group", 8), ("none", 7)])
@pytest.mark.parametrize("training", [False, True])
def test_cnn_matches_numpy_float64(kind, size, training):
    model = _model(norm=kind, momentum=MOMENTUM)
    params = _f64(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    stats = _f64(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    x = _images(size=size)
    want, new_stats = _np_cnn(params, stats, x.astype(np.float64), kind, training)
    y = _call(model, x, jax.random.key(0) if training else None)
    assert y.shape == (4, 3) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    got_stats = _f64(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    want_stats = new_stats if training and kind == "batch" else stats
    close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6)
    jax.tree.map(close, got_stats, want_stats)


def test_eager_call_matches_jitted_and_takes_gray_images():
    model = _model(in_channels=1, features=(4,), blocks_per_stage=1)
    x = _images(batch=3, size=6, channels=1)
    np.testing.assert_allclose(model(jnp.asarray(x)), _call(model, x), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(_call(model, x[..., 0]), _call(model, x))  # (B, H, W) works
    with pytest.raises(ValueError, match=r"takes images \(B, H, W, 2\)"):
        _call(_model(), x[..., 0])
    with pytest.raises(ValueError, match="unknown norm"):
        CNN(3, 5, norm="layer", rngs=nnx.Rngs(0))


def test_batchnorm_trains_on_batch_stats_and_evaluates_on_running_ones():
    model = _model()
    x = _images()  # the numpy test's shapes: its compiled forwards are reused
    before = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    y_eval = _call(model, x)
    after_eval = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    jax.tree.map(np.testing.assert_array_equal, after_eval, before)  # eval leaves stats alone
    # eval: each example's logits depend on that example only
    np.testing.assert_allclose(_call(model, x[:1]), y_eval[:1], rtol=1e-5, atol=1e-6)
    y_train = _call(model, x, jax.random.key(0))
    after_train = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    changed = _changed(before, after_train)
    assert all(changed) and len(changed) == 2 * (1 + 4 * 2 + 1)  # mean, var of every norm
    # training: batch statistics couple the examples
    assert not np.allclose(_call(model, x[:2], jax.random.key(0))[:1], y_train[:1], atol=1e-3)


def test_group_norm_has_no_batch_stats_and_no_batch_coupling():
    model = _model(norm="group")
    assert jax.tree.leaves(nnx.state(model, nnx.BatchStat)) == []
    x = _images(size=8)
    for rng in (None, jax.random.key(0)):
        want = _call(model, x, rng)[:1]
        np.testing.assert_allclose(_call(model, x[:1], rng), want, rtol=1e-5, atol=1e-6)


def test_dropout_only_in_training_and_keyed_by_rng():
    model = _model(norm="none", dropout=0.5)
    x = _images()
    np.testing.assert_array_equal(_call(model, x), _call(model, x))
    train = [_call(model, x, jax.random.key(k)) for k in (0, 0, 1)]
    np.testing.assert_array_equal(train[0], train[1])
    assert not np.allclose(train[0], train[2]) and not np.allclose(train[0], _call(model, x))


def _eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                yield from _eqns(inner)


@pytest.mark.parametrize("kind", ["batch", "group"])
def test_bf16_convs_in_bf16_params_and_stats_in_fp32(kind):
    model = _model(norm=kind, policy="bf16")
    leaves = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert leaves and all(leaf.dtype == jnp.float32 for leaf in leaves)
    graphdef, state = nnx.split(model)
    x = jnp.asarray(_images())
    for rng in (None, jax.random.key(0)):
        jaxpr = jax.make_jaxpr(lambda state, x, rng=rng: _forward(graphdef, state, x, rng))
        eqns = list(_eqns(jaxpr(state, x).jaxpr))
        convs = [e for e in eqns if e.primitive.name == "conv_general_dilated"]
        assert len(convs) == 1 + 2 * 4 + 1  # stem, two per block, one projection
        for eqn in convs:
            assert all(v.aval.dtype == jnp.bfloat16 for v in eqn.invars), eqn
        # the norms' reductions (mean, variance) and the global pooling run in float32
        sums = [e for e in eqns if e.primitive.name == "reduce_sum"]
        assert sums and all(e.invars[0].aval.dtype == jnp.float32 for e in sums)
    y = _call(model, x, jax.random.key(0))
    assert y.dtype == jnp.float32
    fp32 = _model(norm=kind)
    np.testing.assert_allclose(y, _call(fp32, x, jax.random.key(0)), rtol=0.1, atol=0.1)
    stats = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
    assert all(s.dtype == jnp.float32 for s in stats) and (kind == "group" or stats)


def test_logical_names_on_every_param_and_none_repeated():
    model = _model(in_channels=3, features=(8, 16), norm="batch")
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda s: isinstance(s, P))
    assert len(flat) == len(jax.tree.leaves(params))
    for path, spec in flat:
        names = [a for a in spec if a is not None]
        shape = np.shape(functools.reduce(lambda t, k: t[k.key], path, params))
        assert len(names) == len(set(names)) and len(spec) == len(shape), (path, spec)
        if path[-1].key == "kernel" and len(shape) == 4:
            assert spec == P(None, None, "conv_in", "conv_out")
        elif path[0].key != "head":  # norm scales and biases
            assert spec == P("conv_out")
    assert specs["head"] == {"kernel": P("conv_out", None), "bias": P(None)}


def test_projection_only_where_channels_or_stride_change():
    model = _model(in_channels=3, features=(8, 8, 16), blocks_per_stage=2, norm="none")
    has_proj = [block.proj is not None for block in model.blocks]
    # stage 0 keeps 8 channels at stride 1; stages 1 and 2 enter with stride 2 (and 8 -> 16)
    assert has_proj == [False, False, True, False, True, False]
    assert model.blocks[2].proj.kernel[...].shape == (1, 1, 8, 8)
    assert model.blocks[4].proj.kernel[...].shape == (1, 1, 8, 16)


def _loss_fn(model, batch, rng):
    logits = model(batch["x"], rng)  # (B, classes)
    loss = losses.softmax_cross_entropy(logits, batch["y"])
    return loss, {"accuracy": losses.accuracy(logits, batch["y"])}


def _bars(n, rng, size=8):
    """Class 0: a horizontal bar, class 1: a vertical one, at random positions, with noise."""
    y = rng.integers(0, 2, n)
    pos = rng.integers(0, size, n)
    x = 0.5 * rng.normal(size=(n, size, size))
    x[y == 0, pos[y == 0], :] += 1.0
    x[y == 1, :, pos[y == 1]] += 1.0
    return {"x": x.astype(np.float32), "y": y.astype(np.int32)}


def _bars_model(policy):
    return lambda rngs: CNN(1, 2, features=(8,), policy=policy, rngs=rngs)


@pytest.fixture(scope="module")
def bars():
    """One initial TrainState and fp32 steps, shared: compiling the init dominates these tests."""
    policy, tx = get_policy("fp32"), optax.adam(1e-2)
    graphdef, state = init_state(_bars_model(policy), tx, policy, jax.random.key(0))
    train_step = make_train_step(graphdef, _loss_fn, tx, policy, donate=False)
    eval_step = make_eval_step(graphdef, _loss_fn, policy)
    return tx, state, train_step, eval_step


def _changed(old, new):
    return [bool(np.any(a != b)) for a, b in zip(*map(jax.tree.leaves, (old, new)), strict=True)]


def test_jaxnv_step_updates_batch_stats_and_params(bars):
    _, state, train_step, eval_step = bars
    batch = _bars(32, np.random.default_rng(0))
    new = state
    for _ in range(3):
        new, metrics = train_step(new, batch)
    assert bool(metrics["grads_finite"])
    for old_tree, new_tree in [(state.model_state, new.model_state), (state.params, new.params)]:
        assert jax.tree.leaves(old_tree) and all(_changed(old_tree, new_tree))
    test = _bars(512, np.random.default_rng(1))
    jax.tree.map(np.testing.assert_array_equal, eval_step(new, test), eval_step(new, test))


def test_jaxnv_bf16_step_keeps_params_and_batch_stats_fp32(bars):
    tx, state, _, _ = bars  # the fp32 state under a bf16 graph: the state itself holds no policy
    policy = get_policy("bf16")
    graphdef = split_model(abstract_model(_bars_model(policy)))[0]
    train_step = make_train_step(graphdef, _loss_fn, tx, policy, donate=False)
    # traced, not compiled: the step's cond needs the new model state's dtypes to match the old
    new, metrics = jax.eval_shape(train_step.fn, state, _bars(32, np.random.default_rng(0)))
    assert jax.tree.map(lambda s: (s.shape, s.dtype), new) == jax.tree.map(
        lambda a: (a.shape, a.dtype), state
    )
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((new.params, new.model_state)))


def test_cnn_learns_horizontal_vs_vertical_bars(bars):
    _, state, train_step, eval_step = bars
    rng = np.random.default_rng(0)
    for _ in range(60):
        state, _ = train_step(state, _bars(32, rng))
    assert float(eval_step(state, _bars(512, np.random.default_rng(1)))["accuracy"]) >= 0.95
