"""The transformer's layers: norms, RoPE, attention (MHA/GQA/MQA) and the MLP, one class each.

Every switch of `Transformer` that changes a layer lives here as a constructor argument; the
param names, shapes and logical axis names are the contract with the Hugging Face importer
(jaxnv/checkpoint/hf.py). Shapes in comments: B batch, T queries, S keys, D embed, N query heads,
K kv heads, G = N // K query heads per kv head, H head dim, F mlp.
"""

from __future__ import annotations

import difflib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnv.core.precision import Policy, accumulating_dtype
from jaxnv.models import mkl
from jaxnv.models.lora import adapted
from jaxnv.models.mlp import ACTIVATIONS

# the transformer's activations: jaxnv's, plus GPT-2's "gelu_new" under its descriptive name
TRANSFORMER_ACTIVATIONS = {
    "silu": ACTIVATIONS["silu"],
    "gelu": ACTIVATIONS["gelu"],
    "relu": ACTIVATIONS["relu"],
    "relu2": ACTIVATIONS["relu2"],
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}
NORMS = ("rms", "layer")
ROPE_TYPES = ("default", "llama3")


def param(rngs: nnx.Rngs, shape, names, std: float, dtype, *, vocab_size: int | None = None):
    """A normal(0, std) param with logical axis `names` (std 0: zeros); padded 'vocab' entries
    are zero."""

    def init(key, shape, dtype):
        value = std * jax.random.normal(key, shape, dtype) if std else jnp.zeros(shape, dtype)
        if vocab_size is None:
            return value
        padded = tuple(slice(vocab_size, None) if n == "vocab" else slice(None) for n in names)
        return value.at[padded].set(0)

    return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, dtype))


def project(spec: str, x: jax.Array, w: jax.Array, kernel: str = "xla") -> jax.Array:
    """`jnp.einsum(spec, x, w)` for a projection (x's trailing axes against w's leading ones),
    through MKL's sgemm with `kernel="mkl"` (`model.matmul`; jaxnv/models/mkl.py)."""
    ins, w_axes = spec.split("->")[0].split(",")
    contract = len(set(ins) & set(w_axes))
    if kernel == "mkl":
        return mkl.matmul(x, w, contract=contract)
    if x.dtype != w.dtype:  # mixed operands: einsum's promotion
        return jnp.einsum(spec, x, w)
    return _dense(x, w, contract)


