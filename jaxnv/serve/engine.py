"""A continuous-batching decode engine: a fixed number of slots over one KV cache.

    engine = Engine(graphdef, params, model_state, slots=8, max_len=256, eos_id=tok.eos_id,
                    detokenize=tok.decode)
    engine.compile()                                   # every prefill bucket and the decode step
    first = engine.insert("a", tok.encode("def f("), SamplingParams(max_tokens=20))
    while engine.active:
        for event in engine.step():                    # one token for every active slot
            print(event.request_id, event.text, event.finish_reason)

The functional core (JetStream's prefill / insert / generate) is three jitted pure functions over
a `DecodeState` pytree: `make_prefill` runs one prompt, right-padded to a length bucket, and writes
its cache row, first token and sampling settings into a slot; `make_decode` advances every slot
by one token at once. Each slot is one row of the cache with its own write column and positions
(the decode is vmapped over rows), so requests join and leave between steps and a row computes
exactly what it computes alone: greedy output equals offline `generate`, and a seeded sample
equals `generate(..., rng=jax.random.key(seed))` for that prompt alone. `Engine` is the small
host-side slot table on top: stop ids and strings, token budgets, incremental text. No I/O, no
threads: the server owns those.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxnv.models.generate import MIN_BUCKET, bucket_length, top_k_filter, top_p_filter

MAX_SEED = 2**31


class RequestError(ValueError):
    """A request the engine refuses; `param` names the offending field (OpenAI's `param`)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples: temperature 0 is greedy; `top_k` None and `top_p` 1 keep every
    token; `stop_ids` end the request (the id is kept in its tokens, not in its text); `stop`
    strings end it too (the text is cut before them)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Event:
    """One new token of a request; `text` is the text it adds (held back while it might be an
    incomplete character or the start of a stop string); `finish_reason` is None, "stop" or
    "length" on its last event."""

    request_id: str
    token: int
    text: str
    finish_reason: str | None


@struct.dataclass
class DecodeState:
    """Everything the decode step reads, one row per slot (S slots, cache length L)."""

    cache: dict  # {"layers": [{"k", "v"} (S, L, K, H)], "valid": (S, L)}
    token: jax.Array  # (S,) the last sampled token, not yet in the cache
    pos: jax.Array  # (S,) its position, which is also its cache column
    count: jax.Array  # (S,) tokens sampled so far: the fold_in index of the next one
    key: jax.Array  # (S,) PRNG keys
    temperature: jax.Array  # (S,) float32
    top_k: jax.Array  # (S,) int32 (vocab_size: off)
    top_p: jax.Array  # (S,) float32 (1: off)


def init_decode_state(model, slots: int, max_len: int) -> DecodeState:
    """An empty state: every slot free (its row is garbage until a prefill writes it)."""
    zeros = lambda: jnp.zeros((slots,), jnp.int32)  # noqa: E731
    # the state is donated: every leaf needs a buffer of its own (init_cache shares its zeros)
    cache = jax.tree.map(jnp.zeros_like, model.init_cache(slots, max_len))
    return DecodeState(
        cache=cache,
        token=zeros(),
        pos=zeros(),
        count=zeros(),
        key=jax.random.split(jax.random.key(0), slots),
        temperature=jnp.zeros((slots,), jnp.float32),
        top_k=jnp.full((slots,), model.vocab_size, jnp.int32),
        top_p=jnp.ones((slots,), jnp.float32),
    )


def sample_rows(logits, keys, temperature, top_k, top_p):
    """Token ids (S,) from logits (S, V), each row with its own key and settings (S,): argmax
    where temperature is 0, else what `generate`'s sampler draws for that row alone. The top-k
    and top-p cuts run only when some row asks for them (greedy slots cost an argmax)."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    keep = lambda s: s  # noqa: E731

    def cut_top_p(scaled):
        return jnp.where((top_p < 1.0)[:, None], top_p_filter(scaled, top_p[:, None]), scaled)

    def sampled():
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]  # (S, V)
        scaled = jax.lax.cond(
            jnp.any(top_k < scaled.shape[-1]), lambda s: top_k_filter(s, top_k), keep, scaled
        )
        scaled = jax.lax.cond(jnp.any(top_p < 1.0), cut_top_p, keep, scaled)
        draw = jax.vmap(lambda k, row: jax.random.categorical(k, row[None], axis=-1)[0])
        return jnp.where(temperature > 0, draw(keys, scaled).astype(jnp.int32), greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)


def make_prefill(graphdef) -> Callable:
    """The jitted prefill + insert (one compilation per prompt bucket): (state, params,
    model_state, tokens (1, P) right-padded, length, slot, temperature, top_k, top_p, seed) ->
    (state, first token); the state is donated."""

    def prefill(state, params, model_state, tokens, length, slot, temperature, top_k, top_p,
                seed):  # fmt: skip
        model = nnx.merge(graphdef, params, model_state)
        model.eval()
        P, L = tokens.shape[1], state.cache["valid"].shape[1]
        cols = jnp.arange(P, dtype=jnp.int32)[None, :]  # (1, P)
        logits, row = model.decode(tokens, model.init_cache(1, P), 0, cols, cols < length)
        last = jax.lax.dynamic_slice_in_dim(logits[0], length - 1, 1)  # (1, V)
        key = jax.random.key(seed)
        settings = (temperature[None], top_k[None], top_p[None])
        token = sample_rows(last, jax.random.fold_in(key, 0)[None], *settings)[0]
        # the row padded to the cache length (never valid), then written over the slot's row
        row = jax.tree.map(
            lambda x: jnp.pad(x, [(0, 0), (0, L - P)] + [(0, 0)] * (x.ndim - 2)), row
        )
        start = lambda x: (slot,) + (0,) * (x.ndim - 1)  # noqa: E731
        cache = jax.tree.map(
            lambda a, r: jax.lax.dynamic_update_slice(a, r, start(a)), state.cache, row
        )
        put = lambda a, v: a.at[slot].set(v)  # noqa: E731
        return state.replace(
            cache=cache,
            token=put(state.token, token),
            pos=put(state.pos, length),
            count=put(state.count, 1),
            key=put(state.key, key),
            temperature=put(state.temperature, temperature),
            top_k=put(state.top_k, top_k),
            top_p=put(state.top_p, top_p),
        ), token

    return jax.jit(prefill, donate_argnums=0)


def make_decode(graphdef) -> Callable:
    """The jitted decode step: (state, params, model_state) -> (state, tokens (S,)): every row
    writes its last token at its own column and samples the next; the state is donated."""

    def step(state, params, model_state):
        model = nnx.merge(graphdef, params, model_state)
        model.eval()
        L = state.cache["valid"].shape[1]

        def one_row(token, row, pos):  # a batch of one at this row's own column and position
            row = jax.tree.map(lambda x: x[None], row)
            logits, row = model.decode(token.reshape(1, 1), row, pos, pos.reshape(1, 1))
            return logits[0, 0], jax.tree.map(lambda x: x[0], row)

        logits, cache = jax.vmap(one_row)(state.token, state.cache, state.pos)  # (S, V)
        keys = jax.vmap(jax.random.fold_in)(state.key, state.count)
        token = sample_rows(logits, keys, state.temperature, state.top_k, state.top_p)
        # a free row keeps stepping on garbage; its column stays inside the cache
        pos = jnp.minimum(state.pos + 1, L - 1)
        return state.replace(cache=cache, token=token, pos=pos, count=state.count + 1), token

    return jax.jit(step, donate_argnums=0)


@dataclasses.dataclass
class _Slot:
    request_id: str
    sampling: SamplingParams
    stop_ids: frozenset
    ids: list  # generated ids that are text (stop ids left out)
    count: int = 0  # tokens generated, stop ids included
    sent: str = ""  # text already handed out


class Engine:
    """A slot table over the jitted prefill and decode step (see the module docstring).

    `max_len` (default the model's `max_seq_len`) bounds prompt + new tokens per request;
    `eos_id` ends every request (like a stop id); `detokenize(ids) -> str` turns on text (events'
    `text`, stop strings). Not thread-safe: one caller drives it.
    """

    def __init__(self, graphdef, params, model_state=None, *, slots: int = 8,
                 max_len: int | None = None, eos_id: int | None = None,
                 detokenize: Callable[[Sequence[int]], str] | None = None):  # fmt: skip
        model_state = {} if model_state is None else model_state
        model = nnx.merge(graphdef, params, model_state)
        max_len = model.max_seq_len if max_len is None else int(max_len)
        if not 2 <= max_len <= model.max_seq_len:
            raise ValueError(
                f"max_len={max_len} must lie in [2, the model's max_seq_len={model.max_seq_len}]"
            )
        if slots < 1:
            raise ValueError(f"slots={slots} must be >= 1")
        self.graphdef, self.params, self.model_state = graphdef, params, model_state
        self.vocab_size, self.max_len, self.slots = model.vocab_size, max_len, int(slots)
        self.eos_id, self.detokenize = eos_id, detokenize
        self._model = model
        self._state = init_decode_state(model, self.slots, max_len)
        self._prefill, self._decode = make_prefill(graphdef), make_decode(graphdef)
        self._table: list[_Slot | None] = [None] * self.slots

    @property
    def buckets(self) -> list[int]:
        """The prompt lengths the prefill compiles for: powers of two from 16, and max_len."""
        out, b = [], MIN_BUCKET
        while b < self.max_len:
            out.append(b)
            b *= 2
        return out + [self.max_len]

    @property
    def active(self) -> int:
        return sum(s is not None for s in self._table)

    @property
    def free_slots(self) -> int:
        return self.slots - self.active

    def compile(self) -> None:
        """Compile every prefill bucket and the decode step now, before traffic. Twice round:
        a state that left the decode step may carry other shardings than a fresh one."""
        for _ in range(2):
            for b in self.buckets:
                self._state, _ = self._call_prefill(np.zeros(1, np.int32), b, 0, SamplingParams())
            self._state, token = self._decode(self._state, self.params, self.model_state)
        jax.block_until_ready(token)  # the slot table is empty: the rows written are garbage

    def compilations(self) -> int:
        """How many programs the prefill and decode step have compiled (constant after
        `compile()`: traffic never compiles)."""
        return self._prefill._cache_size() + self._decode._cache_size()

    def check(self, prompt: Sequence[int], sampling: SamplingParams) -> np.ndarray:
        """The prompt as int32 ids, or a RequestError saying what to change."""
        ids = np.asarray(prompt)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise RequestError("prompt must be a non-empty text or list of token ids", "prompt")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise RequestError(f"prompt token ids must lie in [0, {self.vocab_size})", "prompt")
        n, room = len(ids), self.max_len - len(ids)
        if room < 1:
            raise RequestError(
                f"the prompt is {n} tokens but the context is {self.max_len}: shorten the prompt",
                "prompt",
                "context_length_exceeded",
            )
        m = sampling.max_tokens
        if not isinstance(m, (int, np.integer)) or not 1 <= m <= room:
            raise RequestError(
                f"max_tokens={m} must lie in [1, {room}] (the context {self.max_len} minus the "
                f"prompt's {n} tokens)",
                "max_tokens",
            )
        t = sampling.temperature
        if not np.isfinite(t) or t < 0:
            raise RequestError(f"temperature={t} must be >= 0 (0 is greedy)", "temperature")
        if sampling.top_k is not None and not 1 <= sampling.top_k <= self.vocab_size:
            raise RequestError(
                f"top_k={sampling.top_k} must lie in [1, {self.vocab_size}]", "top_k"
            )
        if not 0.0 < sampling.top_p <= 1.0:
            raise RequestError(f"top_p={sampling.top_p} must lie in (0, 1]", "top_p")
        if not 0 <= sampling.seed < MAX_SEED:
            raise RequestError(f"seed={sampling.seed} must lie in [0, 2**31)", "seed")
        return ids.astype(np.int32)

    def insert(self, request_id: str, prompt: Sequence[int], sampling: SamplingParams) -> Event:
        """Prefill `prompt` into a free slot; returns its first token's event (which may already
        finish it). Raises RequestError for a bad request, RuntimeError when no slot is free."""
        ids = self.check(prompt, sampling)
        if request_id in self.request_ids():
            raise ValueError(f"request {request_id!r} is already running: give a new id")
        free = [i for i, s in enumerate(self._table) if s is None]
        if not free:
            raise RuntimeError("no free slot: wait for a step to finish a request")
        slot = free[0]
        bucket = bucket_length(len(ids), self.max_len)
        self._state, token = self._call_prefill(ids, bucket, slot, sampling)
        stops = frozenset(sampling.stop_ids) | ({self.eos_id} if self.eos_id is not None else set())
        self._table[slot] = _Slot(request_id, sampling, stops, [])
        return self._advance(slot, int(token))

    def step(self) -> list[Event]:
        """One decode step: an event for every active request (none when none is active)."""
        if not self.active:
            return []
        self._state, tokens = self._decode(self._state, self.params, self.model_state)
        tokens = np.asarray(tokens)  # (S,)
        return [self._advance(i, int(tokens[i])) for i, s in enumerate(self._table) if s]

    def cancel(self, request_id: str) -> bool:
        """Free the request's slot now; False when it is not running."""
        for i, s in enumerate(self._table):
            if s is not None and s.request_id == request_id:
                self._table[i] = None
                return True
        return False

    def request_ids(self) -> list[str]:
        return [s.request_id for s in self._table if s is not None]

    def _call_prefill(self, ids, bucket, slot, sampling: SamplingParams):
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, : len(ids)] = ids
        top_k = self.vocab_size if sampling.top_k is None else sampling.top_k
        scalars = (np.int32(len(ids)), np.int32(slot), np.float32(sampling.temperature),
                   np.int32(top_k), np.float32(sampling.top_p), np.int32(sampling.seed))  # fmt: skip  # noqa: E501
        return self._prefill(self._state, self.params, self.model_state, tokens, *scalars)

    def _advance(self, slot: int, token: int) -> Event:
        """Record one new token of the slot's request; free the slot when it finishes."""
        s = self._table[slot]
        s.count += 1
        finish = "stop" if token in s.stop_ids else None
        if finish is None:
            s.ids.append(token)
            if s.count >= s.sampling.max_tokens:
                finish = "length"
        text = ""
        if self.detokenize is not None:
            text, finish = self._text(s, finish)
        if finish is not None:
            self._table[slot] = None
        return Event(s.request_id, token, text, finish)

    def _text(self, s: _Slot, finish: str | None) -> tuple[str, str | None]:
        """The new text of a slot's request and its finish reason (a stop string ends it)."""
        full = self.detokenize(s.ids)
        cuts = [full.find(stop) for stop in s.sampling.stop if stop and stop in full]
        if cuts:
            full, finish = full[: min(cuts)], "stop"
        ready = len(full)
        if finish is None:  # hold back an incomplete character and a possible stop's start
            ready = len(full.rstrip("\ufffd"))
            tail = full[:ready]
            ready -= max((_overlap(tail, stop) for stop in s.sampling.stop), default=0)
        if not full.startswith(s.sent) or ready <= len(s.sent):
            return "", finish  # nothing new (or a tokenizer that rewrote its prefix)
        delta, s.sent = full[len(s.sent) : ready], full[:ready]
        return delta, finish


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of `text` that begins `stop` (shorter than `stop`): the
    text to hold back. O(len(stop)) per call (KMP over the last len(stop) - 1 characters), not
    one comparison per prefix length."""
    if len(stop) < 2:
        return 0
    window = text[len(text) - len(stop) + 1 :] if len(text) >= len(stop) else text
    start = window.find(stop[0])
    if start < 0:
        return 0
    fail, k = _failure(stop), 0
    for ch in window[start:]:
        while k and stop[k] != ch:
            k = fail[k - 1]
        if stop[k] == ch:
            k += 1
    return k


@functools.lru_cache(maxsize=256)
def _failure(stop: str) -> tuple[int, ...]:
    """KMP's failure function of `stop`: for each prefix, its longest proper border."""
    fail, k = [0] * len(stop), 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = fail[k - 1]
        if stop[i] == stop[k]:
            k += 1
        fail[i] = k
    return tuple(fail)
