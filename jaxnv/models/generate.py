"""Text generation with a KV cache: batches of prompts of different lengths, greedy, top-k and
top-p (nucleus) sampling, stop ids.

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    out = generate(graphdef, params, prompt, 100, rng=key, top_k=10)       # (B, T0 + 100)
    new = generate(graphdef, params, [[5, 3], [7, 1, 2, 9]], 20, temperature=0.0, stop_ids=(0,))
    # -> [array of new tokens of prompt 0, ... of prompt 1], each cut after its first stop id

Prompts are left-padded to a common length (so every row writes its next token at the same cache
slot) and each row gets its own positions, which start at 0 at its first real token; padded
slots are marked invalid in the cache and never attended. A row thus generates exactly what it
generates alone. The padded length is a bucket (a power of two, at least 16), so prompts of
nearby lengths share one compilation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MIN_BUCKET = 16


def bucket_length(length: int, cap: int) -> int:
    """The padded prompt length for `length`: the next power of two >= max(length, 16), at most
    `cap` (which the caller keeps >= length)."""
    return min(max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length()), cap)


def _sample(logits, rng, temperature: float, top_k: int | None = None, top_p: float | None = None):
    """Token ids (B,) from logits (B, V), in float32: argmax at temperature 0; else a sample of
    softmax(logits / temperature) restricted to the `top_k` most likely tokens, then to the
    smallest set of them whose probability reaches `top_p`."""
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _order_keys(x):
    """uint32 keys that order like the float32 values `x` (-0.0 as 0.0, -inf lowest)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32) + 0.0, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _largest_key(holds, keys):
    """Per row of `keys` (B, V), the largest uint32 t for which `holds(keys >= t)` (B,) is true,
    for a `holds` that is true at t = 0 and stays false once false: 32 halvings, no sort."""

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + ((hi - lo) >> 1) + ((hi - lo) & 1)  # the upper middle: no uint32 overflow
        ok = holds(keys >= mid[:, None])
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    B = keys.shape[0]
    start = (jnp.zeros((B,), jnp.uint32), jnp.full((B,), 0xFFFFFFFF, jnp.uint32))
    return jax.lax.fori_loop(0, 32, halve, start)[0][:, None]  # (B, 1)


def top_k_filter(logits, top_k):
    """Logits (B, V) with -inf below each row's `top_k`-th largest (an int, or (B,) per row; ties
    with it stay). Found by bisection over the values' bit patterns: exact, and no sort."""
    keys = _order_keys(logits)
    k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), logits.shape[:1])
    kth = _largest_key(lambda keep: jnp.sum(keep, axis=-1, dtype=jnp.int32) >= k, keys)
    return jnp.where(keys < kth, -jnp.inf, logits)


def top_p_filter(logits, top_p):
    """Logits (B, V) with -inf outside the smallest set of most likely tokens whose probability
    reaches `top_p` (a float, or (B, 1) per row): a token stays while the tokens more likely than
    it hold less than `top_p`, so the most likely one always stays, and so do its ties. Shared
    with the serving engine; by bisection, without sorting the vocabulary."""
    keys, probs = _order_keys(logits), jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32).reshape(-1), logits.shape[:1])
    cut = _largest_key(lambda keep: jnp.sum(jnp.where(keep, probs, 0.0), axis=-1) >= p, keys)
    return jnp.where(keys < cut, -jnp.inf, logits)


@functools.lru_cache(maxsize=64)
def _make_generate(graphdef, max_new_tokens: int, temperature: float, top_k: int | None,
                   top_p: float | None, stop_ids: tuple[int, ...], pad_id: int):  # fmt: skip
    """The jitted generate for one static configuration (jit itself caches per shape):
    (params, model_state, tokens (B, P) left-padded, lengths (B,), rng) -> new tokens (B, n),
    `pad_id` after a row's first stop id."""
    n = max_new_tokens
    stops = jnp.asarray(stop_ids, jnp.int32) if stop_ids else None

    def is_stop(token):  # (B,) -> (B,) bool
        return jnp.zeros(token.shape, jnp.bool_) if stops is None else jnp.isin(token, stops)

    def run(params, model_state, tokens, lengths, rng):
        model = nnx.merge(graphdef, params, model_state)
        model.eval()  # NNX's eval mode: no dropout
        B, P = tokens.shape
        key = (lambda i: None) if rng is None else (lambda i: jax.random.fold_in(rng, i))
        sample = functools.partial(_sample, temperature=temperature, top_k=top_k, top_p=top_p)
        cols = jnp.arange(P, dtype=jnp.int32)[None, :]  # (1, P)
        first = (P - lengths)[:, None]  # (B, 1): the slot of each row's first real token
        positions = jnp.maximum(cols - first, 0)  # (B, P)
        cache = model.init_cache(B, P + n)
        logits, cache = model.decode(tokens, cache, 0, positions, cols >= first)  # prefill
        token = sample(logits[:, -1], key(0))  # (B,)
        out = jnp.full((B, n), pad_id, jnp.int32).at[:, 0].set(token)

        def cond(carry):
            i, _, _, done, _ = carry
            return (i < n) & ~jnp.all(done)

        def step(carry):
            i, token, cache, done, out = carry  # token (B,): the last one generated
            positions = (lengths + i - 1)[:, None]  # (B, 1): each row's own position
            logits, cache = model.decode(token[:, None], cache, P + i - 1, positions)
            token = jnp.where(done, pad_id, sample(logits[:, 0], key(i)))  # (B,)
            out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
            return i + 1, token, cache, done | is_stop(token), out

        carry = (jnp.int32(1), token, cache, is_stop(token), out)
        return jax.lax.while_loop(cond, step, carry)[-1]  # (B, n)

    return jax.jit(run)


