"""A decoder-only transformer language model: RoPE, pre-norm RMSNorm blocks, gated MLP.

    model = Transformer(vocab_size=65, num_layers=4, embed_dim=256, rngs=nnx.Rngs(0))
    logits = model(tokens)                         # (B, T) int32 -> (B, T, 65)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    out = generate(graphdef, params, prompt, 100, rng=key, top_k=10)   # (B, T0 + 100)

Shapes in comments: B batch, T sequence, D embed, N heads, H head dim (kv), F mlp, V padded vocab,
L cache length. Matmuls run in `policy.compute_dtype`; norms, RoPE, attention softmax and
sampling in float32. Attention is `jax.nn.dot_product_attention`, whose XLA implementation
computes the q.k logits and the softmax in float32 even for bf16/fp16 inputs (and then casts the
probabilities back for the value matmul), so no manual upcast is needed.

Decoding is functional: `model.init_cache(B, L)` returns a list (one entry per layer) of
`{"k", "v"}` arrays of shape (B, L, N, H); `model.decode(tokens, cache, index)` writes the new
keys/values at `index` and returns `(logits, cache)`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnv.core.precision import Policy, accumulating_dtype, get_policy
from jaxnv.models.mlp import get_activation
from jaxnv.models.sharding import unsharded_init

REMAT_POLICIES = {
    "none": None,
    "full": None,  # save nothing inside a block: recompute it all on the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep projections
}
GATED_ACTIVATIONS = ("silu", "gelu", "relu", "relu2")

Cache = list  # one {"k": (B, L, N, H), "v": (B, L, N, H)} dict per layer


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def default_mlp_dim(embed_dim: int) -> int:
    """8/3 * embed_dim rounded up to a multiple of 128.

    A gated MLP has three matrices, so 8/3 * D gives the same parameters and FLOPs as the classic
    two-matrix 4 * D MLP (as in LLaMA); the rounding keeps the matmuls tensor-core friendly.
    """
    return round_up(math.ceil(8 * embed_dim / 3), 128)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / rms(x) * scale over the last axis, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)  # (..., D)
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)  # (..., 1)
    scale32 = scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))  # (1.., D)
    return (x32 * inv_rms * scale32).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotary position embedding (rotate-half form) of x (B, T, N, H) at positions (T,).

    Pairs (x[i], x[i + H/2]) are rotated by the angle pos * theta**(-2i/H), so the dot product of
    a rotated query and key depends only on their relative position. Computed in float32.
    """
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # (H/2,)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # (T, H/2)
    cos = jnp.cos(angles)[None, :, None, :]  # (1, T, 1, H/2)
    sin = jnp.sin(angles)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # (B, T, N, H/2) each
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # (B, T, N, H)
    return out.astype(x.dtype)


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _param(rngs: nnx.Rngs, shape, names, std: float, dtype, *, vocab_size: int | None = None):
    """A normal(0, std) param with logical axis `names`; padded 'vocab' entries are zero."""

    def init(key, shape, dtype):
        value = std * jax.random.normal(key, shape, dtype)
        if vocab_size is None:
            return value
        padded = tuple(slice(vocab_size, None) if n == "vocab" else slice(None) for n in names)
        return value.at[padded].set(0)

    return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, dtype))


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned ('embed',) scale; float32 inside."""

    def __init__(self, dim: int, *, policy: Policy, eps: float = 1e-6):
        ones = nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",))
        self.scale = nnx.Param(ones(None, (dim,), policy.param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


class Attention(nnx.Module):
    """Multi-head causal self-attention with RoPE on queries and keys."""

    def __init__(self, embed_dim, num_heads, *, rope_theta, out_std, policy, rngs):
        D, N, H = embed_dim, num_heads, embed_dim // num_heads
        self.policy, self.rope_theta = policy, rope_theta
        # q, k and v in one (D, 3, N, H) param: one matmul each way, and under tensor parallelism
        # one all-reduce of the input gradient instead of three
        names = ("embed", None, "heads", "kv")
        self.wqkv = _param(rngs, (D, 3, N, H), names, 0.02, policy.param_dtype)
        self.wo = _param(rngs, (N, H, D), ("heads", "kv", "embed"), out_std, policy.param_dtype)

    def __call__(self, x, positions, cache=None, index=None):
        """x (B, T, D) at positions (T,) -> ((B, T, D), cache); `cache` None means no cache."""
        dtype = self.policy.compute_dtype
        qkv = jnp.einsum("btd,dcnh->btcnh", x, self.wqkv[...].astype(dtype))  # (B, T, 3, N, H)
        # a split (whose gradient is one concatenation), not three slices (three padded copies)
        q, k, v = (t[:, :, 0] for t in jnp.split(qkv, 3, axis=2))  # (B, T, N, H) each
        q = apply_rope(q, positions, self.rope_theta)
        k = apply_rope(k, positions, self.rope_theta)
        # attention accumulates in float32; float16 operands are upcast where the backend lacks
        # that dot (the CPU), and the output comes back in the compute dtype
        op = accumulating_dtype(dtype)
        q, k, v = q.astype(op), k.astype(op), v.astype(op)
        if cache is None:
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # (B, T, N, H)
        else:
            # `is_causal` aligns the mask top-left (query t sees keys <= t), which is wrong when
            # queries start at `index`: mask by absolute position instead. Keys at slots
            # <= the query's position are exactly the filled ones, so empty slots are masked.
            start = (0, index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
            cache = {"k": k, "v": v}  # (B, L, N, H) each
            slots = jnp.arange(k.shape[1], dtype=positions.dtype)  # (L,)
            mask = (slots[None, :] <= positions[:, None])[None, None]  # (1, 1, T, L)
            y = jax.nn.dot_product_attention(q, k.astype(op), v.astype(op), mask=mask)
        y = y.astype(dtype)
        return jnp.einsum("btnh,nhd->btd", y, self.wo[...].astype(dtype)), cache  # (B, T, D)


class GatedMLP(nnx.Module):
    """act(x W_gate) * (x W_up), then W_down; W_gate and W_up are one (D, 2, F) param."""

    def __init__(self, embed_dim, mlp_dim, *, activation, out_std, policy, rngs):
        D, F = embed_dim, mlp_dim
        self.policy, self.act = policy, get_activation(activation)
        names = ("embed", None, "mlp")
        self.w_gate_up = _param(rngs, (D, 2, F), names, 0.02, policy.param_dtype)
        self.w_down = _param(rngs, (F, D), ("mlp", "embed"), out_std, policy.param_dtype)

    def __call__(self, x):
        dtype = self.policy.compute_dtype
        gate_up = jnp.einsum("btd,dcf->btcf", x, self.w_gate_up[...].astype(dtype))  # (B,T,2,F)
        gate, up = (t[:, :, 0] for t in jnp.split(gate_up, 2, axis=2))  # (B, T, F) each
        hidden = self.act(gate) * up  # (B, T, F)
        return jnp.einsum("btf,fd->btd", hidden, self.w_down[...].astype(dtype))


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, embed_dim, num_heads, mlp_dim, *, activation, dropout, rope_theta,
                 out_std, policy, rngs):  # fmt: skip
        self.dropout = dropout
        self.attn_norm = RMSNorm(embed_dim, policy=policy)
        self.attn = Attention(
            embed_dim, num_heads, rope_theta=rope_theta, out_std=out_std, policy=policy, rngs=rngs
        )
        self.mlp_norm = RMSNorm(embed_dim, policy=policy)
        self.mlp = GatedMLP(
            embed_dim, mlp_dim, activation=activation, out_std=out_std, policy=policy, rngs=rngs
        )

    def __call__(self, x, positions, rng=None, cache=None, index=None):
        rngs = (None, None) if rng is None else jax.random.split(rng)
        h, cache = self.attn(self.attn_norm(x), positions, cache, index)  # (B, T, D)
        x = x + _dropout(h, self.dropout, rngs[0])
        x = x + _dropout(self.mlp(self.mlp_norm(x)), self.dropout, rngs[1])  # (B, T, D)
        return x, cache


def batch_sharded(x: jax.Array) -> jax.Array:
    """Constrain an activation to the batch layout of the mesh in context (if any): rows split
    over the batch axes, every other dim whole. Without it, XLA may choose to move activations
    instead of weights under fsdp."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not {"data", "fsdp"} <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(("data", "fsdp")))


