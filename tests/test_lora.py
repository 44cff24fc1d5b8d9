"""LoRA (jaxnv/models/lora.py): adapters as the only trained params, a frozen base, merge.

Every figure is checked against a formula or an independent computation: the parameter count
against r * (in + out) per adapted weight, gradients against jax.grad of a hand-written
W + (alpha / r) * A @ B forward, merged logits against the adapted model's.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxnv import fit
from jaxnv.checkpoint.manager import CheckpointError
from jaxnv.config import LoRAConfig
from jaxnv.core.state import path_str
from jaxnv.models import MLP, Transformer
from jaxnv.models.lora import apply_lora, merge

V, D, N, K, H, F, L = 64, 32, 4, 2, 8, 64, 2  # vocab, embed, heads, kv heads, head dim, mlp, layers
G = N // K
ALL = ("wqkv", "wo", "w_gate_up", "w_down")


def transformer(rngs):
    return Transformer(V, num_layers=L, num_heads=N, num_kv_heads=K, embed_dim=D, mlp_dim=F,
                       max_seq_len=16, rngs=rngs)  # fmt: skip


def lm_loss(model, batch, rng):
    logits = model(batch["x"], rng)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def batches(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.integers(0, V, (8, 16)).astype(np.int32)
        out.append({"x": x, "y": np.roll(x, -1, axis=1)})
    return out


def run(lora, steps=4, **kw):
    kw = {"progress": False, "tensorboard": False, "mfu": False, "log_every": 1, **kw}
    opt, model = kw.pop("optimizer", optax.adam(1e-2)), kw.pop("model", transformer)
    return fit(model, lm_loss, batches(steps), steps=steps, optimizer=opt, lora=lora, **kw)


def flat(tree):
    return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.slow
def test_only_the_adapters_train_and_merge_folds_them_in():
    """One LoRA run from a built module: the trained count is r * (in + out) per adapted weight,
    the optimizer state at most 3x the adapters, the base the module's weights bit for bit after
    the steps, and the merged model gives the adapted model's logits."""
    r = 3
    module = transformer(nnx.Rngs(0))
    initial = flat(nnx.to_pure_dict(nnx.state(module, nnx.Param)))
    result = run(LoRAConfig(rank=r, alpha=8.0, targets=ALL), steps=3, model=module)
    per_layer = r * (D + K * (G + 2) * H) + r * (N * H + D) + r * (D + 2 * F) + r * (F + D)
    assert result.summary["params"] == L * per_layer
    params = flat(result.state.params)
    assert all("_lora/" in p for p in params) and len(params) == 2 * len(ALL)  # A, B each
    assert all(x.shape[0] == L for x in params.values())  # stacked: one adapter per layer
    # optimizer state: adam's two moments of the adapters and a count, nothing of the base
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(result.state.opt_state))
    adapter_bytes = sum(x.nbytes for x in params.values())
    assert adapter_bytes < opt_bytes <= 3 * adapter_bytes
    base = flat(result.state.model_state)
    assert set(base) == set(initial) and set(result.state.frozen) == set(initial)
    for k, v in initial.items():
        np.testing.assert_array_equal(base[k], v, err_msg=k)
    assert all(np.abs(v).max() > 0 for k, v in params.items() if k.endswith("/b"))  # trained
    assert not jax.tree.leaves(nnx.state(module, nnx.LoRAParam))  # the caller's module: as it was

    model = result.model
    tokens = jnp.asarray(batches(1, seed=1)[0]["x"])
    merged = merge(model)
    assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))  # a plain model again
    np.testing.assert_allclose(merged(tokens), model(tokens), atol=1e-5)
    assert jax.tree.leaves(nnx.state(model, nnx.LoRAParam))  # merge left its argument alone


