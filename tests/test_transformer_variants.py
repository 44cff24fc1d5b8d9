"""Transformer variants (GQA/MQA, head_dim, learned positions, LayerNorm, plain MLP, biases, Llama-3
RoPE scaling) against a float64 numpy reference; packed rows (positions, segment_ids).

The reference reads the params by their documented names and layouts (the contract with the
Hugging Face importer), and groups query heads onto kv heads with `np.repeat`, transformers'
`repeat_kv` order.
"""

import functools
import math

import jax
import numpy as np
import pytest
from flax import nnx

from jaxnv.config import TransformerConfig
from jaxnv.core.losses import softmax_cross_entropy
from jaxnv.core.precision import get_policy
from jaxnv.core.state import param_count
from jaxnv.models import build_model
from jaxnv.models.layers import rope_inv_freq
from jaxnv.models.transformer import Transformer, flops_per_token, num_params

VOCAB, SEQ = 37, 16
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}  # fmt: skip
VARIANTS = {
    "default": dict(num_heads=2),
    # Llama-3 / Mistral: grouped-query attention, a head_dim that is not D / N, untied head
    "llama": dict(num_heads=4, num_kv_heads=2, head_dim=16, tie_embeddings=False,
                  rope_theta=500000.0, rope_scaling=LLAMA3, norm_eps=1e-5),
    # Qwen2: q/k/v biases; here with one kv head (MQA)
    "qwen2": dict(num_heads=4, num_kv_heads=1, qkv_bias=True, rope_theta=1e6),
    # GPT-2: learned positions, LayerNorm, plain MLP with gelu_new, biases everywhere
    "gpt2": dict(num_heads=2, position="learned", norm="layer", norm_eps=1e-5, mlp="plain",
                 activation="gelu_tanh", qkv_bias=True, out_bias=True, mlp_bias=True),
}  # fmt: skip


def _model(variant="default", seed=0, **kw):
    kw = dict(num_layers=2, embed_dim=32, mlp_dim=64, max_seq_len=SEQ, **VARIANTS[variant], **kw)
    model = Transformer(VOCAB, policy=get_policy("fp32"), rngs=nnx.Rngs(seed), **kw)
    # biases and norm params start at 0 and 1: perturb them so that the test can see them
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    rng = np.random.default_rng(seed)
    perturbed = jax.tree_util.tree_map_with_path(
        lambda path, a: (
            a + 0.1 * rng.standard_normal(a.shape).astype(a.dtype)
            if str(path[-1].key) in ("scale", "bias", "bqkv", "bo", "b_up", "b_down")
            else a
        ),
        pure,
    )
    nnx.replace_by_pure_dict(state, perturbed)
    return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, positions=None, segment_ids=None):
    return nnx.merge(graphdef, state)(tokens, positions=positions, segment_ids=segment_ids)


def _logits(model, tokens, positions=None, segment_ids=None):
    return _forward(*nnx.split(model), tokens, positions, segment_ids)


