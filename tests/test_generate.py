"""Generation: ragged prompt batches equal each prompt alone and a cache-free recompute; top-k /
top-p keep exactly the allowed set; stop ids; length buckets share a compilation; sharded params."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnv.models import generate as generate_from_package
from jaxnv.models.generate import _make_generate, _sample, bucket_length, generate
from jaxnv.models.transformer import Transformer
from jaxnv.parallel.mesh import MeshConfig, get_rules, logical_axes, make_mesh, path_names, spec_for

VOCAB, SEQ = 37, 32
VARIANTS = {
    "gqa": dict(num_heads=4, num_kv_heads=2),
    "gpt2": dict(num_heads=2, position="learned", norm="layer", mlp="plain",
                 activation="gelu_tanh", qkv_bias=True),  # absolute positions: per-row matters
}  # fmt: skip
PROMPTS = [[5, 3, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9], [30, 1, 4, 1, 5], [7]]


@functools.lru_cache
def _model(variant="gqa"):
    kw = dict(num_layers=2, embed_dim=32, mlp_dim=64, max_seq_len=SEQ, **VARIANTS[variant])
    return Transformer(VOCAB, rngs=nnx.Rngs(0), **kw)


def _split(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def _greedy_by_recompute(model, prompt, n):
    """Greedy continuation without a cache: the whole model on the sequence so far, right-padded
    to SEQ (one compilation; causality makes the padding inert)."""
    graphdef, state = nnx.split(model)
    seq = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, SEQ), np.int32)
        padded[0, : len(seq)] = seq
        seq.append(int(np.argmax(_forward(graphdef, state, padded)[0, len(seq) - 1])))
    return np.array(seq[len(prompt) :])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_ragged_batch_equals_each_prompt_alone_and_the_recompute(variant):
    model = _model(variant)
    graphdef, params, rest = _split(model)
    n = 6
    batch = generate(graphdef, params, PROMPTS, n, temperature=0.0, model_state=rest)
    assert isinstance(batch, list) and len(batch) == len(PROMPTS)
    for prompt, got in zip(PROMPTS, batch, strict=True):
        assert got.shape == (n,) and got.dtype == np.int32
        alone = generate(graphdef, params, [prompt], n, temperature=0.0, model_state=rest)[0]
        np.testing.assert_array_equal(got, alone)
        np.testing.assert_array_equal(got, _greedy_by_recompute(model, prompt, n))
    # the array form of one length: the prompt followed by the same new tokens
    out = generate(graphdef, params, np.array([PROMPTS[0]] * 2), n, temperature=0.0)
    np.testing.assert_array_equal(out, np.array([PROMPTS[0] + list(batch[0])] * 2))


def test_prompt_lengths_in_one_bucket_share_one_compilation():
    assert [bucket_length(n, 64) for n in (1, 5, 16, 17, 33)] == [16, 16, 16, 32, 64]
    assert bucket_length(20, 24) == 24  # capped by the room the cache has
    graphdef, params, _ = _split(_model())
    n = 3
    fn = _make_generate(graphdef, n, 0.0, None, None, (), 0)
    for length in (5, 9, 16):  # one bucket
        generate(graphdef, params, np.ones((2, length), np.int32), n, temperature=0.0)
        assert fn._cache_size() == 1
    generate(graphdef, params, np.ones((2, 17), np.int32), n, temperature=0.0)  # the next one
    assert fn._cache_size() == 2


def _allowed(logits, temperature, top_k, top_p):
    """The token set top-k then top-p sampling may draw, by sorting in numpy."""
    z = logits / temperature
    order = np.argsort(-z, kind="stable")[: top_k or len(z)]
    p = np.exp(z[order] - z[order].max())
    p /= p.sum()
    m = len(order) if top_p is None else int(np.argmax(np.cumsum(p) >= top_p - 1e-7)) + 1
    return set(order[:m].tolist()), order[:m], p[:m] / p[:m].sum()


@pytest.mark.parametrize("top_k, top_p", [(8, None), (None, 0.6), (12, 0.75)])
def test_top_k_and_top_p_sample_exactly_the_allowed_set(top_k, top_p):
    logits = np.random.default_rng(0).normal(size=VOCAB).astype(np.float32) * 2
    temperature, draws = 0.8, 4000
    allowed, order, probs = _allowed(logits.astype(np.float64), temperature, top_k, top_p)
    assert 1 < len(allowed) < VOCAB and probs.min() > 0.005  # a set the test can tell apart
    batch = jnp.broadcast_to(jnp.asarray(logits), (draws, VOCAB))
    sample = jax.jit(_sample, static_argnums=(2, 3, 4))
    tokens = np.asarray(sample(batch, jax.random.key(1), temperature, top_k, top_p))
    assert set(tokens.tolist()) == allowed
    freq = np.bincount(tokens, minlength=VOCAB)[order] / draws
    np.testing.assert_allclose(freq, probs, atol=0.03)


def _kept_by_sorting(row, top_k, top_p):
    """numpy float64: the tokens a top-k cut then a top-p cut keep (ties with the last kept
    value stay), by sorting the row."""
    z = row.astype(np.float64)
    if top_k is not None:
        z = np.where(z < np.sort(z)[::-1][top_k - 1], -np.inf, z)
    if top_p is not None:
        ranked = np.sort(z)[::-1]
        p = np.exp(ranked - ranked[0])
        p /= p.sum()
        before = np.cumsum(p) - p
        z = np.where(z < ranked[before < top_p].min(), -np.inf, z)
    return np.isfinite(z)


def test_top_k_and_top_p_filters_keep_what_sorting_keeps():
    """The filters bisect over the values' bits instead of sorting: the same kept sets as a
    sort, per row, with ties, -inf (a masked token), -0.0 and 0.0, and large vocabularies."""
    from jaxnv.models.generate import top_k_filter, top_p_filter

    rng = np.random.default_rng(0)
    rows = rng.normal(size=(12, 3000)).astype(np.float32) * 3
    rows[0, :40] = rows[0, 40]  # a run of ties
    rows[1, ::7] = -np.inf
    rows[2, :2] = (-0.0, 0.0)
    rows[3] = np.round(rows[3])  # few distinct values: ties everywhere
    ks = rng.integers(1, 3000, size=12).astype(np.int32)
    ks[:4] = (41, 5, 2, 300)
    ps = rng.uniform(0.05, 0.99, size=12).astype(np.float32)
    got_k = np.isfinite(np.asarray(jax.jit(top_k_filter)(rows, ks)))
    got_p = np.isfinite(np.asarray(jax.jit(top_p_filter)(rows, ps[:, None])))
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(got_k[i], _kept_by_sorting(row, int(ks[i]), None), str(i))
        np.testing.assert_array_equal(got_p[i], _kept_by_sorting(row, None, float(ps[i])), str(i))
    assert got_k[0].sum() >= 41 and 1 <= got_p.sum(axis=1).min()  # the ties stay; never empty


def test_tiny_top_p_is_greedy_and_stop_ids_cut_the_output():
    model = _model()
    graphdef, params, rest = _split(model)
    n = 8
    greedy = generate(graphdef, params, PROMPTS, n, temperature=0.0)
    nucleus = generate(graphdef, params, PROMPTS, n, rng=jax.random.key(0), top_p=1e-6)
    for a, b in zip(greedy, nucleus, strict=True):
        np.testing.assert_array_equal(a, b)
    stop = int(greedy[1][2])  # the third new token of prompt 1
    cut = generate(graphdef, params, PROMPTS, n, temperature=0.0, stop_ids=(stop, VOCAB + 5))
    for full, got in zip(greedy, cut, strict=True):
        hits = np.flatnonzero(full == stop)
        want = full[: hits[0] + 1] if len(hits) else full
        np.testing.assert_array_equal(got, want)
    assert len(cut[1]) <= 3 and cut[1][-1] == stop
    # the array form pads after the stop id
    out = np.asarray(generate(graphdef, params, np.array([PROMPTS[1]]), n, temperature=0.0,
                              stop_ids=[stop], pad_id=VOCAB - 1))  # fmt: skip
    k = len(PROMPTS[1]) + len(cut[1])
    np.testing.assert_array_equal(out[0, :k], PROMPTS[1] + list(cut[1]))
    assert (out[0, k:] == VOCAB - 1).all() and out.shape == (1, len(PROMPTS[1]) + n)
    assert generate_from_package is generate  # `from jaxnv.models import generate` still works


def test_generate_with_params_sharded_on_a_mesh():
    model = _model()
    graphdef, params, rest = _split(model)
    want = generate(graphdef, params, PROMPTS, 5, temperature=0.0)
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2, rules="fsdp+tp"), jax.devices()[:4])
    rules, names = get_rules("fsdp+tp"), logical_axes(model)

    def place(path, x):
        spec = spec_for(names[path_names(path)], x.shape, rules, mesh, str(path))
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))

    sharded = jax.tree_util.tree_map_with_path(place, params)
    wqkv = sharded["blocks"]["attn"]["wqkv"]  # (L, D, K, G+2, H): all layers stacked
    assert wqkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None, None)
    assert wqkv.addressable_shards[0].data.shape == (wqkv.shape[0], 16, 1, 4, 8)
    got = generate(graphdef, sharded, PROMPTS, 5, temperature=0.0)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "prompts, kw, match",
    [
        ([], {}, "needs at least one prompt"),
        ([[1, 2], []], {}, "no empty prompt"),
        ([[1, 40]], {}, "must lie in \\[0, vocab_size=37\\)"),
        ([[1]], dict(top_p=0.0), "top_p=0.0 must lie in \\(0, 1\\]"),
        ([[1]], dict(pad_id=37), "pad_id=37 must be a token id"),
        ([[1]], dict(temperature=1.0, rng=None), "needs rng"),
        ([[1] * 30], {}, "prompt length 30 \\+ 5 new tokens = 35 exceeds"),
        (np.ones((2, 3), np.float32), {}, "integer ids"),
    ],
)
def test_bad_arguments_are_one_line_errors(prompts, kw, match):
    graphdef, params, _ = _split(_model())
    kw = {"temperature": 0.0, **kw}
    with pytest.raises((ValueError, TypeError), match=match) as e:
        generate(graphdef, params, prompts, 5, **kw)
    assert "\n" not in str(e.value)