def _contract_last(x, w, contract):
    """x's last `contract` axes against w's first ones: (..., *in) x (*in, *out) -> (..., *out)."""
    dims = (tuple(range(x.ndim - contract, x.ndim)), tuple(range(contract)))
    return jax.lax.dot_general(x, w, (dims, ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense(x: jax.Array, w: jax.Array, contract: int) -> jax.Array:
    """A projection whose weight gradient transposes the narrower of its two operands.

    The gradient contracts x (..., *in) and dy (..., *out) over their leading axes; XLA
    materialises one of them transposed. Autodiff of the einsum transposes dy, which is the wider
    one for an up-projection (the fused q/k/v, gate/up); here it is x there and dy for a
    down-projection. Same math as the einsum.
    """
    return _contract_last(x, w, contract)


def _dense_fwd(x, w, contract):
    return _contract_last(x, w, contract), (x, w)


def _dense_bwd(contract, residuals, dy):
    x, w = residuals
    lead = tuple(range(x.ndim - contract))  # the batch-like axes, shared by x and dy
    outs = w.ndim - contract
    dx = jax.lax.dot_general(
        dy, w, ((tuple(range(len(lead), dy.ndim)), tuple(range(contract, w.ndim))), ((), ()))
    )  # (..., *in)
    if math.prod(w.shape[:contract]) <= math.prod(w.shape[contract:]):
        dw = jax.lax.dot_general(x, dy, ((lead, lead), ((), ())))  # (*in, *out)
    else:  # (*out, *in), then its (weight-sized) transpose
        dw = jax.lax.dot_general(dy, x, ((lead, lead), ((), ())))
        dw = jnp.transpose(dw, (*range(outs, outs + contract), *range(outs)))
    return dx.astype(x.dtype), dw.astype(w.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout of x at `rate`; the identity without an rng."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


# --------------------------------------------------------------------------------------- norms
def rms_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / rms(x) * scale over the last axis, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)  # (..., D)
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)  # (..., 1)
    scale32 = scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))  # (1.., D)
    return (x32 * inv_rms * scale32).astype(x.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-5) -> jax.Array:
    """(x - mean) / std * scale + bias over the last axis, in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)  # (..., D)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    inv_std = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)
    shape = (1,) * (x.ndim - 1) + (-1,)
    scale32, bias32 = (p.astype(jnp.float32).reshape(shape) for p in (scale, bias))
    return (centred * inv_std * scale32 + bias32).astype(x.dtype)


class Norm(nnx.Module):
    """RMSNorm (`kind="rms"`: `scale`) or LayerNorm (`"layer"`: `scale` and `bias`), all
    ("embed",); float32 inside."""

    def __init__(self, dim: int, *, kind: str = "rms", eps: float = 1e-6, policy: Policy):
        ones = nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",))
        self.scale = nnx.Param(ones(None, (dim,), policy.param_dtype))
        if kind == "layer":
            zeros = nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",))
            self.bias = nnx.Param(zeros(None, (dim,), policy.param_dtype))
        self.kind, self.eps = kind, eps

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind == "layer":
            return layer_norm(x, self.scale[...], self.bias[...], self.eps)
        return rms_norm(x, self.scale[...], self.eps)


# ---------------------------------------------------------------------------------------- RoPE
def check_rope_scaling(scaling: dict | None) -> None:
    """One-line ValueError unless `scaling` is None or a rope_scaling dict we implement."""
    if scaling is None:
        return
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"rope_scaling type {kind!r} is not supported: use one of {', '.join(ROPE_TYPES)} "
            "or rope_scaling=None"
        )
    need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in need if k not in scaling] if kind == "llama3" else []
    if missing:
        raise ValueError(f"rope_scaling of type 'llama3' lacks {', '.join(missing)}: add them")


def rope_inv_freq(head_dim: int, theta: float = 10000.0, scaling: dict | None = None):
    """The (H/2,) float32 rotation frequencies theta**(-2i/H), computed as transformers does
    (float32); `scaling` = Llama-3's rope_scaling dict stretches the low frequencies
    (transformers' `_compute_llama3_parameters`)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)
    if scaling is None or scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths (low frequencies) are divided by factor, short ones kept, the band
    # between them interpolated smoothly
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions, head_dim: int, theta: float = 10000.0, scaling: dict | None = None):
    """RoPE's (cos, sin) at positions (T,) or (B, T): (T, H/2) or (B, T, H/2), float32."""
    inv_freq = jnp.asarray(rope_inv_freq(head_dim, theta, scaling))  # (H/2,)
    inv_freq = inv_freq.reshape((1,) * positions.ndim + (-1,))  # (1.., H/2)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (T, H/2) or (B, T, H/2)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, positions, theta: float = 10000.0, scaling: dict | None = None) -> jax.Array:
    """Rotary position embedding (rotate-half form) of x (B, T, N, H) at positions (T,) or (B, T).

    Pairs (x[i], x[i + H/2]) are rotated by the angle pos * inv_freq[i], so the dot product of
    a rotated query and key depends only on their relative position. Computed in float32.
    """
    cos, sin = rope_tables(positions, x.shape[-1], theta, scaling)
    lead = (None,) if positions.ndim == 1 else ()
    cos, sin = cos[(*lead, ..., None, slice(None))], sin[(*lead, ..., None, slice(None))]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # (B, T, N, H/2) each
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # (B, T, N, H)
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------------- attention
ATTENTION_KERNELS = ("auto", "xla", "cudnn")


def platform() -> str:
    """The platform name: cuda on an NVIDIA GPU, else JAX's backend (cpu, tpu, gpu for ROCm)."""
    backend = jax.default_backend()
    if backend == "gpu" and "cuda" in jax.devices()[0].client.platform_version.lower():
        return "cuda"
    return backend


