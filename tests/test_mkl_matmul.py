"""`model.matmul=mkl`: the transformer's matmuls through Intel MKL, as XLA FFI calls.

The matmul against float64 numpy; fused causal attention (RoPE, GQA) and the gated MLP's SiLU
against float64 JAX; their gradients, under jit and vmap. A training curve, the gradients under
every remat policy and greedy decoding (offline and in the serving engine) against
`model.matmul=xla`; the export of an MKL run; the start-up line, `jaxnv info`, and the one-line
errors where it cannot run.
"""

import importlib.metadata
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnv import apply_overrides
from jaxnv.experiment import load_experiment
from jaxnv.models import Transformer
from jaxnv.models import mkl as mkl_mod
from jaxnv.models.generate import generate
from jaxnv.serve.engine import Engine, SamplingParams
from jaxnv.serve.export import export_workdir, load
from jaxnv.train import train

TINY = ["train.steps=6", "model.num_layers=2", "model.embed_dim=64", "model.num_heads=2",
        "data.seq_len=32", "train.batch_size=4", "train.eval_every=0", "logging.log_every=1",
        "logging.progress=false", "logging.tensorboard=false"]  # fmt: skip


def _f64(a):
    return np.asarray(a, np.float64)


@pytest.mark.parametrize(
    "x_shape, w_shape, contract, transpose_w",
    [
        ((3, 5, 7), (7, 2, 4), 1, False),  # the gated MLP's (D, 2, F)
        ((3, 5, 2, 4), (2, 4, 6), 2, False),  # the output projection's (N, H, D)
        ((3, 5, 7), (9, 7), 1, True),  # the tied head: x @ table.T
    ],
)
def test_matmul_and_its_gradients_equal_float64(x_shape, w_shape, contract, transpose_w):
    rng = np.random.default_rng(0)
    x = rng.normal(size=x_shape).astype(np.float32)
    w = rng.normal(size=w_shape).astype(np.float32)
    k = int(np.prod(x_shape[len(x_shape) - contract :]))
    x2 = _f64(x).reshape(-1, k)
    w2 = _f64(w).reshape(-1, k).T if transpose_w else _f64(w).reshape(k, -1)
    y2 = x2 @ w2

    def loss(x, w):
        return jnp.sum(jnp.sin(mkl_mod.matmul(x, w, contract, transpose_w=transpose_w)))

    y = jax.jit(lambda x, w: mkl_mod.matmul(x, w, contract, transpose_w=transpose_w))(x, w)
    out_shape = x_shape[: len(x_shape) - contract] + (
        w_shape[: len(w_shape) - contract] if transpose_w else w_shape[contract:]
    )
    assert y.shape == out_shape and y.dtype == jnp.float32
    np.testing.assert_allclose(_f64(y).reshape(y2.shape), y2, rtol=1e-5, atol=1e-5)
    dx, dw = jax.jit(jax.grad(loss, (0, 1)))(x, w)
    g = np.cos(y2)  # d loss / d y
    dx_ref = (g @ w2.T).reshape(x_shape)
    dw_ref = (x2.T @ g).T.reshape(w_shape) if transpose_w else (x2.T @ g).reshape(w_shape)
    np.testing.assert_allclose(_f64(dx), dx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_f64(dw), dw_ref, rtol=1e-5, atol=1e-5)


def test_matmul_under_vmap_shared_and_batched_weights():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 3, 7)).astype(np.float32)
    w = rng.normal(size=(7, 5)).astype(np.float32)
    ws = rng.normal(size=(4, 7, 5)).astype(np.float32)
    shared = jax.jit(jax.vmap(lambda r: mkl_mod.matmul(r, w)))(x)
    np.testing.assert_allclose(_f64(shared), _f64(x) @ _f64(w), rtol=1e-5, atol=1e-5)
    both = jax.jit(jax.vmap(mkl_mod.matmul))(x, ws)
    ref = np.einsum("btd,bdf->btf", _f64(x), _f64(ws))
    np.testing.assert_allclose(_f64(both), ref, rtol=1e-5, atol=1e-5)
    # per-example gradients: vmap of grad, through the batched backward calls
    per_example = jax.vmap(jax.grad(lambda r: jnp.sum(mkl_mod.matmul(r, w) ** 2)))(x)
    expected = 2 * (_f64(x) @ _f64(w)) @ _f64(w).T
    np.testing.assert_allclose(_f64(per_example), expected, rtol=1e-5, atol=1e-4)


