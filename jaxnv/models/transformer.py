"""A decoder-only transformer language model; the common open architectures are config switches.

    model = Transformer(vocab_size=65, num_layers=4, embed_dim=256, rngs=nnx.Rngs(0))
    logits = model(tokens)                         # (B, T) int32 -> (B, T, 65)
    logits = model(tokens, positions=pos, segment_ids=seg)   # packed rows of several documents

The defaults are jaxnv's own model: RoPE, pre-norm RMSNorm blocks, a gated MLP, tied embeddings.
The switches cover Llama / Mistral / Qwen2 (`num_kv_heads` for GQA, `head_dim`, `rope_theta`,
Llama-3 `rope_scaling`, `qkv_bias`, untied head) and GPT-2 (`position="learned"`,
`norm="layer"`, `mlp="plain"`, `activation="gelu_tanh"`, `qkv_bias`, `out_bias`, `mlp_bias`);
the layers are in `jaxnv.models.layers`, generation in `jaxnv.models.generate`.

Shapes in comments: B batch, T sequence, D embed, N heads, K kv heads, H head dim, F mlp,
V padded vocab, L cache length. Matmuls run in `policy.compute_dtype`; norms, RoPE, attention
softmax and sampling in float32. Attention is `jax.nn.dot_product_attention`, whose XLA
implementation computes the q.k logits and the softmax in float32 even for bf16/fp16 inputs.

The blocks are stored stacked: `model.blocks` is one `Block` whose params carry a leading
(L,) axis named "layers" (`blocks/attn/wqkv` is (L, D, K, G+2, H)); `layer(model.blocks, i)`
gives block i. The remat scan runs over the stack as it is, and a pipeline's `stage` mesh axis
splits it, so each stage holds only its own layers (`jaxnv.models.blocks`).

Decoding is functional: `model.init_cache(B, L)` returns {"layers": [{"k", "v"} (B, L, K, H) per
layer], "valid": (B, L) bool}; `model.decode(tokens, cache, index, positions, valid)` writes the
new keys/values at slot `index` and returns `(logits, cache)`. Slots marked invalid (the padding
of a shorter prompt) are never attended.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnv.core.precision import Policy, get_policy
from jaxnv.models import mkl
from jaxnv.models.blocks import (  # noqa: F401  (stack_layers, layer: public names here too)
    REMAT_POLICIES,
    Block,
    _run_blocks,
    _run_blocks_pipelined,
    _run_blocks_remat,
    _stages_in_context,
    batch_sharded,
    layer,
    num_stacked,
    stack_layers,
)
from jaxnv.models.layers import (
    NORMS,
    TRANSFORMER_ACTIVATIONS,
    Norm,
    apply_rope,
    check_rope_scaling,
    choose_attention,
    dropout,
    param,
    project,
    rms_norm,
)
from jaxnv.models.mkl import choose_matmul
from jaxnv.models.sharding import unsharded_init

POSITIONS = ("rope", "learned")
MLPS = ("gated", "plain")

Cache = dict  # {"layers": [{"k": (B, L, K, H), "v": (B, L, K, H)} per layer], "valid": (B, L)}

__all__ = ["Transformer", "apply_rope", "default_mlp_dim", "flops_per_token", "num_params",
           "rms_norm"]  # fmt: skip


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def default_mlp_dim(embed_dim: int, mlp: str = "gated") -> int:
    """4 * D for a plain MLP (GPT-2); for a gated one 8/3 * D rounded up to a multiple of 128.

    A gated MLP has three matrices, so 8/3 * D gives the same parameters and FLOPs as the classic
    two-matrix 4 * D MLP (as in LLaMA); the rounding keeps the matmuls tensor-core friendly.
    """
    if mlp == "plain":
        return 4 * embed_dim
    return round_up(math.ceil(8 * embed_dim / 3), 128)


def _check_args(embed_dim, num_heads, num_kv_heads, head_dim, position, rope_scaling, norm, mlp,
                activation, remat, dropout_rate) -> None:  # fmt: skip
    """One-line ValueErrors for settings the model cannot build, each naming the fix."""
    choices = [("position", position, POSITIONS), ("norm", norm, NORMS), ("mlp", mlp, MLPS),
               ("remat", remat, tuple(REMAT_POLICIES))]  # fmt: skip
    for key, value, allowed in choices:
        if value not in allowed:
            raise ValueError(f"model.{key}={value!r}: use one of {', '.join(allowed)}")
    if activation not in TRANSFORMER_ACTIVATIONS:
        raise ValueError(
            f"model.activation={activation!r} is not supported by the transformer's {mlp} "
            f"MLP: use one of {', '.join(TRANSFORMER_ACTIVATIONS)}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(
            f"model.num_heads={num_heads} must be a multiple of model.num_kv_heads="
            f"{num_kv_heads} (each kv head serves num_heads // num_kv_heads query heads)"
        )
    if head_dim is None and (embed_dim % num_heads or (embed_dim // num_heads) % 2):
        raise ValueError(
            f"model.embed_dim={embed_dim} must be num_heads={num_heads} times an even head "
            "dim (RoPE rotates pairs): change model.embed_dim or model.num_heads, or set "
            "model.head_dim"
        )
    if head_dim is not None and position == "rope" and head_dim % 2:
        raise ValueError(f"model.head_dim={head_dim} must be even (RoPE rotates pairs)")
    check_rope_scaling(rope_scaling)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"model.dropout={dropout_rate} must lie in [0, 1)")


def _int_array(x, shape, what: str) -> jax.Array:
    """x as an int32 array of `shape`; a one-line TypeError otherwise."""
    x = jnp.asarray(x)
    if x.shape != shape or not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(
            f"{what} must be integers of the tokens' shape {shape}, got {x.dtype} {x.shape}"
        )
    return x.astype(jnp.int32)


class Transformer(nnx.Module):
    """Decoder-only language model: tokens (B, T) int -> logits (B, T, vocab_size).

    The vocabulary is padded to a multiple of `vocab_multiple` (params have `padded_vocab`
    rows, zero-initialised past `vocab_size`); logits are computed over the padded vocabulary and
    sliced back, so a padded id can never be predicted. `mlp_dim` defaults to
    `default_mlp_dim(embed_dim, mlp)`. `remat` rematerialises each block on the backward pass:
    "none", "full" (save nothing) or "dots" (save matmul outputs without batch dims, i.e. the
    projections; recompute attention and elementwise ops). The other switches are listed in the
    module docstring; `init_kwargs()` returns them all.

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
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        position: str = "rope",
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        norm: str = "rms",
        norm_eps: float = 1e-6,
        mlp: str = "gated",
        qkv_bias: bool = False,
        out_bias: bool = False,
        mlp_bias: bool = False,
        vocab_multiple: int = 128,
        attention: str = "auto",
        matmul: str = "xla",
        policy: Policy | str | None = None,
        pipeline=None,
        rngs: nnx.Rngs,
    ):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _check_args(embed_dim, num_heads, num_kv_heads, head_dim, position, rope_scaling, norm,
                    mlp, activation, remat, dropout)  # fmt: skip
        self.policy = policy = get_policy(policy)
        self.vocab_size, self.vocab_multiple = vocab_size, vocab_multiple
        self.padded_vocab = V = round_up(vocab_size, vocab_multiple)
        self.embed_dim = D = embed_dim
        self.mlp_dim = default_mlp_dim(D, mlp) if mlp_dim is None else mlp_dim
        self.num_layers, self.num_heads, self.max_seq_len = num_layers, num_heads, max_seq_len
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads if head_dim is None else head_dim
        self.tie_embeddings, self.remat, self.dropout = tie_embeddings, remat, dropout
        # how the blocks run under a mesh with a pipeline `stage` axis: a hashable callable
        # (jaxnv.parallel.Pipeline; models may not import parallel, so it is handed in)
        self.pipeline = pipeline
        self.activation, self.position, self.rope_theta = activation, position, rope_theta
        # a tuple, not a dict: static module data must be hashable (init_kwargs gives a dict)
        self.rope_scaling = None if rope_scaling is None else tuple(sorted(rope_scaling.items()))
        self.norm, self.norm_eps, self.mlp = norm, norm_eps, mlp
        self.qkv_bias, self.out_bias, self.mlp_bias = qkv_bias, out_bias, mlp_bias
        self.attention = attention  # the attention kernel asked for: auto | xla | cudnn
        # ...and the one it gives here, chosen once (models/layers.py: choose_attention)
        self.attention_kernel, self.attention_reason = choose_attention(
            attention, policy.compute_dtype, self.head_dim
        )
        self.matmul = matmul  # the matmuls asked for: xla | mkl (Intel MKL's)
        self.matmul_kernel, self.matmul_reason = choose_matmul(matmul, policy.compute_dtype)
        dtype = policy.param_dtype
        out_std = 0.02 / math.sqrt(2 * num_layers)  # GPT-2: residual projections scaled by depth
        self.embedding = param(rngs, (V, D), ("vocab", "embed"), 0.02, dtype, vocab_size=vocab_size)
        if position == "learned":
            self.pos_embedding = param(rngs, (max_seq_len, D), (None, "embed"), 0.02, dtype)
        attn_kw = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=self.head_dim,
                       rope=position == "rope", rope_theta=rope_theta, rope_scaling=rope_scaling,
                       qkv_bias=qkv_bias, out_bias=out_bias, out_std=out_std,
                       implementation=self.attention_kernel, matmul=self.matmul_kernel)  # fmt: skip
        mlp_kw = dict(mlp_dim=self.mlp_dim, gated=mlp == "gated", bias=mlp_bias, out_std=out_std,
                      activation=activation, matmul=self.matmul_kernel)  # fmt: skip
        # the blocks' params stacked, (L, ...) per param: `layer(self.blocks, i)` is block i
        self.blocks = stack_layers([
            Block(D, norm=norm, norm_eps=norm_eps, attn_kw=attn_kw, mlp_kw=mlp_kw,
                  dropout_rate=dropout, policy=policy, rngs=rngs)
            for _ in range(num_layers)
        ])  # fmt: skip
        self.final_norm = Norm(D, kind=norm, eps=norm_eps, policy=policy)
        if not tie_embeddings:
            self.head = param(rngs, (D, V), ("embed", "vocab"), 0.02, dtype, vocab_size=vocab_size)

    def init_kwargs(self) -> dict:
        """The keyword arguments (all but `rngs` and `policy`) that rebuild this architecture."""
        names = ("num_layers", "num_heads", "embed_dim", "mlp_dim", "max_seq_len", "activation",
                 "tie_embeddings", "remat", "dropout", "num_kv_heads", "head_dim", "position",
                 "rope_theta", "norm", "norm_eps", "mlp", "qkv_bias", "out_bias", "mlp_bias",
                 "vocab_multiple", "attention", "matmul")  # fmt: skip
        kwargs = {"vocab_size": self.vocab_size, **{n: getattr(self, n) for n in names}}
        kwargs["rope_scaling"] = None if self.rope_scaling is None else dict(self.rope_scaling)
        return kwargs

    def _check_length(self, length, what="sequence length", fix="use shorter sequences"):
        if length > self.max_seq_len:
            raise ValueError(
                f"{what} {length} exceeds model.max_seq_len={self.max_seq_len}: {fix} or raise "
                "model.max_seq_len"
            )

    def _embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """Token (and, for `position="learned"`, position) embeddings (B, T, D); positions
        (T,) or (B, T)."""
        x = jnp.take(self.embedding[...], tokens, axis=0)  # (B, T, D)
        if self.position == "learned":
            pos = jnp.take(self.pos_embedding[...], positions, axis=0, mode="clip")
            x = x + (pos[None] if positions.ndim == 1 else pos)  # (B, T, D)
        return x.astype(self.policy.compute_dtype)

    def _logits(self, x: jax.Array) -> jax.Array:
        x = self.final_norm(x)  # (B, T, D)
        dtype = self.policy.compute_dtype
        if self.tie_embeddings:
            table = self.embedding[...].astype(dtype)  # (V, D)
            if self.matmul_kernel == "mkl":
                logits = mkl.matmul(x, table, transpose_w=True)  # (B, T, V)
            else:
                logits = jnp.einsum("btd,vd->btv", x, table)  # (B, T, V)
        else:
            logits = project("btd,dv->btv", x, self.head[...].astype(dtype), self.matmul_kernel)
        return self.policy.cast_to_output(logits[..., : self.vocab_size])  # (B, T, vocab_size)

    def _check_tokens(self, tokens) -> jax.Array:
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(
                f"tokens must be (batch, seq) integer ids, got {tokens.dtype} {tokens.shape}: "
                "cast with tokens.astype(jnp.int32)"
            )
        return tokens

    def __call__(self, tokens, rng=None, *, positions=None, segment_ids=None) -> jax.Array:
        """Logits (B, T, vocab_size) for tokens (B, T); pass `rng` to turn dropout on.

        A packed row holds several documents: `segment_ids` (B, T) (0 marks padding) keeps
        attention inside each document, `positions` (B, T) restarts the positions of each (None:
        0..T-1 in every row). Each document then gets the logits it gets alone.
        """
        tokens = self._check_tokens(tokens)
        B, T = tokens.shape
        self._check_length(T)
        if positions is None:  # (T,): one RoPE table for all rows
            positions = jnp.arange(T, dtype=jnp.int32)
        else:
            positions = _int_array(positions, (B, T), "positions")
        mask = None  # plain causal
        if segment_ids is not None:
            seg = _int_array(segment_ids, (B, T), "segment_ids")
            causal = jnp.tril(jnp.ones((T, T), jnp.bool_))  # (T, T): key index <= query index
            # padding (segment 0) attends to padding: every query sees itself, so no row of the
            # softmax is empty (no NaN), and no document sees padding
            mask = ((seg[:, :, None] == seg[:, None, :]) & causal[None])[:, None]  # (B, 1, T, T)
        x = self._embed(tokens, positions)  # (B, T, D)
        x = dropout(x, self.dropout, None if rng is None else jax.random.fold_in(rng, 0))
        stages = _stages_in_context(getattr(self.pipeline, "axis", "stage"))
        if stages > 1:
            if self.pipeline is None:
                raise ValueError(
                    f"the mesh has stage={stages} but this Transformer has no pipeline: build it "
                    f"with pipeline=jaxnv.parallel.Pipeline({stages}) (the config route does)"
                )
            x = _run_blocks_pipelined(self.pipeline, self.blocks, x, positions, mask, rng,
                                      self.remat)  # fmt: skip
            return self._logits(x)
        if self.remat != "none":
            x = _run_blocks_remat(self.blocks, x, positions, mask, rng, self.remat)
            return self._logits(x)
        x = _run_blocks(self.blocks, x, positions, mask, rng)  # (B, T, D)
        return self._logits(x)

    def init_cache(self, batch: int, max_len: int | None = None) -> Cache:
        """An empty KV cache: per layer {"k", "v"} zeros (B, max_len, K, H) in the compute dtype,
        and "valid" (B, max_len) all False (nothing written yet)."""
        max_len = self.max_seq_len if max_len is None else max_len
        self._check_length(max_len, "cache length")
        shape = (batch, max_len, self.num_kv_heads, self.head_dim)
        zeros = jnp.zeros(shape, self.policy.compute_dtype)
        layers = [{"k": zeros, "v": zeros} for _ in range(self.num_layers)]
        return {"layers": layers, "valid": jnp.zeros((batch, max_len), jnp.bool_)}

    def decode(self, tokens, cache: Cache, index, positions=None, valid=None):
        """Logits (B, T, vocab_size) for tokens (B, T) written at cache slots index..index+T-1,
        given the keys/values of the slots < index; returns them with the updated cache.

        `positions` (B, T) are the tokens' positions (None: their slots); `valid` (B, T) bool
        marks real tokens (None: all), so that a row's padding is never attended. A query sees
        the valid slots up to its own. `index` may be traced; the caller keeps index + T <= the
        cache length (a write past the end would be clamped by `dynamic_update_slice`). No
        dropout.
        """
        tokens = self._check_tokens(tokens)
        B, T = tokens.shape
        slots = jnp.asarray(index, jnp.int32) + jnp.arange(T, dtype=jnp.int32)  # (T,)
        if positions is None:
            positions = jnp.broadcast_to(slots, (B, T))
        positions = _int_array(positions, (B, T), "positions")
        valid = jnp.ones((B, T), jnp.bool_) if valid is None else jnp.asarray(valid, jnp.bool_)
        seen = jax.lax.dynamic_update_slice(cache["valid"], valid, (0, index))  # (B, L)
        keys = jnp.arange(seen.shape[1], dtype=jnp.int32)  # (L,)
        causal = keys[None, :] <= slots[:, None]  # (T, L)
        # every query sees its own slot too, so a padding query's softmax is never empty
        mask = (seen[:, None, :] & causal[None]) | (keys[None, :] == slots[:, None])[None]
        x = self._embed(tokens, positions)  # (B, T, D)
        layers = []
        for i, layer_cache in enumerate(cache["layers"]):
            block = layer(self.blocks, i)
            x, layer_cache = block(x, positions, mask[:, None], None, layer_cache, index)
            layers.append(layer_cache)
        return self._logits(x), {"layers": layers, "valid": seen}

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token at `seq_len` (default max_seq_len); see `flops_per_token`."""
        kwargs = self.init_kwargs()
        for name in ("remat", "dropout"):
            kwargs.pop(name)
        kwargs["seq_len"] = self.max_seq_len if seq_len is None else seq_len
        return flops_per_token(**kwargs)


def num_params(vocab_size: int, *, num_layers: int = 4, embed_dim: int = 256,
               mlp_dim: int | None = None, tie_embeddings: bool = True, vocab_multiple: int = 128,
               num_heads: int = 4, num_kv_heads: int | None = None, head_dim: int | None = None,
               position: str = "rope", max_seq_len: int = 256, norm: str = "rms",
               mlp: str = "gated", qkv_bias: bool = False, out_bias: bool = False,
               mlp_bias: bool = False, **_arch) -> int:  # fmt: skip
    """Parameter count of a `Transformer` with these settings (padded vocabulary included).

    Settings that add no params (activation, rope_theta, norm_eps, ...) are accepted and ignored,
    so `num_params(**model.init_kwargs())` works.
    """
    V, D = round_up(vocab_size, vocab_multiple), embed_dim
    N = num_heads
    K = N if num_kv_heads is None else num_kv_heads
    H = D // N if head_dim is None else head_dim
    F = default_mlp_dim(D, mlp) if mlp_dim is None else mlp_dim
    norm_params = D * (2 if norm == "layer" else 1)  # scale (and bias)
    attn = D * (N + 2 * K) * H + N * H * D  # q, k, v; o
    attn += (N + 2 * K) * H * qkv_bias + D * out_bias
    ffn = D * F * (3 if mlp == "gated" else 2) + (F + D) * mlp_bias
    per_layer = attn + ffn + 2 * norm_params
    embeddings = V * D * (1 if tie_embeddings else 2) + max_seq_len * D * (position == "learned")
    return embeddings + num_layers * per_layer + norm_params


def flops_per_token(vocab_size: int, *, seq_len: int, num_layers: int = 4, embed_dim: int = 256,
                    num_heads: int = 4, head_dim: int | None = None, tie_embeddings: bool = True,
                    vocab_multiple: int = 128, position: str = "rope", max_seq_len: int = 256,
                    **arch) -> float:  # fmt: skip
    """Training (forward + backward) FLOPs per token: 6 * P + 12 * L * T * N * H.

    P counts the params that take part in matmuls: all of them, less the input tables that are
    only looked up (the token table when the head is untied, learned position embeddings; with
    tied embeddings the token table is counted once, as the head). Each such param does a
    multiply-add (2 FLOPs) per token forward and two backward: 6P. Attention adds q.k^T and
    probs.v: 2 * 2 * T * N * H forward per layer and token (N * H = D by default), times 3 for
    forward + backward: 12 * L * T * N * H (the full T x T square, as in nanoGPT and PaLM's MFU,
    although the causal half is masked). `arch` takes `num_params`' other settings.
    """
    kw = dict(num_layers=num_layers, embed_dim=embed_dim, num_heads=num_heads, head_dim=head_dim,
              tie_embeddings=tie_embeddings, vocab_multiple=vocab_multiple, position=position,
              max_seq_len=max_seq_len, **arch)  # fmt: skip
    n = num_params(vocab_size, **kw)
    if not tie_embeddings:
        n -= round_up(vocab_size, vocab_multiple) * embed_dim
    if position == "learned":
        n -= max_seq_len * embed_dim
    width = num_heads * (embed_dim // num_heads if head_dim is None else head_dim)  # N * H
    return float(6 * n + 12 * num_layers * seq_len * width)