def _run_blocks_remat(blocks, x, positions, rng, remat: str):
    """All blocks over x (B, T, D), each under `jax.checkpoint` with the `remat` saving policy,
    as one `lax.scan` over the blocks' stacked params.

    The scan is what makes remat save memory: with the blocks unrolled, XLA is free to hoist
    every block's recomputation into the forward pass, where all of them are alive at once; under
    the scan, the backward of one block at a time needs its recomputed activations
    (docs/performance.md). Stacking copies the blocks' params once per step:
    weight-sized, small next to the activations it saves. Plain `jax.checkpoint` over the state:
    nothing is written back to the modules, so this also works on a model captured from outside
    the trace (where nnx.remat would refuse).
    """
    graphdef = nnx.graphdef(blocks[0])
    states = [nnx.state(block) for block in blocks]
    stacked = jax.tree.map(lambda *layers: jnp.stack(layers), *states)  # leading (L,) axis

    def run(state, x, rng):
        return nnx.merge(graphdef, state)(x, positions, rng)[0]

    run = jax.checkpoint(run, policy=REMAT_POLICIES[remat], prevent_cse=False)

    def body(x, layer):
        i, state = layer
        block_rng = None if rng is None else jax.random.fold_in(rng, i + 1)
        return batch_sharded(run(state, x, block_rng)), None

    layers = jnp.arange(len(blocks), dtype=jnp.int32)
    return jax.lax.scan(body, x, (layers, stacked))[0]