def _reference64(x, positions, G, theta=10000.0):
    """Plain-jnp causal attention from the packed (B, T, K, G+2, H), RoPE (rotate-half) at
    `positions` (T,) or (B, T) or none: run under jax.enable_x64 on float64 input."""
    B, T, K, _, H = x.shape
    q, k, v = x[:, :, :, :G].reshape(B, T, K * G, H), x[:, :, :, G], x[:, :, :, G + 1]
    if positions is not None:
        inv = 1.0 / theta ** (jnp.arange(0, H, 2, dtype=jnp.float64) / H)
        positions = jnp.broadcast_to(jnp.asarray(positions, jnp.float64), (B, T))
        angles = (positions[..., None] * inv[None, None])[:, :, None]  # (B, T, 1, H/2)
        c, s = jnp.cos(angles), jnp.sin(angles)

        def rotate(t):
            t1, t2 = t[..., : H // 2], t[..., H // 2 :]
            return jnp.concatenate([t1 * c - t2 * s, t2 * c + t1 * s], -1)

        q, k = rotate(q), rotate(k)
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    scores = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    scores = jnp.where(jnp.tril(jnp.ones((T, T), bool)), scores, -jnp.inf)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, axis=-1), v)


@pytest.mark.parametrize(
    "B, T, N, K, H, positions",
    [
        (2, 8, 4, 2, 16, "shared"),  # GQA
        (3, 45, 2, 2, 8, "per row"),  # MHA, rows past one 32-row block, offsets per row
        (1, 5, 3, 1, 4, "shared"),  # MQA
        (2, 33, 2, 1, 6, None),  # no RoPE (learned positions)
    ],
)
def test_packed_causal_attention_and_its_gradients_equal_float64(B, T, N, K, H, positions):
    """From the packed projection (B, T, K, G+2, H), query head n = k * G + g on kv head k, as
    the Attention layer packs it; RoPE rotates queries and keys first."""
    from jaxnv.models.layers import rope_tables

    rng = np.random.default_rng(2)
    G = N // K
    qkv = rng.normal(size=(B, T, K, G + 2, H)).astype(np.float32)
    pos = None
    if positions == "shared":
        pos = np.arange(T)
    elif positions == "per row":
        pos = np.arange(T)[None] + rng.integers(0, 100, size=(B, 1))
    w = rng.normal(size=(B, T, N, H))  # the gradient of sum(out * w)

    tables = () if pos is None else rope_tables(jnp.asarray(pos), H)
    attend = jax.jit(lambda x: mkl_mod.packed_causal_attention(x, *tables))
    got = attend(qkv)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(attend(x) * w.astype(np.float32))))(qkv)
    with jax.enable_x64(True):
        out = _reference64(_f64(qkv), pos, G)
        ref_grad = jax.grad(lambda x: jnp.sum(_reference64(x, pos, G) * w))(_f64(qkv))
    assert got.shape == (B, T, N, H) and grad.shape == qkv.shape
    np.testing.assert_allclose(_f64(got), np.asarray(out), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_f64(grad), np.asarray(ref_grad), rtol=1e-4, atol=1e-5)


def test_packed_causal_attention_with_peaked_scores_equals_float64():
    """Scores hundreds apart (most probabilities underflow to 0): the same as float64."""
    qkv = 12 * np.random.default_rng(4).normal(size=(2, 40, 1, 3, 8)).astype(np.float32)
    with jax.enable_x64(True):
        out = np.asarray(_reference64(_f64(qkv), None, 1))
    got = _f64(jax.jit(mkl_mod.packed_causal_attention)(qkv))
    assert np.isfinite(got).all()  # scores this large lose ~1e-5 in float32 (XLA's too)
    np.testing.assert_allclose(got, out, rtol=1e-4, atol=1e-4)


def test_silu_gate_and_its_gradient_equal_float64():
    """The gated MLP's silu(gate) * up from (..., 2, F), gates from -200 to 200 included."""
    rng = np.random.default_rng(5)
    gate_up = (4 * rng.normal(size=(3, 37, 2, 50))).astype(np.float32)
    gate_up[0, 0, 0, :4] = [-200.0, -90.0, 90.0, 200.0]  # beyond the exp clamp at 80
    w = rng.normal(size=(3, 37, 50))

    def reference(x):
        return jax.nn.silu(x[..., 0, :]) * x[..., 1, :]

    got = jax.jit(mkl_mod.silu_gate)(gate_up)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(mkl_mod.silu_gate(x) * w.astype(np.float32))))(
        gate_up
    )
    with jax.enable_x64(True):
        out = np.asarray(reference(_f64(gate_up)))
        ref_grad = np.asarray(jax.grad(lambda x: jnp.sum(reference(x) * w))(_f64(gate_up)))
    np.testing.assert_allclose(_f64(got), out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_f64(grad), ref_grad, rtol=1e-5, atol=1e-6)
    rows = jax.jit(jax.vmap(mkl_mod.silu_gate))(gate_up)  # one call per row under vmap
    np.testing.assert_array_equal(rows, got)