def test_lora_gradient_equals_a_hand_written_merged_forward():
    """jax.grad through the layers' x A B path equals jax.grad of a plain model whose weights
    are W + scale * A @ B, written out per target with einsum."""
    cfg = LoRAConfig(rank=2, alpha=6.0, targets=ALL)
    model = apply_lora(transformer(nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1))
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    # B is zero at the start: make it random so that every term matters
    keys = iter(jax.random.split(jax.random.PRNGKey(2), 100))
    adapters = jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape), adapters)
    batch = {k: jnp.asarray(v) for k, v in batches(1)[0].items()}
    plain_graphdef, base = nnx.split(transformer(nnx.Rngs(0)))
    scale = cfg.alpha / cfg.rank
    forms = {"wqkv": "dr,rkgh->dkgh", "wo": "nhr,rd->nhd", "w_gate_up": "dr,rcf->dcf",
             "w_down": "fr,rd->fd"}  # fmt: skip

    def reference(adapters):
        a = nnx.to_pure_dict(adapters)
        weights = nnx.to_pure_dict(base)
        for i in range(L):
            for part, names in (("attn", ("wqkv", "wo")), ("mlp", ("w_gate_up", "w_down"))):
                for name in names:
                    ab = a["blocks"][part][name + "_lora"]  # stacked: layer i at [i]
                    w = weights["blocks"][part][name]
                    delta = scale * jnp.einsum(forms[name], ab["a"][i], ab["b"][i])
                    weights["blocks"][part][name] = w.at[i].add(delta)
        return lm_loss(nnx.merge(plain_graphdef, weights), batch, None)

    def adapted(adapters):
        return lm_loss(nnx.merge(graphdef, adapters, rest), batch, None)

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(reference))(adapters)
    loss, grads = jax.jit(jax.value_and_grad(adapted))(adapters)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for (k, g), r in zip(flat(grads).items(), flat(ref_grads).values(), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6, err_msg=k)


def _bytes(directory):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory) for f in fs)


