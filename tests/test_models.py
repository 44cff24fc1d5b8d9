"""Linear and MLP against hand-written numpy float64 forwards; dtypes, logical axes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxnv.config import ModelConfig
from jaxnv.core.precision import Policy, get_policy
from jaxnv.models import ACTIVATIONS, MLP, Linear, build_model, get_activation

FP32 = get_policy("fp32")


def _params(model) -> dict:
    """The model's params as a nested dict of numpy float64 arrays."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return jax.tree.map(lambda p: np.asarray(p, np.float64), pure)


def _randomize(model, seed=0, scale=0.5):
    """Give every param (biases included, which init to zero) random values in its own dtype."""
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    rng = np.random.default_rng(seed)
    pure = jax.tree.map(
        lambda p: jnp.asarray(scale * rng.normal(size=p.shape), dtype=p.dtype), pure
    )
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


def _np_act(name, x):
    """Activations written out in numpy float64 (gelu: jax's default tanh approximation)."""
    relu = np.maximum(x, 0)
    return {
        "relu": relu,
        "relu2": relu**2,
        "tanh": np.tanh(x),
        "sigmoid": 1 / (1 + np.exp(-x)),
        "silu": x / (1 + np.exp(-x)),
        "gelu": 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
    }[name]


def _np_mlp(params, x, activation="relu"):
    h = np.asarray(x, np.float64)  # (B, F)
    for i in range(len(params.get("hidden", {}))):
        layer = params["hidden"][i]
        h = _np_act(activation, h @ layer["kernel"] + layer.get("bias", 0.0))  # (B, H_i)
    return h @ params["head"]["kernel"] + params["head"].get("bias", 0.0)  # (B, out)


def _x(batch=16, features=6, seed=1):
    return np.random.default_rng(seed).normal(size=(batch, features)).astype(np.float32)


def _close(got, want, rtol=1e-5):
    """rtol against the reference; atol is rtol times the output scale (sums can cancel to ~0)."""
    want = np.asarray(want)
    np.testing.assert_allclose(
        np.asarray(got, np.float64), want, rtol=rtol, atol=rtol * np.abs(want).max()
    )


def test_linear_output_shape_and_zero_init():
    model = Linear(6, 3, policy=FP32, rngs=nnx.Rngs(0))
    y = model(jnp.asarray(_x()))
    assert y.shape == (16, 3) and y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y), 0.0)  # zero-initialised: a convex problem's start


def test_linear_forward_matches_numpy():
    model = _randomize(Linear(6, 3, policy=FP32, rngs=nnx.Rngs(0)))
    p = _params(model)["dense"]
    x = _x()
    _close(model(jnp.asarray(x)), x.astype(np.float64) @ p["kernel"] + p["bias"])


def test_linear_without_bias_has_no_bias_param():
    model = Linear(6, 3, use_bias=False, policy=FP32, rngs=nnx.Rngs(0))
    assert set(_params(model)["dense"]) == {"kernel"}


@pytest.mark.parametrize(("features", "out"), [((16,), 3), ((16, 8, 16), 3), ((), 3)])
def test_mlp_shapes(features, out):
    model = MLP(6, features, out, policy=FP32, rngs=nnx.Rngs(0))
    assert model(jnp.asarray(_x())).shape == (16, out)
    params = _params(model)
    dims = [6, *features]
    assert len(params.get("hidden", {})) == len(features)  # an empty nnx.List leaves no key
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        assert params["hidden"][i]["kernel"].shape == (d_in, d_out)
        assert params["hidden"][i]["bias"].shape == (d_out,)
    assert params["head"]["kernel"].shape == (dims[-1], out)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_mlp_forward_matches_numpy_float64(activation):
    model = _randomize(MLP(6, (16, 8), 3, activation=activation, policy=FP32, rngs=nnx.Rngs(0)))
    x = _x()
    _close(model(jnp.asarray(x)), _np_mlp(_params(model), x, activation))


def test_mlp_forward_at_init_matches_numpy():
    # lecun-normal kernels and zero biases, as built (no randomizing).
    model = MLP(6, (16,), 3, policy=FP32, rngs=nnx.Rngs(3))
    x = _x()
    _close(model(jnp.asarray(x)), _np_mlp(_params(model), x))


def test_mlp_without_bias():
    model = _randomize(MLP(6, (16,), 3, use_bias=False, policy=FP32, rngs=nnx.Rngs(0)))
    params = _params(model)
    assert "bias" not in params["hidden"][0] and "bias" not in params["head"]
    x = _x()
    _close(model(jnp.asarray(x)), _np_mlp(params, x))


