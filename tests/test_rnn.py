"""LSTM against a numpy float64 loop over time; embedding path, precision, names, a memory task."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxnv.core.losses import softmax_ce_loss
from jaxnv.core.precision import get_policy
from jaxnv.core.state import init_state
from jaxnv.core.step import make_eval_step, make_train_step
from jaxnv.models.rnn import LSTM, lstm_cell

B, T, F, H, OUT = 2, 5, 3, 4, 6


def _params(model) -> dict:
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return jax.tree.map(lambda p: np.asarray(p, np.float64), pure)


def _model(seed=0, scale=0.5, **kwargs):
    """An LSTM(F, H, OUT, **kwargs) with random params (biases included), built from shapes.

    No initialiser compiles this way; the real initialisation has its own test.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LSTM(F, H, OUT, **kwargs, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    pure = jax.tree.map(
        lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), nnx.to_pure_dict(state)
    )
    return nnx.merge(graphdef, pure)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def _call(model, x):
    """`model(x)`, jitted: an eager call compiles every op on its own, which is slow."""
    return _forward(*nnx.split(model), jnp.asarray(x))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _np_cell(p, h, c, x):
    """One float64 LSTM step; gates stacked i, f, g, o."""
    z = x @ p["w_in"] + h @ p["w_hh"] + p["bias"]  # (B, 4H)
    i, f, g, o = np.split(z, 4, axis=-1)
    c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
    return _sigmoid(o) * np.tanh(c), c


def _np_lstm(params, x, head):
    """float64 reference: x (B, T, F) -> (B, out) or (B, T, out), plain loops over time."""
    seq = np.asarray(x, np.float64)
    for i in range(len(params["layers"])):
        p = params["layers"][i]
        hidden = p["w_hh"].shape[0]
        h = c = np.zeros((seq.shape[0], hidden))
        outs = []
        for t in range(seq.shape[1]):
            h, c = _np_cell(p, h, c, seq[:, t])
            outs.append(h)
        seq = np.stack(outs, axis=1)  # (B, T, H)
    y = seq[:, -1] if head == "last" else seq
    return y @ params["head"]["kernel"] + params["head"]["bias"]


def _x(seed=1):
    return np.random.default_rng(seed).normal(size=(B, T, F)).astype(np.float32)


@pytest.mark.parametrize("head", ["last", "sequence"])
def test_lstm_matches_numpy_float64(head):
    model = _model(num_layers=2, head=head)
    x = _x()
    y = _call(model, x)
    assert y.shape == ((B, OUT) if head == "last" else (B, T, OUT)) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, _np_lstm(_params(model), x, head), rtol=1e-5, atol=1e-6)


def test_lstm_cell_is_one_step_of_the_reference():
    model = _model()
    params = nnx.to_pure_dict(nnx.state(model.layers[0], nnx.Param))
    rng = np.random.default_rng(2)
    h, c, x = (rng.normal(size=s).astype(np.float32) for s in [(B, H), (B, H), (B, F)])
    (h1, c1), out = jax.jit(lstm_cell)(params, (jnp.asarray(h), jnp.asarray(c)), jnp.asarray(x))
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h_ref, c_ref = _np_cell(p64, h.astype(np.float64), c.astype(np.float64), x)
    np.testing.assert_allclose(h1, h_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c1, c_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out, h1)


@pytest.mark.parametrize("head", ["last", "sequence"])
def test_token_inputs_go_through_the_embedding(head):
    vocab = 7
    model = _model(num_layers=2, vocab_size=vocab, head=head)
    ids = np.random.default_rng(3).integers(0, vocab, size=(B, T)).astype(np.int32)
    params = _params(model)
    features = params["embed"]["embedding"][ids]  # (B, T, F)
    y = _call(model, ids)
    np.testing.assert_allclose(y, _np_lstm(params, features, head), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="integer token ids"):
        model(jnp.asarray(features, jnp.float32))


def test_shape_errors_name_the_expected_input():
    model = _model()
    with pytest.raises(ValueError, match=r"takes \(B, T, 3\)"):
        model(jnp.ones((B, T, F + 1)))
    with pytest.raises(ValueError, match="unknown LSTM head"):
        LSTM(F, H, OUT, head="mean", rngs=nnx.Rngs(0))