def choose_attention(requested: str, dtype, head_dim: int, on: str | None = None):
    """`(kernel, reason)`: the attention kernel ("xla" or "cudnn") that `requested` (auto | xla |
    cudnn) gives for `dtype` operands with `head_dim` on platform `on` (default: this one).

    cuDNN's fused (flash) kernel needs an NVIDIA GPU, bfloat16 or float16 operands and a head dim
    that is a multiple of 8 up to 128; "auto" takes it when all hold, else XLA's own attention.
    An explicit "cudnn" that cannot run is a one-line ValueError naming the fix.

    >>> choose_attention("auto", jnp.bfloat16, 64, on="cuda")[0]
    'cudnn'
    >>> choose_attention("auto", jnp.float32, 64, on="cuda")[0]
    'xla'
    """
    if requested not in ATTENTION_KERNELS:
        close = difflib.get_close_matches(str(requested), ATTENTION_KERNELS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"model.attention={requested!r}: use one of {', '.join(ATTENTION_KERNELS)}{hint}"
        )
    on = on or platform()
    dtype = jnp.dtype(dtype)
    if on != "cuda":
        why_not = f"cuDNN's fused attention needs an NVIDIA GPU; this backend is {on}"
    elif dtype not in (jnp.bfloat16, jnp.float16):
        why_not = f"cuDNN's fused attention takes bfloat16 or float16, not {dtype.name}"
    elif head_dim > 128 or head_dim % 8:
        why_not = f"cuDNN's fused attention takes a head dim of 8, 16, ... 128, not {head_dim}"
    else:
        why_not = None
    if requested == "xla":
        return "xla", "as configured (model.attention=xla)"
    if requested == "cudnn" and why_not:
        raise ValueError(
            f"model.attention=cudnn cannot run here: {why_not}; use model.attention=auto "
            "(XLA's attention where cuDNN's cannot run) or model.attention=xla"
        )
    if why_not:
        return "xla", why_not
    return "cudnn", f"cuDNN's fused kernel ({dtype.name}, head dim {head_dim})"


def _causal_probs(q, k):
    """Softmax over keys of the scaled, causally masked logits, float32: (B, N, T, S)."""
    T, S = q.shape[1], k.shape[1]
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
    logits = logits * np.float32(1.0 / math.sqrt(q.shape[-1]))
    causal = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None]  # (T, S)
    logits = jnp.where(causal, logits, -jnp.inf)  # the diagonal is never masked
    exp = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    return exp / jnp.sum(exp, axis=-1, keepdims=True)