# ------------------------------------------------------------------------ the numpy reference
def _inv_freq64(H, theta, scaling):
    """transformers' default and llama3 rope frequencies, transcribed loop by loop in float64."""
    inv = [theta ** (-(2 * i) / H) for i in range(H // 2)]
    if scaling is None:
        return np.array(inv)
    f, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for w in inv:
        wavelen = 2 * math.pi / w
        if wavelen < old / hi:
            out.append(w)
        elif wavelen > old / lo:
            out.append(w / f)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append((1 - smooth) * w / f + smooth * w)
    return np.array(out)


def _norm(x, p, kind, eps):
    if kind == "layer":
        x = x - x.mean(-1, keepdims=True)
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * p["scale"]


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def reference_logits(model, tokens, positions):
    """Logits (B, T, vocab) in float64 numpy, each row causal over itself."""
    kw = model.init_kwargs()
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(model)))
    N, K, H = kw["num_heads"], kw["num_kv_heads"], kw["head_dim"]
    G, (B, T), eps = N // K, tokens.shape, kw["norm_eps"]
    act = {"silu": lambda x: x / (1 + np.exp(-x)), "gelu_tanh": _gelu_tanh}[kw["activation"]]
    x = p["embedding"][tokens]
    if kw["position"] == "learned":
        x = x + p["pos_embedding"][positions]
    inv = _inv_freq64(H, kw["rope_theta"], kw["rope_scaling"])
    ang = positions[..., None] * inv  # (B, T, H/2)
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]

    def rope(t):
        t1, t2 = t[..., : H // 2], t[..., H // 2 :]
        return np.concatenate([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1)

    for i in range(kw["num_layers"]):
        blk = jax.tree.map(lambda a, i=i: a[i], p["blocks"])  # layer i of the stacked blocks
        a = blk["attn"]
        qkv = np.einsum("btd,dkgh->btkgh", _norm(x, blk["attn_norm"], kw["norm"], eps), a["wqkv"])
        qkv = qkv + a.get("bqkv", 0.0)
        q = qkv[:, :, :, :G].reshape(B, T, N, H)
        k, v = qkv[:, :, :, G], qkv[:, :, :, G + 1]  # (B, T, K, H)
        if kw["position"] == "rope":
            q, k = rope(q), rope(k)
        k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)  # repeat_kv: head n -> n // G
        s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w = w / w.sum(-1, keepdims=True)
        y = np.einsum("bnts,bsnh->btnh", w, v)
        x = x + np.einsum("btnh,nhd->btd", y, a["wo"]) + a.get("bo", 0.0)
        m, h = blk["mlp"], _norm(x, blk["mlp_norm"], kw["norm"], eps)
        if kw["mlp"] == "gated":
            hidden = act(h @ m["w_gate_up"][:, 0]) * (h @ m["w_gate_up"][:, 1])
        else:
            hidden = act(h @ m["w_up"] + m.get("b_up", 0.0))
        x = x + hidden @ m["w_down"] + m.get("b_down", 0.0)
    x = _norm(x, p["final_norm"], kw["norm"], eps)
    head = p["embedding"].T if kw["tie_embeddings"] else p["head"]
    return (x @ head)[..., :VOCAB]


def _tokens(batch=2, seq=SEQ, seed=1):
    return np.asarray(jax.random.randint(jax.random.key(seed), (batch, seq), 0, VOCAB), np.int32)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_matches_float64_reference(variant):
    model = _model(variant)
    tokens = _tokens()
    positions = np.broadcast_to(np.arange(SEQ), (2, SEQ))
    want = reference_logits(model, tokens, positions)
    np.testing.assert_allclose(_logits(model, tokens), want, rtol=1e-5, atol=1e-5)
    # the param count and the FLOPs formula count this variant
    kw = model.init_kwargs()
    assert num_params(**kw) == param_count(nnx.state(model, nnx.Param))
    # looked-up tables cost no FLOPs: an untied input table, learned positions
    tables = 128 * 32 * (not kw["tie_embeddings"]) + SEQ * 32 * (variant == "gpt2")
    width = kw["num_heads"] * kw["head_dim"]
    want_flops = 6 * (num_params(**kw) - tables) + 12 * 2 * SEQ * width
    assert model.flops_per_token() == want_flops == flops_per_token(seq_len=SEQ, **kw)


def test_llama3_rope_frequencies_match_transcription():
    got = rope_inv_freq(16, 500000.0, LLAMA3)
    want = _inv_freq64(16, 500000.0, LLAMA3)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    plain = rope_inv_freq(16, 500000.0)
    # the test's setting exercises all three bands: kept, interpolated, divided by the factor
    ratio = plain / got
    assert np.isclose(ratio, 1).any() and np.isclose(ratio, 8).any()
    assert ((ratio > 1.01) & (ratio < 7.99)).any()


def test_param_layout_is_the_importer_contract():
    shapes = {
        v: {
            jax.tree_util.keystr(k): (x[...].shape, tuple(x.out_sharding))
            for k, x in jax.tree_util.tree_leaves_with_path(
                nnx.state(_model(v), nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)
            )
        }
        for v in ("llama", "gpt2")
    }
    llama, gpt2 = shapes["llama"], shapes["gpt2"]
    blk = "['blocks']"  # stacked: a leading "layers" axis of L = 2
    wqkv = ((2, 32, 2, 4, 16), ("layers", "embed", "heads", None, "kv"))
    assert llama[f"{blk}['attn']['wqkv']"] == wqkv
    assert llama[f"{blk}['attn']['wo']"] == ((2, 4, 16, 32), ("layers", "heads", "kv", "embed"))
    assert llama["['head']"] == ((32, 128), ("embed", "vocab"))
    assert llama[f"{blk}['mlp']['w_gate_up']"] == ((2, 32, 2, 64), ("layers", "embed", None, "mlp"))
    assert gpt2["['pos_embedding']"] == ((SEQ, 32), (None, "embed"))
    assert gpt2[f"{blk}['attn']['bqkv']"] == ((2, 2, 3, 16), ("layers", "heads", None, "kv"))
    assert gpt2[f"{blk}['attn']['bo']"] == ((2, 32), ("layers", "embed"))
    assert gpt2[f"{blk}['mlp']['w_up']"] == ((2, 32, 64), ("layers", "embed", "mlp"))
    assert gpt2[f"{blk}['mlp']['b_up']"] == ((2, 64), ("layers", "mlp"))
    assert gpt2[f"{blk}['mlp']['b_down']"] == ((2, 32), ("layers", "embed"))
    assert gpt2[f"{blk}['attn_norm']['bias']"] == ((2, 32), ("layers", "embed"))
    assert gpt2["['final_norm']['bias']"] == ((32,), ("embed",))
    assert not any("bias" in k or "pos_" in k or "b_" in k for k in llama)
    assert not any("w_gate_up" in k or "head" in k for k in gpt2)


def test_build_model_mirrors_the_switches():
    cfg = TransformerConfig(
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, embed_dim=32, mlp_dim=64,
        tie_embeddings=False, rope_theta=500000.0, rope_scaling="llama3", rope_scaling_factor=8.0,
        rope_original_max_len=64, norm_eps=1e-5,
    )  # fmt: skip
    built = build_model(cfg, SEQ, VOCAB, get_policy("fp32"), nnx.Rngs(0))
    assert built.init_kwargs() == _model("llama").init_kwargs()
    switches = {k: v for k, v in VARIANTS["gpt2"].items() if k != "num_heads"}
    gpt2 = TransformerConfig(num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64, **switches)
    built = build_model(gpt2, SEQ, VOCAB, get_policy("fp32"), nnx.Rngs(0))
    assert built.init_kwargs() == _model("gpt2").init_kwargs()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_heads=4, num_kv_heads=3), "num_heads=4 must be a multiple of model.num_kv_heads"),
        (dict(position="alibi"), "model.position='alibi': use one of rope, learned"),
        (dict(norm="batch"), "model.norm='batch': use one of rms, layer"),
        (dict(mlp="moe"), "model.mlp='moe': use one of gated, plain"),
        (dict(head_dim=7), "model.head_dim=7 must be even"),
        (dict(rope_scaling={"rope_type": "yarn"}), "rope_scaling type 'yarn' is not supported"),
        (dict(rope_scaling={"rope_type": "llama3"}), "lacks factor, low_freq_factor"),
    ],
)
def test_bad_switches_are_one_line_errors(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        Transformer(VOCAB, embed_dim=32, **{"num_heads": 2, **kw}, rngs=nnx.Rngs(0))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------- packing
DOCS = [(0, 5), (0, 7), (1, 11)]  # (row, length): row 0 packs two documents, row 1 one
PADDING = {0: 4, 1: 5}


def _packed(seed=2):
    """Two packed rows, segment ids (0: padding), positions restarting per document, and the
    documents themselves right-padded to SEQ (causality makes the padding inert)."""
    rng = np.random.default_rng(seed)
    tokens, segments, positions = (np.zeros((2, SEQ), np.int32) for _ in range(3))
    alone, starts, fill = np.zeros((len(DOCS), SEQ), np.int32), [], [0, 0]
    for i, (row, n) in enumerate(DOCS):
        doc = rng.integers(1, VOCAB, n)
        start = fill[row]
        tokens[row, start : start + n], segments[row, start : start + n] = doc, i + 1
        positions[row, start : start + n] = np.arange(n)
        alone[i, :n] = doc
        starts.append(start)
        fill[row] += n
    for row, n in PADDING.items():
        tokens[row, SEQ - n :] = rng.integers(0, VOCAB, n)  # padding: any ids, segment 0
    return tokens, segments, positions, alone, starts


@pytest.mark.parametrize("variant", ["default", "gpt2"])
def test_packed_documents_get_their_own_logits(variant):
    model = _model(variant)
    tokens, segments, positions, alone, starts = _packed()
    packed = np.asarray(_logits(model, tokens, positions, segments))
    assert np.isfinite(packed).all()
    single = np.asarray(_logits(model, alone))  # (docs, SEQ, vocab)
    for i, (row, n) in enumerate(DOCS):
        np.testing.assert_allclose(packed[row, starts[i] : starts[i] + n], single[i, :n],
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    # remat's scan over the blocks takes the same arguments
    remat = _model(variant, remat="full")
    np.testing.assert_allclose(_logits(remat, tokens, positions, segments), packed, atol=1e-6)


def test_masked_loss_gradients_ignore_padding_and_padding_rows_are_finite():
    model = _model("llama")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens, segments, positions, _, _ = _packed()
    segments[1] = 0  # row 1 is all padding: it must not produce NaN either

    @jax.jit
    def loss_and_grad(params, tokens):
        def loss(params):
            logits = nnx.merge(graphdef, params, rest)(
                tokens[:, :-1], positions=positions[:, :-1], segment_ids=segments[:, :-1]
            )
            weights = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
            return softmax_cross_entropy(logits, tokens[:, 1:], mask=weights), logits

        return jax.value_and_grad(loss, has_aux=True)(params)

    (value, logits), grads = loss_and_grad(params, tokens)
    assert np.isfinite(logits).all() and np.isfinite(value)
    other = tokens.copy()
    other[segments == 0] = (other[segments == 0] + 7) % VOCAB  # change every padding token
    (value2, _), grads2 = loss_and_grad(params, other)
    assert value2 == value
    flat = jax.tree.leaves(grads)
    assert any(np.abs(g).max() > 0 for g in flat)
    jax.tree.map(np.testing.assert_array_equal, grads, grads2)