@pytest.mark.slow
def test_checkpoint_holds_the_adapters_only_and_resume_is_exact(tmp_path):
    """Full and LoRA checkpoints of one model: the LoRA one is under 5 % of the other. A LoRA run
    (with adapter dropout, whose stream is carried) of 2N steps equals N steps then a resume to
    2N, row for row; a resume onto another base is refused with one line."""

    def wider(rngs):  # big enough that orbax's fixed overhead does not dominate
        return Transformer(V, num_layers=L, num_heads=N, num_kv_heads=K, embed_dim=128,
                           max_seq_len=16, rngs=rngs)  # fmt: skip

    lora = LoRAConfig(rank=2, targets=("wqkv", "wo"), dropout=0.1)
    full = run(None, steps=2, workdir=str(tmp_path / "full"), model=wider)
    adapters = run(lora, steps=2, workdir=str(tmp_path / "lora"), model=wider)
    ratio = _bytes(tmp_path / "lora" / "checkpoints") / _bytes(tmp_path / "full" / "checkpoints")
    print(f"checkpoint size ratio {ratio:.4f}")
    assert ratio < 0.05, ratio
    assert adapters.summary["params"] < 0.02 * full.summary["params"]

    straight = run(lora, steps=4, workdir=str(tmp_path / "straight"))
    first = run(lora, steps=2, workdir=str(tmp_path / "resumed"), checkpoint_every=2)
    second = fit(transformer, lm_loss, batches(4), steps=4, optimizer=optax.adam(1e-2), lora=lora,
                 workdir=str(tmp_path / "resumed"), progress=False, tensorboard=False, mfu=False,
                 log_every=1)  # fmt: skip
    assert first.summary["steps"] == 2 and second.summary["resumed_from"] == 2

    def rows(name):
        with open(tmp_path / name / "metrics.jsonl", encoding="utf-8") as f:
            return [{k: v for k, v in json.loads(line).items() if "per_sec" not in k} for line in f]

    assert rows("resumed") == rows("straight")
    for k, v in flat(straight.state.params).items():
        np.testing.assert_array_equal(flat(second.state.params)[k], v, err_msg=k)

    def other_base(rngs):  # same shapes, other weights
        return transformer(nnx.Rngs(123))

    with pytest.raises(CheckpointError) as err:
        fit(other_base, lm_loss, batches(6), steps=6, optimizer=optax.adam(1e-2), lora=lora,
            workdir=str(tmp_path / "resumed"), progress=False, tensorboard=False)  # fmt: skip
    assert "another base" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_fsdp_curve_equals_one_device_and_bf16_keeps_fp32_adapters():
    lora = LoRAConfig(rank=2, targets=ALL)
    one = run(lora, steps=3, devices=jax.devices()[:1])
    sharded = run(lora, steps=3, mesh={"fsdp": 8}, rules="fsdp")
    losses = [[r["loss"] for r in x.history if r["split"] == "train"] for x in (one, sharded)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    wqkv = sharded.state.model_state["blocks"]["attn"]["wqkv"]
    assert "fsdp" in str(wqkv.sharding.spec)  # the frozen base is sharded like a param

    bf16 = run(lora, steps=3, mesh={"fsdp": 8}, rules="fsdp", precision="bf16")
    state = bf16.state
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert moments and {x.dtype for x in moments} == {jnp.dtype(jnp.float32)}
    base = [state.model_state["blocks"]["attn"][n] for n in ("wqkv", "wo")]
    assert {x.dtype for x in base} == {jnp.dtype(jnp.bfloat16)}
    got = [r["loss"] for r in bf16.history if r["split"] == "train"]
    np.testing.assert_allclose(got, losses[0], rtol=2e-2)


@pytest.mark.parametrize(
    ("lora", "model", "needle"),
    [
        (LoRAConfig(rank=4, targets=("wq",)), transformer, "wqkv wo w_gate_up w_up w_down"),
        (LoRAConfig(rank=-1), transformer, "lora.rank=-1 must be >= 0"),
        (LoRAConfig(rank=4, targets=("w_up",)), transformer, "its projections are"),
        (LoRAConfig(rank=4), lambda rngs: MLP(16, (8,), 1, rngs=rngs), "none of them"),
    ],
)
def test_bad_lora_settings_are_one_line(lora, model, needle):
    data = {"x": np.zeros((8, 16), np.int32), "y": np.zeros((8, 16), np.int32)}
    if model is not transformer:
        data = {"x": np.zeros((8, 16), np.float32), "y": np.zeros((8, 1), np.float32)}
    with pytest.raises(ValueError) as err:
        fit(model, lm_loss, [data], steps=1, lora=lora, progress=False, tensorboard=False)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_adapter_dropout_draws_new_masks_per_layer_and_call():
    """The stacked adapters keep one dropout stream a layer: in train mode each call advances
    every layer's stream (two calls differ), eval mode is deterministic, and a pipeline refuses
    it in one line."""
    cfg = LoRAConfig(rank=2, targets=("wqkv",), dropout=0.5)
    model = apply_lora(transformer(nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1))
    adapter = model.blocks.attn.wqkv_lora
    adapter.b[...] = jax.random.normal(jax.random.PRNGKey(3), adapter.b.shape)  # B matters
    assert adapter.rngs.dropout.key.shape == (L,) and adapter.rngs.dropout.count.shape == (L,)
    tokens = jnp.asarray(batches(1)[0]["x"])
    model.train()
    first, second = model(tokens), model(tokens)
    assert np.abs(np.asarray(first - second)).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(adapter.rngs.dropout.count[...]), [2] * L)
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(model(tokens)))

    from jaxnv.parallel import MeshConfig, make_mesh
    from jaxnv.parallel.pipeline import Pipeline

    model.train()
    model.pipeline = Pipeline(2)
    with jax.set_mesh(make_mesh(MeshConfig(stage=2, data=1), jax.devices()[:2])):
        with pytest.raises(ValueError, match="lora.dropout needs mesh.stage=1"):
            model(tokens)
