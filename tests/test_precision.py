"""Tests for jaxnv.core.precision: policies, auto selection, casts, finiteness, loss scaling."""

import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxnv.core import precision
from jaxnv.core.precision import (
    DynamicLossScale,
    NoOpLossScale,
    Policy,
    StaticLossScale,
    all_finite,
    cast_floating,
    get_policy,
    make_loss_scale,
)

F32, BF16, F16 = np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)


def dtypes(policy):
    return policy.param_dtype, policy.compute_dtype, policy.output_dtype


# --- policies from strings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("fp32", (F32, F32, F32)),
        ("float32", (F32, F32, F32)),
        ("full", (F32, F32, F32)),
        ("FP32", (F32, F32, F32)),
        ("bf16", (F32, BF16, F32)),
        ("bfloat16", (F32, BF16, F32)),
        (" BF16 ", (F32, BF16, F32)),
        ("fp16", (F32, F16, F32)),
        ("float16", (F32, F16, F32)),
        ("Half", (F32, F16, F32)),
    ],
)
def test_presets_and_aliases(spec, expected):
    policy = Policy.from_string(spec)
    assert dtypes(policy) == expected
    assert all(type(d) is type(e) for d, e in zip(dtypes(policy), expected, strict=True))
    assert dtypes(get_policy(spec)) == expected


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("params=float32,compute=bfloat16,output=float32", (F32, BF16, F32)),
        ("params=float32,compute=float16,output=float16", (F32, F16, F16)),
        ("p=f32,c=bf16,o=f32", (F32, BF16, F32)),
        ("p=f32,c=f16,o=bf16", (F32, F16, BF16)),
        (" p = float32 , c = half ", (F32, F16, F32)),
        ("c=bf16", (F32, BF16, F32)),  # params and output default to float32
        ("compute=f16,params=full", (F32, F16, F32)),  # any key order
        ("o=bf16", (F32, F32, BF16)),
        ("params=bf16", (BF16, BF16, F32)),  # compute defaults to the param dtype (jmp)
        ("PARAMS=BFLOAT16,Compute=BF16,Output=Float32", (BF16, BF16, F32)),
    ],
)
def test_jmp_strings_give_exact_dtypes(spec, expected):
    assert dtypes(Policy.from_string(spec)) == expected


@pytest.mark.parametrize(
    "policy",
    [
        Policy(F32, F32, F32),
        Policy(F32, BF16, F32),
        Policy(F32, F16, F16),
        Policy(BF16, BF16, BF16),
        Policy(F16, F32, BF16),
    ],
)
def test_str_round_trips(policy):
    text = str(policy)
    assert text == (
        f"params={policy.param_dtype.name},compute={policy.compute_dtype.name},"
        f"output={policy.output_dtype.name}"
    )
    assert Policy.from_string(text) == policy


def test_str_format_is_exact():
    assert str(get_policy("bf16")) == "params=float32,compute=bfloat16,output=float32"


@pytest.mark.parametrize(
    "spec, fragments",
    [
        ("bf61", ["unknown precision policy 'bf61'", "fp32, bf16, fp16, auto", "'bf16'?"]),
        ("autoo", ["unknown precision policy", "did you mean 'auto'?"]),
        ("", ["unknown precision policy ''", "params=float32,compute=bfloat16"]),
        ("compte=bf16", ["unknown key 'compte'", "params (p)", "did you mean 'compute'?"]),
        ("x=f32", ["unknown key 'x'", "compute (c)"]),
        ("params=int32", ["'int32' is not a floating dtype", "float32 (f32)"]),
        ("c=bool", ["'bool' is not a floating dtype", "bfloat16 (bf16)"]),
        ("c=bf17", ["compute dtype 'bf17'", "did you mean 'bf16'?"]),
        ("c=bf16,compute=f16", ["duplicate key 'compute'", "at most once"]),
        ("p=f32,p=f32", ["duplicate key 'params'", "at most once"]),
        ("p=f32;c=bf16", ["is not key=dtype", "params=float32,compute=bfloat16"]),
        ("p=f32,c", ["'c' in precision policy", "is not key=dtype"]),
    ],
)
def test_bad_specs_raise_one_line_errors_naming_the_fix(spec, fragments):
    with pytest.raises(ValueError) as info:
        Policy.from_string(spec)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_constructor_normalizes_and_validates_dtypes():
    policy = Policy(jnp.float32, "bf16", np.float16)
    assert dtypes(policy) == (F32, BF16, F16)
    assert all(isinstance(d, np.dtype) for d in dtypes(policy))
    with pytest.raises(ValueError, match="'int32' is not a floating dtype") as info:
        Policy(jnp.float32, jnp.int32, jnp.float32)
    assert "\n" not in str(info.value)