def test_packed_causal_attention_under_vmap():
    """vmap over a leading axis runs one call per element: the same as each alone."""
    qkv = np.random.default_rng(3).normal(size=(3, 2, 9, 1, 3, 4)).astype(np.float32)
    both = jax.jit(jax.vmap(mkl_mod.packed_causal_attention))(qkv)
    for i in range(3):
        np.testing.assert_array_equal(both[i], mkl_mod.packed_causal_attention(qkv[i]))


def test_lora_adapters_with_mkl_equal_xla():
    """LoRA adapters beside projections that run through MKL: the same adapter gradients."""
    from jaxnv.config import LoRAConfig
    from jaxnv.models.lora import apply_lora

    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 16), 0, 100)
    cfg = LoRAConfig(rank=4, targets=("wqkv", "w_gate_up", "w_down"))
    grads = []
    for kernel in ("xla", "mkl"):
        model = Transformer(100, num_layers=2, num_heads=2, embed_dim=32, max_seq_len=32,
                            matmul=kernel, rngs=nnx.Rngs(0))  # fmt: skip
        model = apply_lora(model, cfg, rngs=nnx.Rngs(1))
        for path, leaf in nnx.iter_graph(model):  # nonzero B, so the adapters change outputs
            if isinstance(leaf, nnx.LoRAParam) and "b" in str(path[-1]):
                leaf[...] = jnp.full(leaf.shape, 0.05)
        diff = nnx.DiffState(0, nnx.LoRAParam)
        grads.append(nnx.state(nnx.grad(lambda m: jnp.mean(m(tokens) ** 2), argnums=diff)(model)))
    leaves = [jax.tree.leaves(g) for g in grads]
    assert leaves[0]  # adapter gradients exist
    for a, b in zip(*leaves, strict=True):
        np.testing.assert_allclose(_f64(b), _f64(a), rtol=1e-4, atol=1e-8)


def _curve(tmp_path, kernel, capsys):
    exp = load_experiment("char_gpt")
    exp.config = apply_overrides(exp.config, [*TINY, f"model.matmul={kernel}"])
    result = train(exp, workdir=str(tmp_path / kernel), devices=jax.devices()[:1])
    return [h["loss"] for h in result.history if h["split"] == "train"], capsys.readouterr().out


def test_training_curve_equals_xla_and_the_choice_is_printed(tmp_path, capsys):
    xla, xla_out = _curve(tmp_path, "xla", capsys)
    ours, out = _curve(tmp_path, "mkl", capsys)
    assert len(ours) == len(xla) == 6
    np.testing.assert_allclose(ours, xla, rtol=1e-5)
    assert xla[-1] < xla[0]  # it trains
    assert "matmul: mkl (Intel MKL for the projections" in out
    assert "matmul:" not in xla_out  # XLA's dot, the default, needs no line


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_gradients_equal_xla_under_each_remat_policy(remat):
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 16), 0, 100)
    grads = []
    for kernel in ("xla", "mkl"):
        model = Transformer(100, num_layers=2, num_heads=2, embed_dim=32, max_seq_len=32,
                            remat=remat, tie_embeddings=remat != "full", matmul=kernel,
                            rngs=nnx.Rngs(0))  # fmt: skip
        grads.append(nnx.state(nnx.grad(lambda m: jnp.mean(m(tokens) ** 2))(model)))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(_f64(b), _f64(a), rtol=1e-4, atol=1e-8)


def test_greedy_decoding_offline_and_in_the_engine_equals_xla():
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    outputs = {}
    for kernel in ("xla", "mkl"):
        model = Transformer(61, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                            max_seq_len=32, matmul=kernel, rngs=nnx.Rngs(3))  # fmt: skip
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        # larger weights than the 0.02 init, so that greedy tokens depend on every projection
        # (at init the residual stream makes each step repeat the last token)
        params = jax.tree.map(lambda p: p * 25.0, params)
        offline = [generate(graphdef, params, [p], 8, temperature=0.0, model_state=rest)[0].tolist()
                   for p in prompts]  # fmt: skip
        engine = Engine(graphdef, params, rest, slots=2, max_len=32)  # decodes rows under vmap
        served = {}
        for i, p in enumerate(prompts):
            served[str(i)] = [engine.insert(str(i), p, SamplingParams(max_tokens=8)).token]
        while engine.active:
            for event in engine.step():
                served[event.request_id].append(event.token)
        outputs[kernel] = (offline, [served[str(i)] for i in range(len(prompts))])
    assert outputs["mkl"] == outputs["xla"]
    assert outputs["mkl"][0] == outputs["mkl"][1]  # the engine's rows equal offline generate
    assert all(len(set(row)) > 2 for row in outputs["xla"][0]), outputs  # varied tokens