@jax.custom_vjp
def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal softmax attention of q, k, v (B, T, N, H) -> (B, T, N, H).

    The same math as XLA's `jax.nn.dot_product_attention(..., is_causal=True)`: logits and
    softmax in float32, probabilities in the operands' dtype. Its own backward pass saves the
    probabilities and, for the softmax's gradient, reduces dy * y over the head dim instead of
    the (T, S) products over keys, and needs no mask (masked probabilities are 0).
    """
    return _causal_attention_fwd(q, k, v)[0]


def _causal_attention_fwd(q, k, v):
    probs = _causal_probs(q, k).astype(v.dtype)  # (B, N, T, S)
    y = jnp.einsum("bnts,bsnh->btnh", probs, v)
    return y, (q, k, v, probs, y)


def _causal_attention_bwd(residuals, dy):
    q, k, v, probs, y = residuals
    dv = jnp.einsum("bnts,btnh->bsnh", probs, dy)
    dp = jnp.einsum("btnh,bsnh->bnts", dy, v, preferred_element_type=jnp.float32)
    delta = jnp.einsum("btnh,btnh->bnt", dy.astype(jnp.float32), y.astype(jnp.float32))
    scale = np.float32(1.0 / math.sqrt(q.shape[-1]))
    ds = (probs.astype(jnp.float32) * (dp - delta[..., None]) * scale).astype(q.dtype)
    dq = jnp.einsum("bnts,bsnh->btnh", ds, k)
    dk = jnp.einsum("bnts,btnh->bsnh", ds, q)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)


class Attention(nnx.Module):
    """Causal self-attention with K kv heads shared by G = N // K query heads each (MHA: K = N,
    MQA: K = 1), RoPE on queries and keys unless `rope=False` (learned positions).

    q, k and v come from one matmul with `wqkv` (D, K, G + 2, H): along axis 2, the G query
    heads of kv group k (query head n = k * G + g, Hugging Face's `repeat_kv` order), then key
    head k, then value head k. Under tensor parallelism the kv groups split over "heads", so
    each device holds whole groups and attention needs no communication.
    """

    def __init__(self, embed_dim, num_heads, num_kv_heads, head_dim, *, rope=True,
                 rope_theta=10000.0, rope_scaling=None, qkv_bias=False, out_bias=False,
                 out_std, policy, rngs, implementation="auto", matmul="xla"):  # fmt: skip
        D, N, K, H = embed_dim, num_heads, num_kv_heads, head_dim
        G = N // K
        self.policy, self.num_heads, self.num_kv_heads = policy, N, K
        self.rope, self.rope_theta = rope, rope_theta
        # the kernel for causal attention without a cache (training, prefill): xla | cudnn
        self.implementation = choose_attention(implementation, policy.compute_dtype, H)[0]
        self.matmul = matmul  # projections and causal attention's products: xla | mkl
        # a tuple, not a dict: static module data must be hashable
        self.rope_scaling = None if rope_scaling is None else tuple(sorted(rope_scaling.items()))
        dtype = policy.param_dtype
        self.wqkv = param(rngs, (D, K, G + 2, H), ("embed", "heads", None, "kv"), 0.02, dtype)
        self.wo = param(rngs, (N, H, D), ("heads", "kv", "embed"), out_std, dtype)
        if qkv_bias:
            self.bqkv = param(rngs, (K, G + 2, H), ("heads", None, "kv"), 0.0, dtype)
        if out_bias:
            self.bo = param(rngs, (D,), ("embed",), 0.0, dtype)

    def __call__(self, x, positions, mask=None, cache=None, index=None):
        """x (B, T, D) at positions (T,) or (B, T) -> ((B, T, D), cache).

        `mask` (B, 1, T, S) bool says which keys each query sees; None means plain causal.
        With a `cache` {"k", "v"} (B, L, K, H), the new keys/values are written at slot `index`
        and the queries attend over all L slots (the caller's mask keeps them causal).
        """
        dtype = self.policy.compute_dtype
        B, T, _ = x.shape
        G = self.num_heads // self.num_kv_heads
        wqkv = self.wqkv[...].astype(dtype)
        qkv = project("btd,dkgh->btkgh", x, wqkv, self.matmul)  # (B, T, K, G+2, H)
        qkv = adapted(self, "wqkv", x, qkv)  # + its LoRA adapter's, if any (jaxnv.models.lora)
        if hasattr(self, "bqkv"):
            qkv = qkv + self.bqkv[...].astype(dtype)[None, None]
        scaling = None if self.rope_scaling is None else dict(self.rope_scaling)
        if self.matmul == "mkl" and mask is None and cache is None:
            # one fused MKL call each way: RoPE, the products and the softmax from the packed
            # projection, whose gradient comes back packed (no split, no concatenation)
            H = qkv.shape[-1]
            tables = rope_tables(positions, H, self.rope_theta, scaling) if self.rope else ()
            y = mkl.packed_causal_attention(qkv, *tables).astype(dtype)  # (B, T, N, H)
            return self._out(y), cache
        # a split (whose gradient is one concatenation), not slices (padded copies each)
        q, k, v = jnp.split(qkv, [G, G + 1], axis=3)
        q = q.reshape(B, T, self.num_heads, -1)  # (B, T, N, H): head n = k * G + g
        k, v = k[:, :, :, 0], v[:, :, :, 0]  # (B, T, K, H) each
        if self.rope:
            q = apply_rope(q, positions, self.rope_theta, scaling)
            k = apply_rope(k, positions, self.rope_theta, scaling)
        if cache is not None:
            start = (0, index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
            cache = {"k": k, "v": v}  # (B, L, K, H) each
        # attention accumulates in float32; float16 operands are upcast where the backend lacks
        # that dot (the CPU), and the output comes back in the compute dtype. With K < N, both
        # kernels group query heads n = k * G + g onto kv head k, our layout. cuDNN's runs the
        # plain causal case; a mask (packed rows, a cache's slots) goes through XLA's.
        op = accumulating_dtype(dtype)
        q, k, v = q.astype(op), k.astype(op), v.astype(op)
        if self.implementation == "xla" and mask is None and cache is None and G == 1:
            y = causal_attention(q, k, v)  # XLA's attention, with a leaner backward pass
        else:
            kernel = self.implementation if mask is None and cache is None else "xla"
            y = jax.nn.dot_product_attention(
                q, k, v, mask=mask, is_causal=mask is None, implementation=kernel
            )
        return self._out(y.astype(dtype)), cache

    def _out(self, y):
        """The output projection of y (B, T, N, H) -> (B, T, D), with its adapter and bias."""
        dtype = self.policy.compute_dtype
        out = project("btnh,nhd->btd", y, self.wo[...].astype(dtype), self.matmul)  # (B, T, D)
        y = adapted(self, "wo", y, out)
        if hasattr(self, "bo"):
            y = y + self.bo[...].astype(dtype)[None, None]
        return y


# ----------------------------------------------------------------------------------------- MLP
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gated(act, gate_up: jax.Array) -> jax.Array:
    """act(gate) * up from the packed (..., 2, F) gate/up projection -> (..., F).

    Its gradient comes back packed, written in one pass: autodiff would slice the two halves
    and concatenate their gradients, two more copies of the widest activation.
    """
    return act(gate_up[..., 0, :]) * gate_up[..., 1, :]


def _gated_fwd(act, gate_up):
    return gated(act, gate_up), gate_up


def _gated_bwd(act, gate_up, d_hidden):
    gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
    activated, act_vjp = jax.vjp(act, gate)
    (d_gate,) = act_vjp(d_hidden * up)
    return (jnp.stack([d_gate, d_hidden * activated], axis=-2),)


gated.defvjp(_gated_fwd, _gated_bwd)


class FeedForward(nnx.Module):
    """The MLP of a block. `gated=True` (Llama): act(x W_gate) * (x W_up) then W_down, with
    W_gate and W_up one (D, 2, F) param `w_gate_up`. `gated=False` (GPT-2): act(x W_up + b_up)
    W_down + b_down, biases only with `bias=True`."""

    def __init__(self, embed_dim, mlp_dim, *, gated=True, bias=False, activation, out_std,
                 policy, rngs, matmul="xla"):  # fmt: skip
        D, F, dtype = embed_dim, mlp_dim, policy.param_dtype
        self.policy, self.gated, self.matmul = policy, gated, matmul
        self.act = TRANSFORMER_ACTIVATIONS[activation]
        self.mkl_gate = gated and matmul == "mkl" and activation == "silu"  # one fused pass
        if gated:
            self.w_gate_up = param(rngs, (D, 2, F), ("embed", None, "mlp"), 0.02, dtype)
        else:
            self.w_up = param(rngs, (D, F), ("embed", "mlp"), 0.02, dtype)
        self.w_down = param(rngs, (F, D), ("mlp", "embed"), out_std, dtype)
        if bias:
            self.b_up = param(rngs, (F,), ("mlp",), 0.0, dtype)
            self.b_down = param(rngs, (D,), ("embed",), 0.0, dtype)

    def __call__(self, x):
        dtype = self.policy.compute_dtype
        if self.gated:
            gate_up = project("btd,dcf->btcf", x, self.w_gate_up[...].astype(dtype), self.matmul)
            gate_up = adapted(self, "w_gate_up", x, gate_up)  # (B, T, 2, F)
            if self.mkl_gate:  # silu(gate) * up; its gradient comes back as one (B, T, 2, F)
                hidden = mkl.silu_gate(gate_up).astype(dtype)
            else:
                hidden = gated(self.act, gate_up)  # act(gate) * up, (B, T, F)
        else:
            hidden = project("btd,df->btf", x, self.w_up[...].astype(dtype), self.matmul)
            hidden = adapted(self, "w_up", x, hidden)
            if hasattr(self, "b_up"):
                hidden = hidden + self.b_up[...].astype(dtype)[None, None]
            hidden = self.act(hidden)
        out = project("btf,fd->btd", hidden, self.w_down[...].astype(dtype), self.matmul)
        out = adapted(self, "w_down", hidden, out)
        if hasattr(self, "b_down"):
            out = out + self.b_down[...].astype(dtype)[None, None]
        return out