class Transformer(nnx.Module):
    """Decoder-only language model: tokens (B, T) int -> logits (B, T, vocab_size).

    The vocabulary is padded to a multiple of `vocab_multiple` (params have `padded_vocab`
    rows, zero-initialised past `vocab_size`); logits are computed over the padded vocabulary and
    sliced back, so a padded id can never be predicted. `mlp_dim` defaults to
    `default_mlp_dim(embed_dim)`. `remat` rematerialises each block on the backward pass:
    "none", "full" (save nothing) or "dots" (save matmul outputs without batch dims, i.e. the
    projections; recompute attention and elementwise ops).

        model = Transformer(37, num_layers=2, num_heads=2, embed_dim=32, rngs=nnx.Rngs(0))
        logits = model(jnp.zeros((4, 16), jnp.int32))  # (4, 16, 37)
    """

    @unsharded_init
    def __init__(
        self,
        vocab_size: int,
        *,
        num_layers: int = 4,
        num_heads: int = 4,
        embed_dim: int = 256,
        mlp_dim: int | None = None,
        max_seq_len: int = 256,
        activation: str = "silu",
        tie_embeddings: bool = True,
        remat: str = "none",
        dropout: float = 0.0,
        rope_theta: float = 10000.0,
        vocab_multiple: int = 128,
        policy: Policy | str | None = None,
        rngs: nnx.Rngs,
    ):
        if activation not in GATED_ACTIVATIONS:
            raise ValueError(
                f"model.activation={activation!r} is not supported by the transformer's gated "
                f"MLP: use one of {', '.join(GATED_ACTIVATIONS)}"
            )
        if remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={remat!r}: use one of {', '.join(REMAT_POLICIES)}")
        if embed_dim % num_heads or (embed_dim // num_heads) % 2:
            raise ValueError(
                f"model.embed_dim={embed_dim} must be num_heads={num_heads} times an even head "
                "dim (RoPE rotates pairs): change model.embed_dim or model.num_heads"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.dropout={dropout} must lie in [0, 1)")
        self.policy = policy = get_policy(policy)
        self.vocab_size, self.vocab_multiple = vocab_size, vocab_multiple
        self.padded_vocab = V = round_up(vocab_size, vocab_multiple)
        self.embed_dim = D = embed_dim
        self.mlp_dim = default_mlp_dim(embed_dim) if mlp_dim is None else mlp_dim
        self.num_layers, self.num_heads, self.max_seq_len = num_layers, num_heads, max_seq_len
        self.tie_embeddings, self.remat, self.dropout = tie_embeddings, remat, dropout
        out_std = 0.02 / math.sqrt(2 * num_layers)  # GPT-2: residual projections scaled by depth
        self.embedding = _param(
            rngs, (V, D), ("vocab", "embed"), 0.02, policy.param_dtype, vocab_size=vocab_size
        )
        self.blocks = nnx.List(
            Block(D, num_heads, self.mlp_dim, activation=activation, dropout=dropout,
                  rope_theta=rope_theta, out_std=out_std, policy=policy, rngs=rngs)
            for _ in range(num_layers)
        )  # fmt: skip
        self.final_norm = RMSNorm(D, policy=policy)
        if not tie_embeddings:
            self.head = _param(
                rngs, (D, V), ("embed", "vocab"), 0.02, policy.param_dtype, vocab_size=vocab_size
            )

    def _check_length(self, length, what="sequence length", fix="use shorter sequences"):
        if length > self.max_seq_len:
            raise ValueError(
                f"{what} {length} exceeds model.max_seq_len={self.max_seq_len}: {fix} or raise "
                "model.max_seq_len"
            )

    def _embed(self, tokens: jax.Array) -> jax.Array:
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(
                f"tokens must be (batch, seq) integer ids, got {tokens.dtype} {tokens.shape}: "
                "cast with tokens.astype(jnp.int32)"
            )
        self._check_length(tokens.shape[1])
        x = jnp.take(self.embedding[...], tokens, axis=0)  # (B, T, D)
        return x.astype(self.policy.compute_dtype)

    def _logits(self, x: jax.Array) -> jax.Array:
        x = self.final_norm(x)  # (B, T, D)
        dtype = self.policy.compute_dtype
        if self.tie_embeddings:
            logits = jnp.einsum("btd,vd->btv", x, self.embedding[...].astype(dtype))  # (B, T, V)
        else:
            logits = jnp.einsum("btd,dv->btv", x, self.head[...].astype(dtype))  # (B, T, V)
        return self.policy.cast_to_output(logits[..., : self.vocab_size])  # (B, T, vocab_size)

    def __call__(self, tokens: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Logits (B, T, vocab_size) for tokens (B, T); pass `rng` to turn dropout on."""
        x = self._embed(tokens)  # (B, T, D)
        x = _dropout(x, self.dropout, None if rng is None else jax.random.fold_in(rng, 0))
        positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)  # (T,)
        if self.remat != "none":
            return self._logits(_run_blocks_remat(self.blocks, x, positions, rng, self.remat))
        for i, block in enumerate(self.blocks):
            block_rng = None if rng is None else jax.random.fold_in(rng, i + 1)
            x = block(x, positions, block_rng)[0]  # (B, T, D)
            x = batch_sharded(x)  # the residual stream: rows split, features whole
        return self._logits(x)

    def init_cache(self, batch: int, max_len: int | None = None) -> Cache:
        """An empty KV cache: per layer {"k", "v"} zeros (B, max_len, N, H) in the compute dtype."""
        max_len = self.max_seq_len if max_len is None else max_len
        self._check_length(max_len, "cache length")
        shape = (batch, max_len, self.num_heads, self.embed_dim // self.num_heads)
        zeros = jnp.zeros(shape, self.policy.compute_dtype)
        return [{"k": zeros, "v": zeros} for _ in range(self.num_layers)]

    def decode(self, tokens: jax.Array, cache: Cache, index) -> tuple[jax.Array, Cache]:
        """Logits (B, T, vocab_size) for tokens (B, T) at positions index..index+T-1 given the
        keys/values of positions < index in `cache`; returns them with the updated cache.

        `index` may be traced; the caller keeps index + T <= the cache length (a write past
        the end would be clamped by `dynamic_update_slice`). No dropout.
        """
        x = self._embed(tokens)  # (B, T, D)
        positions = jnp.asarray(index, jnp.int32) + jnp.arange(tokens.shape[1], dtype=jnp.int32)
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            x, layer_cache = block(x, positions, None, layer_cache, index)  # (B, T, D)
            new_cache.append(layer_cache)
        return self._logits(x), new_cache

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token at `seq_len` (default max_seq_len); see `flops_per_token`."""
        return flops_per_token(
            self.vocab_size, seq_len=self.max_seq_len if seq_len is None else seq_len,
            num_layers=self.num_layers, embed_dim=self.embed_dim, mlp_dim=self.mlp_dim,
            tie_embeddings=self.tie_embeddings, vocab_multiple=self.vocab_multiple,
        )  # fmt: skip


def num_params(vocab_size: int, *, num_layers: int = 4, embed_dim: int = 256,
               mlp_dim: int | None = None, tie_embeddings: bool = True,
               vocab_multiple: int = 128) -> int:  # fmt: skip
    """Parameter count of a `Transformer` with these settings (padded vocabulary included)."""
    V, D = round_up(vocab_size, vocab_multiple), embed_dim
    F = default_mlp_dim(D) if mlp_dim is None else mlp_dim
    per_layer = 4 * D * D + 3 * D * F + 2 * D  # q, k, v, o; gate, up, down; two norm scales
    return V * D * (1 if tie_embeddings else 2) + num_layers * per_layer + D


def flops_per_token(vocab_size: int, *, seq_len: int, num_layers: int = 4, embed_dim: int = 256,
                    mlp_dim: int | None = None, tie_embeddings: bool = True,
                    vocab_multiple: int = 128) -> float:  # fmt: skip
    """Training (forward + backward) FLOPs per token: 6 * N + 12 * L * T * D.

    N counts the params that take part in matmuls: all of them, less the input embedding table
    when the head is untied (a lookup costs no FLOPs; with tied embeddings the table is counted
    once, as the head). Each such param does a multiply-add (2 FLOPs) per token forward and two
    backward: 6N. Attention adds q.k^T and probs.v: 2 * 2 * T * D forward per layer and token,
    times 3 for forward + backward: 12 * L * T * D (the full T x T square, as in nanoGPT and
    PaLM's MFU, although the causal half is masked).
    """
    n = num_params(vocab_size, num_layers=num_layers, embed_dim=embed_dim, mlp_dim=mlp_dim,
                   tie_embeddings=tie_embeddings, vocab_multiple=vocab_multiple)  # fmt: skip
    if not tie_embeddings:
        n -= round_up(vocab_size, vocab_multiple) * embed_dim
    return float(6 * n + 12 * num_layers * seq_len * embed_dim)


def _sample(logits: jax.Array, rng, temperature: float, top_k: int | None) -> jax.Array:
    """Token ids (B,) from logits (B, V): argmax at temperature 0, else top-k sampling."""
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits / temperature, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=64)
def _make_generate(graphdef, num_new_tokens: int, temperature: float, top_k: int | None):
    """The jitted generate for one static configuration (jit itself caches per shape)."""

    def run(params, model_state, prompt, rng):
        model = nnx.merge(graphdef, params, model_state)
        model.eval()  # NNX's eval mode: no dropout
        B, T0 = prompt.shape
        if top_k is not None and not 1 <= top_k <= model.vocab_size:
            raise ValueError(f"top_k={top_k} must lie in [1, vocab_size={model.vocab_size}]")
        total = T0 + num_new_tokens
        what = f"prompt length {T0} + {num_new_tokens} new tokens ="
        model._check_length(total, what, "shorten the prompt, generate fewer tokens")
        if num_new_tokens == 0:
            return prompt
        key = (lambda i: None) if rng is None else (lambda i: jax.random.fold_in(rng, i))
        cache = model.init_cache(B, total)
        logits, cache = model.decode(prompt, cache, 0)  # prefill: (B, T0, vocab)
        first = _sample(logits[:, -1], key(0), temperature, top_k)  # (B,)

        def step(carry, i):
            token, cache = carry  # (B,)
            logits, cache = model.decode(token[:, None], cache, T0 + i)  # (B, 1, vocab)
            token = _sample(logits[:, -1], key(i + 1), temperature, top_k)  # (B,)
            return (token, cache), token

        steps = jnp.arange(num_new_tokens - 1, dtype=jnp.int32)
        _, rest = jax.lax.scan(step, (first, cache), steps)  # (n - 1, B)
        return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)  # (B, T0 + n)

    return jax.jit(run)


def generate(graphdef, params, prompt, num_new_tokens: int, *, rng=None, temperature=1.0,
             top_k: int | None = None, model_state=None) -> jax.Array:  # fmt: skip
    """Continue `prompt` (B, T0) by `num_new_tokens` tokens with a KV cache -> (B, T0 + n) int32.

    The prompt is prefilled once, then one token is decoded per `lax.scan` step over a fixed-size
    cache. `temperature=0` is greedy (argmax, no `rng` needed); otherwise tokens are sampled from
    softmax(logits / temperature), restricted to the `top_k` most likely when given. Compiled once
    per (graphdef, num_new_tokens, temperature, top_k) and prompt shape.

        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tokens = generate(graphdef, params, prompt, 20, temperature=0.0)
    """
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise TypeError(
            f"prompt must be (batch, seq) integer ids, got {prompt.dtype} {prompt.shape}"
        )
    if prompt.shape[1] == 0 or num_new_tokens < 0:
        raise ValueError("generate needs a non-empty prompt and num_new_tokens >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy)")
    if temperature > 0 and rng is None:
        raise ValueError("sampling with temperature > 0 needs rng=jax.random.key(seed)")
    fn = _make_generate(graphdef, int(num_new_tokens), float(temperature), top_k)
    model_state = {} if model_state is None else model_state
    return fn(params, model_state, prompt.astype(jnp.int32), None if temperature == 0 else rng)