def test_policy_is_hashable_and_reason_is_not_compared():
    a = Policy(F32, BF16, F32, reason="because")
    b = Policy(F32, BF16, F32)
    assert a == b and hash(a) == hash(b)
    assert len({a, b, Policy(F32, F16, F32)}) == 2
    with pytest.raises(AttributeError):
        a.compute_dtype = F16  # frozen


def test_default_loss_scale():
    assert get_policy("fp16").default_loss_scale == "dynamic"
    assert get_policy("p=f32,c=f16,o=f32").default_loss_scale == "dynamic"
    assert get_policy("bf16").default_loss_scale == "none"
    assert get_policy("fp32").default_loss_scale == "none"
    assert get_policy("p=f16,c=f32").default_loss_scale == "none"


def test_get_policy():
    assert dtypes(get_policy(None)) == (F32, F32, F32)
    policy = Policy(F32, BF16, BF16)
    assert get_policy(policy) is policy
    tpu = [types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite")]
    assert dtypes(get_policy("auto", devices=tpu)) == (F32, BF16, F32)
    assert dtypes(get_policy(" AUTO ", devices=tpu)) == (F32, BF16, F32)
    assert dtypes(get_policy("p=f32,c=f16")) == (F32, F16, F32)
    with pytest.raises(TypeError, match="str, Policy or None"):
        get_policy(16)


# --- auto ----------------------------------------------------------------------------------------


def gpu(kind, cc=None, platform="gpu"):
    if cc is None:
        return types.SimpleNamespace(platform=platform, device_kind=kind)
    return types.SimpleNamespace(platform=platform, device_kind=kind, compute_capability=cc)


@pytest.mark.parametrize(
    "device, compute, reason_fragments",
    [
        (types.SimpleNamespace(platform="cpu", device_kind="cpu"), F32, ["CPU", "fp32"]),
        (gpu("NVIDIA A100-SXM4-40GB", "8.0"), BF16, ["compute capability 8.0", "bf16"]),
        (gpu("NVIDIA H100 80GB HBM3", "9.0"), BF16, ["compute capability 9.0", "bf16"]),
        (gpu("NVIDIA GeForce RTX 3090", "8.6"), BF16, ["8.6"]),
        (gpu("NVIDIA B200", "10.0"), BF16, ["10.0"]),  # compared as numbers, not strings
        (gpu("Tesla V100-SXM2-16GB", "7.0"), F16, ["compute capability 7.0", "float16"]),
        (gpu("Tesla T4", "7.5"), F16, ["7.5", "loss scaling"]),
        (gpu("NVIDIA H100", "9.0", platform="cuda"), BF16, ["9.0"]),
        (types.SimpleNamespace(platform="tpu", device_kind="TPU v4"), BF16, ["TPU", "bf16"]),
        (gpu("AMD Instinct MI250X", platform="rocm"), BF16, ["no NVIDIA compute capability"]),
        (gpu("AMD Instinct MI300X"), BF16, ["no NVIDIA compute capability"]),
        (gpu("AMD Instinct MI210", "gfx90a"), BF16, ["no NVIDIA compute capability"]),
    ],
)
def test_auto_on_fake_devices(device, compute, reason_fragments):
    policy = Policy.auto([device, device])
    assert dtypes(policy) == (F32, compute, F32)
    assert policy.default_loss_scale == ("dynamic" if compute == F16 else "none")
    assert device.device_kind in policy.reason
    assert "\n" not in policy.reason
    for fragment in reason_fragments:
        assert fragment in policy.reason


def test_auto_on_real_devices_is_fp32():
    policy = Policy.auto()
    assert jax.devices()[0].platform == "cpu"
    assert dtypes(policy) == (F32, F32, F32)
    assert jax.devices()[0].device_kind in policy.reason
    assert dtypes(Policy.from_string("auto")) == (F32, F32, F32)
    assert get_policy("auto").reason == policy.reason


def test_auto_without_devices_is_an_error():
    with pytest.raises(ValueError, match="no devices"):
        Policy.auto([])


# --- casts and finiteness ------------------------------------------------------------------------


def make_tree():
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
        "h": jnp.asarray(rng.normal(size=(5,)), jnp.float16),
        "step": jnp.arange(4, dtype=jnp.int32),
        "mask": jnp.array([True, False]),
        "key": jax.random.key(0),
        "nested": [jnp.asarray(rng.normal(size=(2,)), jnp.bfloat16), np.arange(3, dtype=np.int64)],
    }


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_cast_floating_casts_floats_only(dtype):
    tree = make_tree()
    out = cast_floating(tree, dtype)
    for name in ("w", "h"):
        assert out[name].dtype == dtype
        expected = np.asarray(tree[name]).astype(np.float32).astype(dtype)
        np.testing.assert_array_equal(np.asarray(out[name]), expected)
    assert out["nested"][0].dtype == dtype
    for name in ("step", "mask", "key"):
        assert out[name] is tree[name]
    assert out["nested"][1] is tree["nested"][1]
    assert jax.tree.structure(out) == jax.tree.structure(tree)


