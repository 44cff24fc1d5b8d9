"""Transformer LM: causality, remat, padded vocab, KV-cache decoding, RoPE, precision, learning.

Models are run through `_forward`, jitted with the graphdef static, so tests that share a
configuration share its compilation (eager op-by-op calls would compile every op).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxnv.core.losses import softmax_cross_entropy
from jaxnv.core.precision import get_policy
from jaxnv.core.state import init_state, param_count, split_model
from jaxnv.core.step import make_train_step
from jaxnv.models.generate import generate
from jaxnv.models.transformer import (
    Transformer,
    apply_rope,
    default_mlp_dim,
    flops_per_token,
    num_params,
    rms_norm,
)

VOCAB, SEQ = 37, 16
TINY = dict(num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64, max_seq_len=SEQ)


def _model(seed=0, **kw):
    return Transformer(VOCAB, **{**TINY, **kw}, rngs=nnx.Rngs(seed))


def _tokens(batch=2, seq=SEQ, seed=1):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, VOCAB, jnp.int32)


def _split(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens, rng=None):
    return nnx.merge(graphdef, params)(tokens, rng)


def _logits(model, tokens, rng=None):
    graphdef, params = nnx.split(model)
    return _forward(graphdef, params, tokens, rng)


def _eqns(jaxpr):
    """All equations of a jaxpr, those of nested jaxprs (jit, remat, scan, ...) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _eqns(sub)


@pytest.fixture(scope="module")
def model():
    return _model()


def test_causal_masking(model):
    tokens = _tokens()
    base = _logits(model, tokens)
    assert base.shape == (2, SEQ, VOCAB)
    for t in (0, 7, SEQ - 1):
        changed = _logits(model, tokens.at[:, t].set((tokens[:, t] + 1) % VOCAB))
        np.testing.assert_array_equal(changed[:, :t], base[:, :t])
        assert not np.allclose(changed[:, t], base[:, t])


def test_remat_policies_give_equal_loss_and_grads():
    tokens = _tokens(seq=SEQ + 1)
    results = {}
    for remat in ("none", "full", "dots"):  # one layer, no dropout: compiling dominates
        graphdef, params, rest = _split(_model(remat=remat, num_layers=1))

        def loss(params, graphdef=graphdef, rest=rest):
            logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1], jax.random.key(3))
            return softmax_cross_entropy(logits, tokens[:, 1:])

        jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
        has_remat = any(e.primitive.name in ("remat2", "checkpoint") for e in _eqns(jaxpr.jaxpr))
        assert has_remat == (remat != "none")
        results[remat] = jax.jit(jax.value_and_grad(loss))(params)
    (ref_loss, ref_grads) = results["none"]
    for remat in ("full", "dots"):
        loss, grads = results[remat]
        np.testing.assert_allclose(loss, ref_loss, atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, ref_grads)


def test_padded_vocab_is_never_predicted():
    model = _model()
    assert model.padded_vocab == 128
    embedding = model.embedding[...]
    assert embedding.shape == (128, 32)
    np.testing.assert_array_equal(embedding[VOCAB:], 0)  # padded rows start at zero
    tokens = _tokens()
    assert _logits(model, tokens).shape[-1] == VOCAB
    model.embedding[...] = embedding.at[VOCAB:].set(1e4)  # would win every argmax if unsliced
    logits = _logits(model, tokens)
    assert logits.shape[-1] == VOCAB and np.isfinite(logits).all()
    assert int(logits.argmax(-1).max()) < VOCAB
    graphdef, params, _ = _split(model)
    out = generate(graphdef, params, tokens[:, :5], 8, temperature=0.0)
    assert int(out.max()) < VOCAB


def test_untied_head_is_padded_too():
    model = _model(tie_embeddings=False)
    assert model.head[...].shape == (32, 128)
    np.testing.assert_array_equal(model.head[...][:, VOCAB:], 0)
    assert _logits(model, _tokens()).shape == (2, SEQ, VOCAB)