def _eqns(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs nested in it (scan bodies, pjit, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def test_bf16_matmuls_in_bf16_cell_state_in_fp32():
    model = _model(num_layers=2, head="sequence", policy="bf16")
    leaves = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert leaves and all(leaf.dtype == jnp.float32 for leaf in leaves)  # fp32 master params
    x = jnp.asarray(_x())
    y = _call(model, x)
    assert y.dtype == jnp.float32  # the bf16 preset's output dtype
    jaxpr = jax.make_jaxpr(model)(x).jaxpr
    dots = [e for e in _eqns(jaxpr) if e.primitive.name == "dot_general"]
    assert len(dots) == 2 * 2 + 1  # per layer input and recurrent projections, and the head
    for eqn in dots:
        assert all(v.aval.dtype == jnp.bfloat16 for v in eqn.invars), eqn
    scans = [e for e in _eqns(jaxpr) if e.primitive.name == "scan"]
    assert len(scans) == 2
    for eqn in scans:
        carry = [v.aval for v in eqn.outvars[: eqn.params["num_carry"]]]
        assert [(a.shape, a.dtype) for a in carry] == [
            ((B, H), jnp.bfloat16),
            ((B, H), jnp.float32),
        ]
    fp32 = _model(num_layers=2, head="sequence")  # the same params
    np.testing.assert_allclose(y, _call(fp32, x), rtol=0.05, atol=0.05)


def test_gradients_are_finite_and_reach_every_param():
    model = _model(num_layers=2, vocab_size=9)
    graphdef, params = nnx.split(model)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 9, size=(B, T)), jnp.int32)

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params)(ids) ** 2)

    grads = jax.tree.leaves(nnx.to_pure_dict(jax.jit(jax.grad(loss))(params)))
    assert len(grads) == 1 + 3 * 2 + 2
    for g in grads:
        assert np.all(np.isfinite(g)) and np.any(g != 0)


def test_logical_names_on_every_param_and_none_repeated():
    model = _model(num_layers=2, vocab_size=9)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    for i in range(2):
        assert specs["layers"][i] == {
            "w_in": P("embed", "mlp"),
            "w_hh": P("embed", "mlp"),
            "bias": P("mlp"),
        }
    assert specs["embed"]["embedding"] == P("vocab", "embed")
    assert specs["head"] == {"kernel": P("embed", None), "bias": P(None)}
    params = _params(model)
    flat = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda s: isinstance(s, P))
    assert len(flat) == len(jax.tree.leaves(params)) == 1 + 3 * 2 + 2
    for path, spec in flat:
        names = [a for a in spec if a is not None]
        shape = np.shape(functools.reduce(lambda tree, k: tree[k.key], path, params))
        assert len(names) == len(set(names)) and len(spec) == len(shape), (path, spec, shape)


SEQ = 16


def _recall_data(n, rng):
    """Label = sign of the first of SEQ random +-1 inputs, to be read at the last step."""
    x = rng.choice([-1.0, 1.0], size=(n, SEQ, 1)).astype(np.float32)
    return {"x": x, "y": (x[:, 0, 0] > 0).astype(np.int32)}


@pytest.fixture(scope="module")
def recall():
    """A real `init_state` of a tiny LSTM and its steps; shared, as the init compile is costly."""
    policy, tx = get_policy("fp32"), optax.adam(1e-2)
    graphdef, state = init_state(
        lambda rngs: LSTM(1, 16, 2, policy=policy, rngs=rngs), tx, policy, jax.random.key(0)
    )
    train_step = make_train_step(graphdef, softmax_ce_loss, tx, policy)
    return state, train_step, make_eval_step(graphdef, softmax_ce_loss, policy)


def test_init_forget_bias_one_other_biases_zero_recurrence_orthogonal(recall):
    state, _, _ = recall
    hidden = 16
    layer = state.params["layers"][0]
    bias = np.asarray(layer["bias"])
    np.testing.assert_array_equal(bias[hidden : 2 * hidden], 1.0)
    np.testing.assert_array_equal(np.delete(bias, np.s_[hidden : 2 * hidden]), 0.0)
    assert layer["w_in"].shape == (1, 4 * hidden) and layer["w_hh"].shape == (hidden, 4 * hidden)
    w_hh = np.asarray(layer["w_hh"], np.float64)
    np.testing.assert_allclose(w_hh @ w_hh.T, np.eye(hidden), atol=1e-5)  # orthonormal rows


def test_lstm_learns_to_recall_the_first_element(recall):
    """The label is independent of every later input, so a memoryless model (one that sees only
    the last step) is at chance (50%); the LSTM must carry the bit through SEQ - 1 steps."""
    state, train_step, eval_step = recall
    rng = np.random.default_rng(0)
    for _ in range(200):  # 16 steps of memory: reliably learnt by ~100 steps over 4 seeds
        state, _ = train_step(state, _recall_data(64, rng))
    test = _recall_data(512, rng)
    last_only = np.mean((test["x"][:, -1, 0] > 0) == test["y"])  # the best memoryless guess
    assert abs(last_only - 0.5) < 0.1
    assert float(eval_step(state, test)["accuracy"]) >= 0.95