def test_cast_floating_returns_leaves_already_in_dtype_as_is():
    tree = make_tree()
    tree["host"] = np.ones(3, np.float32)  # numpy's astype would copy
    out = cast_floating(tree, jnp.float32)
    assert out["w"] is tree["w"] and out["host"] is tree["host"]
    assert out["h"] is not tree["h"] and out["h"].dtype == F32


def test_cast_floating_on_shapes_and_under_jit():
    abstract = {
        "w": jax.ShapeDtypeStruct((2, 3), jnp.float32),
        "n": jax.ShapeDtypeStruct((), jnp.int32),
    }
    out = cast_floating(abstract, jnp.bfloat16)
    assert out["w"] == jax.ShapeDtypeStruct((2, 3), jnp.bfloat16)
    assert out["n"] is abstract["n"]
    traced = jax.jit(lambda t: cast_floating(t, jnp.float16))(
        {"a": jnp.ones(2), "b": jnp.ones(2, jnp.int32)}
    )
    assert traced["a"].dtype == F16 and traced["b"].dtype == jnp.int32


def test_policy_casts():
    policy = Policy(F32, BF16, F16)
    tree = make_tree()
    assert policy.cast_to_param(tree)["h"].dtype == F32
    assert policy.cast_to_compute(tree)["w"].dtype == BF16
    assert policy.cast_to_output(tree)["w"].dtype == F16
    assert policy.cast_to_compute(tree)["step"] is tree["step"]


@pytest.mark.parametrize(
    "tree, expected",
    [
        ({"a": jnp.ones(3), "b": jnp.zeros((2, 2), jnp.bfloat16)}, True),
        ({"a": jnp.ones(3), "b": jnp.array([1.0, jnp.inf])}, False),
        ({"a": jnp.array([-jnp.inf], jnp.float16)}, False),
        ({"a": jnp.ones(3), "b": jnp.array([jnp.nan, 0.0], jnp.bfloat16)}, False),
        ({"i": jnp.array([2**31 - 1], jnp.int32), "b": jnp.array([True])}, True),
        ({"i": jnp.arange(3), "f": jnp.array(jnp.nan)}, False),
        ({}, True),
        ([], True),
        ({"a": None}, True),
        ({"big": jnp.array([60000.0], jnp.float16)}, True),
    ],
)
def test_all_finite(tree, expected):
    result = all_finite(tree)
    assert result.shape == () and result.dtype == jnp.bool_
    assert bool(result) is expected
    leaves = [np.asarray(x, np.float32) for x in jax.tree.leaves(tree)]
    reference = all(np.isfinite(x).all() for x in leaves)  # ints are always finite
    assert reference is expected
    assert bool(jax.jit(all_finite)(tree)) is expected


# --- loss scaling --------------------------------------------------------------------------------


def reference_dynamic(flags, scale, period, factor, lo, hi):
    """Plain-Python model of the dynamic loss scale, step by step."""
    counter, history = 0, []
    for finite in flags:
        if finite:
            counter += 1
            if counter == period:
                scale, counter = min(scale * factor, hi), 0
        else:
            scale, counter = max(scale / factor, lo), 0
        history.append((scale, counter))
    return history