def test_kv_cache_decoding_matches_full_recompute(model):
    prompt, n = _tokens(seq=5), 8
    graphdef, params, rest = _split(model)
    out = generate(graphdef, params, prompt, n, temperature=0.0, model_state=rest)
    assert out.shape == (2, 5 + n) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:, :5], prompt)

    def full(seq):  # the whole model on the sequence so far; zero padding to SEQ keeps one
        padded = jnp.zeros((2, SEQ), jnp.int32).at[:, : seq.shape[1]].set(seq)  # compilation,
        return _logits(model, padded)[:, seq.shape[1] - 1]  # and causality makes it inert

    seq = prompt  # greedy decoding by full recomputation
    for _ in range(n):
        seq = jnp.concatenate([seq, full(seq).argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(out, seq)

    # the logits of every cached decode step equal those of the full recompute
    decode = jax.jit(model.decode)
    logits, cache = decode(prompt, model.init_cache(2, 5 + n), 0)
    np.testing.assert_allclose(logits[:, -1], full(prompt), atol=1e-5)
    for i in range(5, 5 + n - 1):
        logits, cache = decode(seq[:, i : i + 1], cache, jnp.int32(i))
        np.testing.assert_allclose(logits[:, 0], full(seq[:, : i + 1]), atol=1e-5)


def test_generate_sampling(model):
    graphdef, params, _ = _split(model)
    prompt, rng, n = _tokens(seq=5), jax.random.key(7), 8  # shapes shared with the test above
    greedy = generate(graphdef, params, prompt, n, temperature=0.0)
    top1 = generate(graphdef, params, prompt, n, rng=rng, top_k=1)
    np.testing.assert_array_equal(top1, greedy)
    sampled = generate(graphdef, params, prompt, n, rng=rng, temperature=2.0, top_k=20)
    assert sampled.shape == (2, 5 + n) and int(sampled.max()) < VOCAB and int(sampled.min()) >= 0
    again = generate(graphdef, params, prompt, n, rng=rng, temperature=2.0, top_k=20)
    np.testing.assert_array_equal(sampled, again)
    other = generate(graphdef, params, prompt, n, rng=jax.random.key(8), temperature=2.0, top_k=20)
    assert not np.array_equal(sampled, other)
    np.testing.assert_array_equal(generate(graphdef, params, prompt, 0, temperature=0), prompt)
    with pytest.raises(ValueError, match="needs rng"):
        generate(graphdef, params, prompt, 3)
    with pytest.raises(ValueError, match="top_k=40 must lie in"):
        generate(graphdef, params, prompt, 3, rng=rng, top_k=40)


def test_rope_depends_only_on_relative_position():
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 3, 8))  # (B, T, N, H) each

    @jax.jit
    def score(m, n):
        qm = apply_rope(q, jnp.array([m]))
        kn = apply_rope(k, jnp.array([n]))
        return jnp.einsum("btnh,btnh->bn", qm, kn)

    np.testing.assert_allclose(score(0, 0), jnp.einsum("btnh,btnh->bn", q, k), atol=1e-6)
    for shift in (1, 7, 100):
        np.testing.assert_allclose(score(3 + shift, 1 + shift), score(3, 1), atol=1e-4)
    assert not np.allclose(score(3, 1), score(3, 2), atol=1e-3)
    # a rotation keeps the norm
    rotated = np.asarray(jax.jit(apply_rope)(q, jnp.array([5])))
    np.testing.assert_allclose(np.linalg.norm(rotated, axis=-1), np.linalg.norm(q, axis=-1))