def _check_args(prompts, max_new_tokens, temperature, top_k, top_p, rng, pad_id, vocab_size):
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy)")
    if temperature > 0 and rng is None:
        raise ValueError("sampling with temperature > 0 needs rng=jax.random.key(seed)")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k={top_k} must lie in [1, vocab_size={vocab_size}]")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must lie in (0, 1]")
    if not 0 <= pad_id < vocab_size:
        raise ValueError(f"pad_id={pad_id} must be a token id in [0, {vocab_size})")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    for p in prompts:
        if p.min() < 0 or p.max() >= vocab_size:
            raise ValueError(f"prompt token ids must lie in [0, vocab_size={vocab_size})")


def generate(graphdef, params, prompts, max_new_tokens: int, *, rng=None, temperature=1.0,
             top_k: int | None = None, top_p: float | None = None, stop_ids=(),
             model_state=None, pad_id: int = 0):  # fmt: skip
    """Continue each prompt by up to `max_new_tokens` tokens with a KV cache.

    `prompts` is a (B, T0) int array, and the result the (B, T0 + n) int32 array of prompts and
    new tokens (`pad_id` after a row's first stop id); or a list of 1-D int sequences of any
    lengths, and the result a list of 1-D numpy arrays: each prompt's new tokens, cut after its
    first stop id (which is kept). `temperature=0` is greedy (argmax, no `rng` needed);
    otherwise tokens are sampled from softmax(logits / temperature), restricted to the `top_k`
    most likely and then to the smallest set of them with probability >= `top_p`. Works on
    params sharded on a mesh. Compiled once per (graphdef, max_new_tokens, temperature, top_k,
    top_p, stop_ids, pad_id), batch size and prompt-length bucket.

        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tokens = generate(graphdef, params, prompt, 20, temperature=0.0)
    """
    ragged = isinstance(prompts, (list, tuple))
    if ragged:
        rows = [np.asarray(p) for p in prompts]
        if any(r.ndim != 1 or not np.issubdtype(r.dtype, np.integer) for r in rows if r.size):
            raise TypeError("prompts must be 1-D integer token id sequences")
    else:
        array = np.asarray(prompts)
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
            raise TypeError(
                f"prompts must be (batch, seq) integer ids or a list of 1-D sequences, got "
                f"{array.dtype} {array.shape}"
            )
        rows = list(array)
    model = nnx.merge(graphdef, params, {} if model_state is None else model_state)
    _check_args(rows, max_new_tokens, temperature, top_k, top_p, rng, pad_id, model.vocab_size)
    longest, n = max(len(r) for r in rows), int(max_new_tokens)
    what = f"prompt length {longest} + {n} new tokens ="
    model._check_length(longest + n, what, "shorten the prompt, generate fewer tokens")
    if n == 0:
        return [np.zeros(0, np.int32) for _ in rows] if ragged else jnp.asarray(prompts, jnp.int32)
    P = bucket_length(longest, model.max_seq_len - n)
    tokens = np.full((len(rows), P), pad_id, np.int32)
    for i, r in enumerate(rows):
        tokens[i, P - len(r) :] = r  # left-padded: every row's next token goes to slot P
    lengths = np.array([len(r) for r in rows], np.int32)
    stops = tuple(sorted({int(s) for s in stop_ids}))
    top_k = None if top_k is None else int(top_k)
    top_p = None if top_p is None or top_p >= 1.0 else float(top_p)
    fn = _make_generate(graphdef, n, float(temperature), top_k, top_p, stops, int(pad_id))
    model_state = {} if model_state is None else model_state
    new = fn(params, model_state, tokens, lengths, None if temperature == 0 else rng)  # (B, n)
    if not ragged:
        return jnp.concatenate([jnp.asarray(prompts, jnp.int32), new], axis=1)  # (B, T0 + n)
    new = np.asarray(new)
    out = []
    for row in new:
        hits = np.flatnonzero(np.isin(row, stops)) if stops else ()
        out.append(row[: hits[0] + 1] if len(hits) else row)
    return out