def run_jitted(loss_scale, flags):
    traces = []

    @jax.jit
    def adjust(ls, finite):
        traces.append(1)
        return ls.adjust(finite)

    history = []
    for finite in flags:
        loss_scale = adjust(loss_scale, jnp.asarray(finite))
        assert loss_scale.loss_scale.dtype == F32 and loss_scale.counter.dtype == jnp.int32
        history.append((float(loss_scale.loss_scale), int(loss_scale.counter)))
    assert len(traces) == 1  # static config does not retrace
    return loss_scale, history


def test_dynamic_halves_on_overflow_and_respects_min():
    ls = make_loss_scale("dynamic", init_scale=8.0, min_scale=2.0)
    _, history = run_jitted(ls, [False, False, False, False])
    assert history == [(4.0, 0), (2.0, 0), (2.0, 0), (2.0, 0)]


def test_dynamic_doubles_exactly_after_period_and_resets_counter():
    ls = make_loss_scale("dynamic", init_scale=4.0, period=5)
    ls, history = run_jitted(ls, [True] * 11)
    assert [s for s, _ in history[:4]] == [4.0] * 4  # not before `period` finite steps
    assert history[4] == (8.0, 0)
    assert history[9] == (16.0, 0)
    assert history[10] == (16.0, 1)


def test_dynamic_overflow_resets_counter():
    ls = make_loss_scale("dynamic", init_scale=4.0, period=3)
    _, history = run_jitted(ls, [True, True, False, True, True, True])
    assert history == [(4.0, 1), (4.0, 2), (2.0, 0), (2.0, 1), (2.0, 2), (4.0, 0)]


def test_dynamic_respects_max():
    ls = make_loss_scale("dynamic", init_scale=2.0**23, period=2, max_scale=2.0**24)
    _, history = run_jitted(ls, [True] * 6)
    assert [s for s, _ in history] == [2.0**23, 2.0**24, 2.0**24, 2.0**24, 2.0**24, 2.0**24]


def test_dynamic_matches_reference_on_random_flags():
    flags = list(np.random.default_rng(1).random(200) < 0.9)
    kwargs = dict(period=7, factor=3.0, min_scale=0.5, max_scale=3.0**6)
    ls = make_loss_scale("dynamic", init_scale=9.0, **kwargs)
    _, history = run_jitted(ls, flags)
    expected = reference_dynamic(flags, 9.0, 7, 3.0, 0.5, 3.0**6)
    np.testing.assert_allclose([s for s, _ in history], [s for s, _ in expected], rtol=1e-6)
    assert [c for _, c in history] == [c for _, c in expected]
    assert len({s for s, _ in history}) > 2  # the sequence both grew and shrank


@pytest.mark.parametrize(
    "loss_scale",
    # 2**8 keeps the scaled fp16 leaves in range (|x| * 2**15 would overflow float16).
    [
        NoOpLossScale(),
        StaticLossScale(jnp.float32(2.0**8)),
        make_loss_scale("dynamic", init_scale=256),
    ],
    ids=["noop", "static", "dynamic"],
)
def test_unscale_inverts_scale(loss_scale):
    tree = make_tree()
    out = loss_scale.unscale(loss_scale.scale(tree))
    for name in ("w", "h"):
        assert out[name].dtype == tree[name].dtype
        np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(tree[name]))
    for name in ("step", "mask", "key"):
        assert out[name] is tree[name]


def test_unscale_with_inexact_scale_is_close():
    ls = StaticLossScale(jnp.float32(3.0))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(16,)), jnp.float32)
    np.testing.assert_allclose(np.asarray(ls.unscale(ls.scale(x))), np.asarray(x), rtol=1e-6)


def test_scale_keeps_fp16_and_bf16_dtypes_and_values():
    x16 = jnp.asarray([0.5, -1.25, 3.0], jnp.float16)
    xb = jnp.asarray([0.5, -1.25, 3.0], jnp.bfloat16)
    ls = make_loss_scale("static", init_scale=1024.0)
    scaled = ls.scale({"h": x16, "b": xb})
    assert scaled["h"].dtype == F16 and scaled["b"].dtype == BF16
    np.testing.assert_array_equal(np.asarray(scaled["h"]), np.asarray(x16) * np.float16(1024))
    np.testing.assert_array_equal(
        np.asarray(scaled["b"], np.float32), np.asarray(xb, np.float32) * 1024
    )