def test_rms_norm_in_float32_against_numpy():
    x = np.random.default_rng(0).normal(size=(2, 3, 16)) * 30
    scale = np.random.default_rng(1).normal(size=16)
    want = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) * scale
    got = rms_norm(jnp.asarray(x, jnp.float32), jnp.asarray(scale, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    low = rms_norm(jnp.asarray(x, jnp.bfloat16), jnp.asarray(scale, jnp.float32))
    assert low.dtype == jnp.bfloat16
    bf16_in = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
    want = bf16_in / np.sqrt(np.mean(bf16_in**2, axis=-1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(np.asarray(low, np.float64), want, rtol=1e-2, atol=1e-2)
    # the mean of squares is reduced in float32 even for a bf16 input
    eqns = list(_eqns(jax.make_jaxpr(rms_norm)(jnp.asarray(x, jnp.bfloat16), scale).jaxpr))
    sums = [e for e in eqns if e.primitive.name == "reduce_sum"]
    assert sums and all(e.invars[0].aval.dtype == jnp.float32 for e in sums)


def test_mixed_precision_policy():
    policy = get_policy("params=float32,compute=bfloat16,output=bfloat16")
    model = _model(policy=policy)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    tokens = _tokens()
    logits = _logits(model, tokens)
    assert logits.dtype == policy.output_dtype and np.isfinite(logits).all()
    eqns = list(_eqns(jax.make_jaxpr(lambda t: model(t))(tokens).jaxpr))
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    assert len(dots) >= 2 * (2 + 2) + 1  # per layer: qkv, o, gate_up, down; the head
    for e in dots:
        assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16] * 2, e
    # attention logits accumulate in fp32 (so its softmax is fp32, see the module docstring)
    assert any(e.outvars[0].aval.dtype == jnp.float32 for e in dots)
    full = _logits(_model(), tokens)  # same seed in fp32
    np.testing.assert_allclose(np.asarray(logits, np.float32), full, atol=0.05)


def test_too_long_sequences_raise_one_line(model):
    with pytest.raises(ValueError, match="sequence length 17 exceeds model.max_seq_len=16") as e:
        model(jnp.zeros((1, SEQ + 1), jnp.int32))
    assert "\n" not in str(e.value) and "raise model.max_seq_len" in str(e.value)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=16") as e:
        jax.jit(lambda t: model(t)).lower(jnp.zeros((1, SEQ + 1), jnp.int32))
    graphdef, params, _ = _split(model)
    with pytest.raises(ValueError, match="prompt length 10 \\+ 7 new tokens = 17 exceeds") as e:
        generate(graphdef, params, _tokens(seq=10), 7, temperature=0.0)
    assert "\n" not in str(e.value)


def test_config_errors_are_one_line():
    for kw, match in [
        (dict(activation="tanh"), "gated MLP: use one of silu, gelu, relu, relu2"),
        (dict(remat="some"), "model.remat='some': use one of none, full, dots"),
        (dict(num_heads=3), "embed_dim=32 must be num_heads=3 times an even head dim"),
    ]:
        with pytest.raises(ValueError, match=match):
            _model(**kw)


def test_logical_axis_names(model):
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    flat = {jax.tree_util.keystr(k): tuple(v) for k, v in jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))}  # fmt: skip
    assert len(flat) == 1 + 6 + 1  # the blocks' params stacked: one array each for all layers
    for path, names in flat.items():
        assert names and set(names) - {None}, path
        named = [n for n in names if n is not None]
        assert len(set(named)) == len(named), path
    assert flat["['embedding']"] == ("vocab", "embed")
    assert flat["['blocks']['attn']['wqkv']"] == ("layers", "embed", "heads", None, "kv")
    assert flat["['blocks']['mlp']['w_gate_up']"] == ("layers", "embed", None, "mlp")
    assert flat["['blocks']['attn']['wo']"] == ("layers", "heads", "kv", "embed")
    assert flat["['blocks']['mlp']['w_down']"] == ("layers", "mlp", "embed")
    assert flat["['final_norm']['scale']"] == ("embed",)


def test_num_params_flops_and_defaults():
    assert default_mlp_dim(256) == 768 and default_mlp_dim(768) == 2048
    assert default_mlp_dim(32) == 128
    for tie in (True, False):
        model = _model(tie_embeddings=tie)
        counted = param_count(nnx.state(model, nnx.Param))
        kw = dict(num_layers=2, embed_dim=32, mlp_dim=64, tie_embeddings=tie)
        assert num_params(VOCAB, **kw) == counted
        head = 0 if tie else 128 * 32  # the input table of an untied model costs no FLOPs
        want = 6 * (counted - head) + 12 * 2 * SEQ * 32
        assert flops_per_token(VOCAB, seq_len=SEQ, **kw) == want == model.flops_per_token()


def test_dropout_only_with_rng():
    model = _model(dropout=0.5)
    tokens = _tokens()
    clean = _logits(model, tokens)
    np.testing.assert_array_equal(clean, _logits(_model(), tokens))  # no rng, no dropout
    a, b = _logits(model, tokens, jax.random.key(0)), _logits(model, tokens, jax.random.key(1))
    assert not np.allclose(a, b) and not np.allclose(a, clean)
    np.testing.assert_array_equal(a, _logits(model, tokens, jax.random.key(0)))


def test_learns_a_repeating_pattern():
    """100 adam steps through jaxnv's own train step drive the loss on 0 1 2 ... 9 0 1 ... to ~0."""
    policy, tx = get_policy("fp32"), optax.adam(1e-2)

    def model_fn(rngs):
        return Transformer(VOCAB, **TINY, rngs=rngs)

    def loss_fn(model, batch, rng):
        logits = model(batch["tokens"][:, :-1], rng)
        return softmax_cross_entropy(logits, batch["tokens"][:, 1:]), {}

    graphdef, state = init_state(model_fn, tx, policy, jax.random.key(0))
    step = make_train_step(graphdef, loss_fn, tx, policy)
    offsets = np.arange(8)[:, None]  # each row starts at another phase
    batch = {"tokens": jnp.asarray((offsets + np.arange(SEQ + 1)[None, :]) % 10, jnp.int32)}
    for _ in range(100):
        state, metrics = step(state, batch)
    assert float(metrics["loss"]) < 0.1
    _, params, rest = split_model(nnx.merge(graphdef, state.params, state.model_state))
    prompt = batch["tokens"][:2, :5]  # the shapes of the tests above: no new compilation
    out = generate(graphdef, params, prompt, 8, temperature=0.0, model_state=rest)
    np.testing.assert_array_equal(out, batch["tokens"][:2, :13])


@pytest.mark.parametrize(
    "spec, x_shape, w_shape",
    [
        ("btd,dkgh->btkgh", (2, 5, 8), (8, 2, 3, 4)),  # up-projection: x is the narrower
        ("btf,fd->btd", (2, 5, 24), (24, 8)),  # down-projection: dy is the narrower
        ("btnh,nhd->btd", (2, 5, 3, 4), (3, 4, 8)),  # two contracted axes
    ],
)
def test_projection_gradients_against_numpy_float64(spec, x_shape, w_shape):
    """The projections' value and gradients (their own backward pass) against float64 numpy."""
    from jaxnv.models.layers import project

    rng = np.random.default_rng(0)
    x, w = rng.normal(size=x_shape), rng.normal(size=w_shape)
    contract = (len(x_shape) + len(w_shape) - len(spec.split("->")[1])) // 2
    out_shape = x_shape[: len(x_shape) - contract] + w_shape[contract:]
    c = rng.normal(size=out_shape)

    def loss(x, w):
        return jnp.sum(project(spec, x, w) * c.astype(np.float32))

    f32 = (jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    value, (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(*f32)
    lead = tuple(range(len(x_shape) - contract))
    y = np.tensordot(x, w, axes=contract)
    np.testing.assert_allclose(value, np.sum(y * c), rtol=1e-5)
    outs = tuple(range(len(lead), c.ndim))
    np.testing.assert_allclose(
        dx, np.tensordot(c, w, axes=(outs, tuple(range(contract, w.ndim)))), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(dw, np.tensordot(x, c, axes=(lead, lead)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["silu", "gelu", "relu", "relu2", "gelu_tanh"])
def test_gated_mlp_gradient_equals_autodiff(activation):
    """The gated MLP's packed gradient equals JAX's autodiff of act(gate) * up."""
    from jaxnv.models.layers import TRANSFORMER_ACTIVATIONS, gated

    act = TRANSFORMER_ACTIVATIONS[activation]
    k1, k2 = jax.random.split(jax.random.key(0))
    gate_up = jax.random.normal(k1, (2, 3, 2, 8))
    c = jax.random.normal(k2, (2, 3, 8))

    def ours(gu):
        return jnp.sum(gated(act, gu) * c)

    def autodiff(gu):
        return jnp.sum(act(gu[:, :, 0]) * gu[:, :, 1] * c)

    np.testing.assert_allclose(ours(gate_up), autodiff(gate_up), rtol=1e-6)
    np.testing.assert_allclose(
        jax.grad(ours)(gate_up), jax.grad(autodiff)(gate_up), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_causal_attention_matches_jax_attention_and_its_gradients(dtype, tol):
    """The XLA path's causal attention (own backward pass) against JAX's dot_product_attention."""
    from jaxnv.models.layers import causal_attention

    q, k, v, c = (
        jax.random.normal(key, (2, 9, 3, 8)).astype(dtype)
        for key in jax.random.split(jax.random.key(3), 4)
    )

    def loss(attend, q, k, v):
        return jnp.sum(attend(q, k, v).astype(jnp.float32) * c.astype(jnp.float32))

    def theirs(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    grad = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3)), static_argnums=0)
    (ours_value, ours_grads), (ref_value, ref_grads) = (
        grad(causal_attention, q, k, v),
        grad(theirs, q, k, v),
    )
    np.testing.assert_allclose(ours_value, ref_value, rtol=tol)
    assert causal_attention(q, k, v).dtype == dtype
    for ours, ref in zip(ours_grads, ref_grads, strict=True):
        assert ours.dtype == dtype
        scale = float(jnp.max(jnp.abs(ref.astype(jnp.float32))))
        np.testing.assert_allclose(
            ours.astype(np.float32), ref.astype(np.float32), atol=tol * scale, rtol=tol
        )