def test_where_it_cannot_run_is_a_one_line_error(tmp_path, monkeypatch):
    def one_line(err):
        assert "\n" not in str(err.value)
        return str(err.value)

    with pytest.raises(ValueError) as err:
        Transformer(50, num_layers=1, embed_dim=32, num_heads=2, matmul="mlk", rngs=nnx.Rngs(0))
    assert "did you mean 'mkl'" in one_line(err)
    with pytest.raises(ValueError) as err:
        Transformer(50, num_layers=1, embed_dim=32, num_heads=2, matmul="mkl", policy="bf16",
                    rngs=nnx.Rngs(0))  # fmt: skip
    assert "float32" in one_line(err) and "model.matmul=xla" in one_line(err)
    with pytest.raises(ValueError) as err:
        mkl_mod.choose_matmul("mkl", jnp.float32, on="gpu")
    assert "CPU" in one_line(err)

    # the mkl wheel missing, or no compiler to build the call with: named fixes, one line each
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    try:
        mkl_mod.load.cache_clear()
        with monkeypatch.context() as m:
            m.setattr(importlib.metadata, "distribution", missing)
            with pytest.raises(ValueError) as err:
                mkl_mod.choose_matmul("mkl", jnp.float32)
            assert 'pip install "jaxnv[mkl]"' in one_line(err)
            assert "not available" in _info_line() and "jaxnv[mkl]" in _info_line()
        with monkeypatch.context() as m:
            m.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing built there yet
            m.setattr(mkl_mod.shutil, "which", lambda name: None)
            with pytest.raises(ValueError) as err:
                mkl_mod.choose_matmul("mkl", jnp.float32)
            assert "C++ compiler" in one_line(err) and "g++" in one_line(err)
            assert not list((tmp_path / "cache").rglob("*.so"))
    finally:
        mkl_mod.load.cache_clear()
    assert mkl_mod.choose_matmul("mkl", jnp.float32)[0] == "mkl"  # built and registered again


def _info_line():
    from jaxnv.info import info_lines

    (line,) = [ln for ln in info_lines() if ln.startswith("model.matmul=mkl:")]
    return line


def test_jaxnv_info_says_whether_it_can_run():
    assert _info_line().startswith("model.matmul=mkl: available (float32, one device")


def test_a_mesh_of_several_devices_is_refused_in_one_line(tmp_path):
    code = (
        "import jax, sys; from jaxnv import apply_overrides; "
        "from jaxnv.experiment import load_experiment; from jaxnv.train import train\n"
        "exp = load_experiment('char_gpt')\n"
        f"exp.config = apply_overrides(exp.config, {TINY!r} + ['model.matmul=mkl'])\n"
        "try:\n"
        f"    train(exp, workdir={str(tmp_path / 'w')!r})\n"
        "except Exception as e:\n"
        "    print('ERROR', type(e).__name__, e)\n"
    )
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("ERROR")]
    assert line, done.stderr[-2000:]
    assert "model.matmul=mkl runs on one device, not a mesh of 2" in line[0]
    assert not (tmp_path / "w").exists()  # refused before anything is written


def test_a_run_trained_with_mkl_exports_through_xla(tmp_path):
    """jax.export refuses custom calls without compatibility guarantees: the export of a run
    trained with model.matmul=mkl lowers the same weights through XLA's dot instead."""
    exp = load_experiment("char_gpt")
    exp.config = apply_overrides(exp.config, [*TINY, "train.steps=2", "train.batch_size=8",
                                              "model.matmul=mkl"])  # fmt: skip
    result = train(exp, workdir=str(tmp_path / "w"), devices=jax.devices()[:1])
    out = export_workdir(exp, str(tmp_path / "w"), str(tmp_path / "export"), platforms=("cpu",))
    tokens = (np.arange(64, dtype=np.int32).reshape(2, 32) * 7) % 100
    exported = load(out)(tokens)
    trained = result.model  # the trained weights, still computing through MKL
    assert trained.matmul_kernel == "mkl"
    np.testing.assert_allclose(exported, np.asarray(trained(jnp.asarray(tokens))), atol=1e-5)
    assert exp.config.model.matmul == "mkl"  # the caller's experiment is left as it was
