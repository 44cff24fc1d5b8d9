"""Mixed precision: dtype policies, floating-only casts, finiteness checks and loss scaling.

A `Policy` says which dtype params are stored, computed and returned in; `get_policy` builds one
from a preset (`fp32`, `bf16`, `fp16`, `auto`) or a jmp-style string. Loss scales are pure pytrees
(`NoOpLossScale`, `StaticLossScale`, `DynamicLossScale`) that live in the train state.
"""

from __future__ import annotations

import dataclasses
import difflib

import flax.struct
import jax
import jax.numpy as jnp

_F32, _BF16, _F16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)

# Dtype names a policy accepts; a bare one is also a preset (compute in it, params/outputs f32).
_DTYPE_NAMES = {
    "f32": _F32, "fp32": _F32, "float32": _F32, "full": _F32,
    "bf16": _BF16, "bfloat16": _BF16,
    "f16": _F16, "fp16": _F16, "float16": _F16, "half": _F16,
}  # fmt: skip
_KEYS = {key: name for name in ("params", "compute", "output") for key in (name, name[0])}
_EXAMPLE = "'params=float32,compute=bfloat16,output=float32'"


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _parse_dtype(name: str, key: str) -> jnp.dtype:
    word = name.strip().lower()
    if word in _DTYPE_NAMES:
        return _DTYPE_NAMES[word]
    try:
        problem = "not a floating dtype" if jnp.dtype(word).kind in "iub" else "not supported"
    except TypeError:
        problem = "not a dtype"
    raise ValueError(
        f"{key} dtype '{name.strip()}' is {problem}: use one of float32 (f32), bfloat16 (bf16), "
        f"float16 (f16){_did_you_mean(word, _DTYPE_NAMES)}"
    )