def test_dropout_only_with_rng():
    model = _randomize(MLP(6, (16,), 3, dropout=0.5, policy=FP32, rngs=nnx.Rngs(0)))
    x = jnp.asarray(_x())
    ref = _np_mlp(_params(model), np.asarray(x))
    _close(model(x), ref)  # no rng: deterministic, dropout off (evaluation)
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    a, a2, b = model(x, k1), model(x, k1), model(x, k2)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))  # a pure function of the key
    assert not np.allclose(np.asarray(a), ref)
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_bf16_policy_params_fp32_output_in_output_dtype():
    x = jnp.asarray(_x())
    model = _randomize(MLP(6, (16,), 3, policy=get_policy("bf16"), rngs=nnx.Rngs(0)))
    for leaf in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param))):
        assert leaf.dtype == jnp.float32  # fp32 master weights
    y = model(x)
    assert y.dtype == jnp.float32  # the bf16 preset's output dtype
    # The matmuls run in bf16: every dot_general in the forward takes bf16 operands.
    jaxpr = jax.make_jaxpr(model)(x)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 2
    for eqn in dots:
        assert all(v.aval.dtype == jnp.bfloat16 for v in eqn.invars)
    # ... and agree with the float64 forward to bf16 accuracy (8 mantissa bits, a few roundings).
    _close(y, _np_mlp(_params(model), np.asarray(x)), rtol=3e-2)

    low_out = _randomize(
        MLP(6, (16,), 3, policy="params=float32,compute=bfloat16,output=bfloat16", rngs=nnx.Rngs(0))
    )
    assert low_out(x).dtype == jnp.bfloat16


@pytest.mark.parametrize("cls", ["linear", "mlp"])
def test_param_dtype_follows_policy(cls):
    policy = Policy(jnp.bfloat16, jnp.bfloat16, jnp.float32)
    model = (
        Linear(6, 3, policy=policy, rngs=nnx.Rngs(0))
        if cls == "linear"
        else MLP(6, (16,), 3, policy=policy, rngs=nnx.Rngs(0))
    )
    leaves = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert leaves and all(leaf.dtype == jnp.bfloat16 for leaf in leaves)
    assert model(jnp.asarray(_x())).dtype == jnp.float32


def _specs(model) -> dict:
    return nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("features", [(16,), (16, 8), (16, 8, 16)])
def test_mlp_logical_axes_alternate(features):
    specs = _specs(MLP(6, features, 3, policy=FP32, rngs=nnx.Rngs(0)))
    for i in range(len(features)):
        want = ("embed", "mlp") if i % 2 == 0 else ("mlp", "embed")
        assert specs["hidden"][i]["kernel"] == P(*want)
        assert specs["hidden"][i]["bias"] == P(want[1])  # the bias follows the output axis
    last_out = "mlp" if len(features) % 2 else "embed"
    assert specs["head"]["kernel"] == P(last_out, None)
    assert specs["head"]["bias"] == P(None)
    # Every param carries a spec of its rank, and no logical name appears twice in one param.
    shapes = jax.tree.map(np.shape, _params(MLP(6, features, 3, policy=FP32, rngs=nnx.Rngs(0))))
    flat_specs = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda s: isinstance(s, P))
    assert len(flat_specs) == 2 * (len(features) + 1)
    for path, spec in flat_specs:
        names = [a for a in spec if a is not None]
        assert len(names) == len(set(names)), (path, spec)
        shape = shapes
        for k in path:
            shape = shape[k.key]
        assert len(spec) == len(shape), (path, spec, shape)


def test_linear_logical_axes():
    specs = _specs(Linear(6, 3, policy=FP32, rngs=nnx.Rngs(0)))
    assert specs["dense"]["kernel"] == P("embed", None)
    assert specs["dense"]["bias"] == P(None)


def test_unknown_activation_did_you_mean():
    with pytest.raises(ValueError) as err:
        get_activation("rleu")
    msg = str(err.value)
    assert "did you mean 'relu'?" in msg and "\n" not in msg
    assert all(name in msg for name in ACTIVATIONS)
    with pytest.raises(ValueError, match="did you mean 'gelu'"):
        MLP(6, (16,), 3, activation="gelo", policy=FP32, rngs=nnx.Rngs(0))


def test_build_model_from_config():
    rngs = nnx.Rngs(0)
    mlp = build_model(ModelConfig(name="mlp", features=(16,), activation="tanh"), 6, 3, FP32, rngs)
    assert isinstance(mlp, MLP) and mlp.activation == "tanh"
    assert _params(mlp)["hidden"][0]["kernel"].shape == (6, 16)
    lin = build_model(ModelConfig(name="linear", use_bias=False), 6, 3, FP32, rngs)
    assert isinstance(lin, Linear) and set(_params(lin)["dense"]) == {"kernel"}


def test_build_model_unknown_name_did_you_mean():
    with pytest.raises(ValueError) as err:
        build_model(ModelConfig(name="mpl"), 4, 1, FP32, nnx.Rngs(0))
    msg = str(err.value)
    assert "did you mean 'mlp'?" in msg and "linear" in msg and "\n" not in msg


def test_build_linear_with_features_is_refused():
    with pytest.raises(ValueError, match="model.features"):
        build_model(ModelConfig(name="linear", features=(8,)), 4, 1, FP32, nnx.Rngs(0))