def test_unscale_computes_the_inverse_in_float32():
    # 1/2**25 rounds to 0 in float16, so an fp16 inverse would zero these gradients.
    ls = StaticLossScale(jnp.float32(2.0**25))
    grads = jnp.asarray([2.0**15, 3 * 2.0**13], jnp.float16)
    out = ls.unscale(grads)
    assert out.dtype == F16
    np.testing.assert_array_equal(np.asarray(out), np.asarray([2.0**-10, 3 * 2.0**-12], np.float16))


def test_noop_loss_scale():
    ls = NoOpLossScale()
    assert ls.loss_scale.dtype == F32 and float(ls.loss_scale) == 1.0
    tree = make_tree()
    assert ls.scale(tree) is tree and ls.unscale(tree) is tree
    assert ls.adjust(jnp.array(False)) is ls


def test_loss_scales_are_pytrees_for_checkpoints_and_jit():
    dynamic = make_loss_scale("dynamic", period=10)
    leaves = jax.tree.leaves(dynamic)
    assert len(leaves) == 2
    assert leaves[0] is dynamic.loss_scale and leaves[1] is dynamic.counter
    static = make_loss_scale("static", init_scale=4.0)
    assert jax.tree.leaves(static) == [static.loss_scale]
    assert jax.tree.leaves(NoOpLossScale()) == []
    for ls in (dynamic, static, NoOpLossScale()):
        out = jax.jit(lambda x: x)(ls)
        assert type(out) is type(ls)
        assert jax.tree.structure(out) == jax.tree.structure(ls)
    # A round trip through host numpy (what a checkpoint stores) rebuilds the same object.
    host = jax.tree.map(np.asarray, dynamic)
    restored = jax.tree.map(jnp.asarray, host)
    assert isinstance(restored, DynamicLossScale) and restored.period == 10
    assert float(restored.loss_scale) == 2.0**15 and restored.counter.dtype == jnp.int32
    # Static config is part of the tree structure, not a leaf.
    assert jax.tree.structure(dynamic) != jax.tree.structure(make_loss_scale("dynamic", period=11))


def test_make_loss_scale():
    assert isinstance(make_loss_scale("none"), NoOpLossScale)
    static = make_loss_scale(" Static ", init_scale=128.0)
    assert isinstance(static, StaticLossScale)
    assert static.loss_scale.dtype == F32 and static.loss_scale.shape == ()
    assert float(static.loss_scale) == 128.0
    dynamic = make_loss_scale("dynamic", period=3, factor=4.0, min_scale=2.0, max_scale=2.0**20)
    assert isinstance(dynamic, DynamicLossScale)
    assert (dynamic.period, dynamic.factor) == (3, 4.0)
    assert (dynamic.min_loss_scale, dynamic.max_loss_scale) == (2.0, 2.0**20)
    assert float(dynamic.loss_scale) == 2.0**15 and int(dynamic.counter) == 0
    assert dynamic.counter.dtype == jnp.int32 and dynamic.loss_scale.dtype == F32
    assert isinstance(make_loss_scale("auto", get_policy("fp16")), DynamicLossScale)
    assert isinstance(make_loss_scale("auto", get_policy("bf16")), NoOpLossScale)
    assert isinstance(make_loss_scale("auto", get_policy("fp32")), NoOpLossScale)


@pytest.mark.parametrize(
    "args, kwargs, fragment",
    [
        (("dynamc",), {}, "did you mean 'dynamic'?"),
        (("scaled",), {}, "use one of none, static, dynamic, auto"),
        (("auto",), {}, "needs a policy"),
        (("static",), {"init_scale": 0.0}, "init_scale must be > 0"),
        (("dynamic",), {"factor": 1.0}, "factor > 1"),
        (("dynamic",), {"init_scale": 2.0**30}, "init_scale <= max_scale"),
    ],
)
def test_make_loss_scale_errors_are_one_line(args, kwargs, fragment):
    with pytest.raises(ValueError) as info:
        make_loss_scale(*args, **kwargs)
    assert "\n" not in str(info.value)
    assert fragment in str(info.value)


def test_loss_scale_union_names_all_kinds():
    assert set(precision.LossScale.__args__) == {NoOpLossScale, StaticLossScale, DynamicLossScale}