def _is_floating(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Dtypes for params (storage), compute (forward/backward) and outputs.

    >>> print(Policy(jnp.float32, jnp.bfloat16, jnp.float32))
    params=float32,compute=bfloat16,output=float32
    """

    param_dtype: jnp.dtype
    compute_dtype: jnp.dtype
    output_dtype: jnp.dtype
    reason: str = dataclasses.field(default="", compare=False)

    def __post_init__(self):
        for field in ("param_dtype", "compute_dtype", "output_dtype"):
            value = getattr(self, field)
            key = field.removesuffix("_dtype")
            dtype = _parse_dtype(value, key) if isinstance(value, str) else jnp.dtype(value)
            if not jnp.issubdtype(dtype, jnp.floating):
                _parse_dtype(dtype.name, key)  # raises the one-line error naming the fix
            object.__setattr__(self, field, dtype)

    def cast_to_param(self, tree):
        """Casts the floating leaves of `tree` to `param_dtype`."""
        return cast_floating(tree, self.param_dtype)

    def cast_to_compute(self, tree):
        """Casts the floating leaves of `tree` to `compute_dtype`."""
        return cast_floating(tree, self.compute_dtype)

    def cast_to_output(self, tree):
        """Casts the floating leaves of `tree` to `output_dtype`."""
        return cast_floating(tree, self.output_dtype)

    @property
    def default_loss_scale(self) -> str:
        """`"dynamic"` when computing in float16 (its range needs it), else `"none"`."""
        return "dynamic" if self.compute_dtype == _F16 else "none"

    def __str__(self) -> str:
        return (
            f"params={self.param_dtype.name},compute={self.compute_dtype.name},"
            f"output={self.output_dtype.name}"
        )

    @classmethod
    def from_string(cls, spec: str) -> Policy:
        """Parses a preset (`fp32`, `bf16`, `fp16`, `auto`) or a jmp-style string.

        >>> str(Policy.from_string("p=f32, c=bf16"))
        'params=float32,compute=bfloat16,output=float32'
        """
        text, shown = spec.strip().lower(), spec.strip()
        if text == "auto":
            return cls.auto()
        if text in _DTYPE_NAMES:
            return cls(_F32, _DTYPE_NAMES[text], _F32)
        if "=" not in text:
            raise ValueError(
                f"unknown precision policy '{shown}': use one of fp32, bf16, fp16, auto, or a "
                f"string like {_EXAMPLE}{_did_you_mean(text, [*_DTYPE_NAMES, 'auto'])}"
            )
        dtypes: dict[str, jnp.dtype] = {}
        for part in text.split(","):
            if part.count("=") != 1:
                raise ValueError(
                    f"'{part.strip()}' in precision policy '{shown}' is not key=dtype: "
                    f"write it like {_EXAMPLE}"
                )
            key, value = (s.strip() for s in part.split("="))
            if key not in _KEYS:
                raise ValueError(
                    f"unknown key '{key}' in precision policy '{shown}': use params (p), "
                    f"compute (c) or output (o){_did_you_mean(key, _KEYS)}"
                )
            if _KEYS[key] in dtypes:
                raise ValueError(
                    f"duplicate key '{_KEYS[key]}' in precision policy '{shown}': "
                    "give each of params, compute, output at most once"
                )
            dtypes[_KEYS[key]] = _parse_dtype(value, _KEYS[key])
        params = dtypes.get("params", _F32)
        # As in jmp, compute defaults to the param dtype; outputs default to float32.
        return cls(params, dtypes.get("compute", params), dtypes.get("output", _F32))

    @classmethod
    def auto(cls, devices=None) -> Policy:
        """Picks the fastest safe policy for `devices` (default `jax.devices()`); sets `reason`.

        >>> Policy.auto().reason  # on a CPU host
        'CPU (cpu): XLA:CPU runs bf16 matmuls no faster than fp32, so fp32'
        """
        devices = jax.devices() if devices is None else list(devices)
        if not devices:
            raise ValueError("Policy.auto got no devices: pass devices=jax.devices() or a policy")
        compute, reason = _auto_compute_dtype(devices[0])  # a run's devices share one platform
        return cls(_F32, compute, _F32, reason)


def _auto_compute_dtype(device) -> tuple[jnp.dtype, str]:
    """The compute dtype `auto` picks for `device`, and why (one sentence naming the device)."""
    platform = str(getattr(device, "platform", "")).lower()
    kind = getattr(device, "device_kind", None) or "unknown device"
    bf16 = "params float32, compute bfloat16"
    if platform == "tpu":
        return _BF16, f"{kind} (TPU) computes natively in bf16: {bf16}"
    if platform == "cpu":
        return _F32, f"CPU ({kind}): XLA:CPU runs bf16 matmuls no faster than fp32, so fp32"
    if platform not in ("gpu", "cuda", "rocm"):
        return _F32, f"{kind} on unknown platform '{platform}': fp32 is the safe choice"
    cc = getattr(device, "compute_capability", None)
    try:
        version = tuple(int(x) for x in str(cc).strip().split("."))
    except ValueError:  # None (e.g. AMD ROCm) or unparsable
        return _BF16, (
            f"{kind} ({platform}) has no NVIDIA compute capability (e.g. AMD ROCm), so bf16 "
            f"support is assumed: {bf16}"
        )
    if version >= (8, 0):
        return _BF16, f"{kind} (compute capability {cc}) has bf16 tensor cores: {bf16}"
    return _F16, (
        f"{kind} (compute capability {cc}) has fp16 but no bf16 tensor cores: "
        "params float32, compute float16 with dynamic loss scaling"
    )


def get_policy(spec: str | Policy | None, devices=None) -> Policy:
    """Returns a `Policy` from a preset/jmp string, a `Policy` (as is) or None (fp32).

    >>> get_policy("fp16").default_loss_scale
    'dynamic'
    """
    if spec is None:
        return Policy(_F32, _F32, _F32)
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str):
        raise TypeError(
            f"precision policy must be a str, Policy or None, not {type(spec).__name__}"
        )
    if spec.strip().lower() == "auto":
        return Policy.auto(devices)
    return Policy.from_string(spec)


def accumulating_dtype(dtype, backend: str | None = None) -> jnp.dtype:
    """The operand dtype for a matmul that accumulates in float32 on `backend` (default: JAX's).

    XLA:CPU has no float16 x float16 -> float32 dot, so there float16 operands are upcast to
    float32 (the same float32 accumulation, from the same float16 values); every other case keeps
    `dtype`, and GPUs keep the fast float16 path.
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float16 and (backend or jax.default_backend()) == "cpu":
        return jnp.dtype(jnp.float32)
    return dtype


def backend_notes(policy: Policy, backend: str | None = None) -> list[str]:
    """One line for each operation that this backend computes in another form under `policy`."""
    if accumulating_dtype(policy.compute_dtype, backend) != policy.compute_dtype:
        return [
            "precision: a transformer's attention upcasts float16 operands to float32 on the CPU "
            "(XLA:CPU has no float16 matmul with float32 accumulation); other matmuls stay float16"
        ]
    return []


def cast_floating(tree, dtype):
    """Casts the floating leaves of `tree` to `dtype`; int, bool and key leaves are untouched.

    >>> cast_floating({"w": jnp.ones(2), "n": jnp.arange(2)}, jnp.bfloat16)["w"].dtype
    dtype(bfloat16)
    """
    dtype = jnp.dtype(dtype)

    def cast(x):
        if not _is_floating(x) or x.dtype == dtype:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return x.astype(dtype)

    return jax.tree.map(cast, tree)


def all_finite(tree) -> jax.Array:
    """Scalar bool: every floating leaf of `tree` is free of inf and nan (True for no leaves).

    >>> bool(all_finite({"g": jnp.array([1.0, jnp.inf])}))
    False
    """
    checks = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if _is_floating(x)]
    return jnp.stack(checks).all() if checks else jnp.array(True)


class _Scaling:
    """`scale`/`unscale` for loss scales that hold a float32 `loss_scale` array."""

    def scale(self, tree):
        """Multiplies the floating leaves of `tree` by the loss scale (in each leaf's dtype)."""
        scale = self.loss_scale
        return jax.tree.map(lambda x: x * scale.astype(x.dtype) if _is_floating(x) else x, tree)

    def unscale(self, tree):
        """Divides the floating leaves of `tree` by the loss scale, keeping each leaf's dtype."""
        inverse = 1.0 / self.loss_scale.astype(jnp.float32)  # f32: 1/2**25 underflows in f16

        def unscale(x):
            if not _is_floating(x):
                return x
            wide = jnp.promote_types(x.dtype, jnp.float32)
            return (x.astype(wide) * inverse.astype(wide)).astype(x.dtype)

        return jax.tree.map(unscale, tree)


@flax.struct.dataclass
class NoOpLossScale:
    """No loss scaling: scale 1, `scale`/`unscale` return their input."""

    @property
    def loss_scale(self) -> jax.Array:
        return jnp.float32(1)

    def scale(self, tree):
        return tree

    def unscale(self, tree):
        return tree

    def adjust(self, grads_finite: jax.Array) -> NoOpLossScale:
        return self


@flax.struct.dataclass
class StaticLossScale(_Scaling):
    """A fixed loss scale (float32 scalar)."""

    loss_scale: jax.Array  # float32 scalar

    def adjust(self, grads_finite: jax.Array) -> StaticLossScale:
        return self


@flax.struct.dataclass
class DynamicLossScale(_Scaling):
    """A loss scale that grows by `factor` after `period` finite steps and shrinks on overflow.

    >>> ls = make_loss_scale("dynamic", init_scale=8.0)
    >>> float(ls.adjust(jnp.array(False)).loss_scale)
    4.0
    """

    loss_scale: jax.Array  # float32 scalar
    counter: jax.Array  # int32 scalar: finite steps since the last change
    period: int = flax.struct.field(pytree_node=False, default=2000)
    factor: float = flax.struct.field(pytree_node=False, default=2.0)
    min_loss_scale: float = flax.struct.field(pytree_node=False, default=1.0)
    max_loss_scale: float = flax.struct.field(pytree_node=False, default=2.0**24)

    def adjust(self, grads_finite: jax.Array) -> DynamicLossScale:
        """Next loss scale after a step whose gradients were (not) finite; jittable."""
        finite = jnp.asarray(grads_finite, jnp.bool_)
        counter = self.counter + 1
        grow = finite & (counter >= self.period)
        grown = jnp.minimum(self.loss_scale * self.factor, self.max_loss_scale)
        shrunk = jnp.maximum(self.loss_scale / self.factor, self.min_loss_scale)
        scale = jnp.where(finite, jnp.where(grow, grown, self.loss_scale), shrunk)
        counter = jnp.where(finite & ~grow, counter, 0)
        return self.replace(loss_scale=scale.astype(jnp.float32), counter=counter.astype(jnp.int32))


LossScale = NoOpLossScale | StaticLossScale | DynamicLossScale
_KINDS = ("none", "static", "dynamic", "auto")


def make_loss_scale(
    kind: str,
    policy: Policy | None = None,
    *,
    init_scale: float = 2.0**15,
    period: int = 2000,
    factor: float = 2.0,
    min_scale: float = 1.0,
    max_scale: float = 2.0**24,
) -> LossScale:
    """Builds a loss scale: `kind` is "none", "static", "dynamic" or "auto" (the policy's default).

    >>> type(make_loss_scale("auto", get_policy("fp16"))).__name__
    'DynamicLossScale'
    """
    name = kind.strip().lower()
    if name == "auto":
        if policy is None:
            raise ValueError("loss scale 'auto' needs a policy: make_loss_scale('auto', policy)")
        name = policy.default_loss_scale
    if name not in _KINDS:
        hint = _did_you_mean(name, _KINDS)
        raise ValueError(f"unknown loss scale '{kind}': use one of {', '.join(_KINDS)}{hint}")
    if name == "none":
        return NoOpLossScale()
    if not init_scale > 0:
        raise ValueError(f"loss scale init_scale must be > 0, got {init_scale}: try 2**15")
    if name == "static":
        return StaticLossScale(jnp.asarray(init_scale, jnp.float32))
    if not (period >= 1 and factor > 1 and 0 < min_scale <= init_scale <= max_scale):
        raise ValueError(
            f"dynamic loss scale needs period >= 1, factor > 1 and 0 < min_scale <= init_scale <= "
            f"max_scale, got period={period}, factor={factor}, min_scale={min_scale}, "
            f"init_scale={init_scale}, max_scale={max_scale}"
        )
    return DynamicLossScale(
        jnp.asarray(init_scale, jnp.float32),
        jnp.zeros((), jnp.int32),
        period=int(period),
        factor=float(factor),
        min_loss_scale=float(min_scale),
        max_loss_scale=float(max_scale),
    )
