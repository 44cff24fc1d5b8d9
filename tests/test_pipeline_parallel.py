"""Pipeline parallelism (`mesh.stage`): the GPipe and circular schedules against the same layers
run one after another, the transformer's loss curve and gradients against the 1-device run,
resume across stage counts, the report's figures, and one-line errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnv import apply_overrides
from jaxnv.experiment import load_experiment
from jaxnv.models import Transformer
from jaxnv.parallel import MeshConfig, make_mesh
from jaxnv.parallel.pipeline import Pipeline, bubble_fraction, check_pipeline, stage_bytes
from jaxnv.train import Callback, build, train

GPT = [
    "logging.progress=false",
    "logging.mfu=false",
    "model.embed_dim=32",
    "model.num_layers=4",
    "model.num_heads=4",
    "data.seq_len=16",
    "train.batch_size=16",
    "train.steps=20",
    "train.eval_every=0",
    "logging.log_every=1",
    "optimizer.warmup_steps=5",
    "train.eval_batch_size=100",  # 100 % 4 != 0: the last eval batch is padded, not refused
]


def _exp(*overrides):
    exp = load_experiment("char_gpt")
    exp.config = apply_overrides(exp.config, [*GPT, *overrides])
    exp.summarize = None  # no sampling
    return exp


def _losses(rows):
    return np.array([r["loss"] for r in rows if r["split"] == "train"])


def _toy_layer(w, x, batched, shared, layer, microbatch):
    return jnp.tanh(x @ w["w"] + w["b"][None]) * batched["scale"] + shared["shift"]


@pytest.mark.parametrize("unroll", [None, False], ids=["unrolled", "looped"])
@pytest.mark.parametrize("stages,repeats,micro", [(4, 1, 4), (4, 1, 2), (2, 2, 4), (4, 2, 8)])
def test_schedule_equals_the_layers_run_in_order(stages, repeats, micro, unroll):
    """Values and gradients of the pipelined toy layers equal a plain loop over the layers, with
    the schedule unrolled (auto, at these sizes) and as nested loops."""
    L, B, D = 8, 16, 8
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.normal(size=(L, D, D)) / np.sqrt(D), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(L, D)), jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, size=(B, 1)), jnp.float32)
    shift = jnp.float32(0.1)

    def reference(params, x):
        for i in range(L):
            x = _toy_layer(jax.tree.map(lambda p, i=i: p[i], params), x, {"scale": scale},
                           {"shift": shift}, i, 0)  # fmt: skip
        return jnp.sum(x**2)

    pipe = Pipeline(stages, micro, repeats, unroll=unroll)

    def pipelined(params, x):
        y = pipe(_toy_layer, params, x, {"scale": scale}, {"shift": shift})
        return jnp.sum(y**2)

    want, want_grads = jax.value_and_grad(reference, argnums=(0, 1))(params, x)
    mesh = make_mesh(MeshConfig(stage=stages, data=-1))
    with jax.set_mesh(mesh):
        got, got_grads = jax.jit(jax.value_and_grad(pipelined, argnums=(0, 1)))(params, x)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _tiny(pipeline=None):
    return Transformer(61, num_layers=8, num_heads=4, embed_dim=32, max_seq_len=16,
                       pipeline=pipeline, rngs=nnx.Rngs(0))  # fmt: skip


def _loss(params, graphdef, tokens):
    logits = nnx.merge(graphdef, params)(tokens)  # (B, T, V)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))


@pytest.mark.parametrize(
    "mesh_cfg,micro",
    [
        pytest.param(MeshConfig(stage=2, data=2, tensor=2, rules="tp"), 4, marks=pytest.mark.slow),
        (MeshConfig(stage=4, data=2), 0),
        (MeshConfig(stage=2, data=2, tensor=2, stage_repeats=2, rules="tp"), 4),
        pytest.param(MeshConfig(stage=4, data=2, stage_repeats=2), 8, marks=pytest.mark.slow),
    ],
    ids=["gpipe-s2d2t2", "gpipe-s4d2", "circular-s2r2d2t2", "circular-s4r2d2"],
)
def test_transformer_gradients_equal_the_unpipelined_ones(mesh_cfg, micro):
    tokens = jax.random.randint(jax.random.PRNGKey(1), (16, 16), 0, 61)
    graphdef, params = nnx.split(_tiny())
    want, want_grads = jax.jit(jax.value_and_grad(_loss), static_argnums=1)(
        params, graphdef, tokens
    )
    pipe = Pipeline(mesh_cfg.stage, micro, mesh_cfg.stage_repeats)
    graphdef, params = nnx.split(_tiny(pipe))
    mesh = make_mesh(mesh_cfg)
    with jax.set_mesh(mesh):
        step = jax.jit(jax.value_and_grad(_loss), static_argnums=1)
        tokens = jax.device_put(tokens, NamedSharding(mesh, P(("data", "fsdp"))))
        got, got_grads = step(params, graphdef, tokens)
        assert "collective-permute" in step.lower(params, graphdef, tokens).as_text("hlo")
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_loss_curves_equal_the_one_device_curve():
    """20 fp32 steps through the loop: GPipe on stage2 x data2 x tensor2 and stage4 x data2, the
    circular schedule on stage2 x repeats2 x data2 x tensor2, each within 1e-5 of 1 device."""
    single = _losses(train(_exp(), devices=jax.devices()[:1]).history)
    for over in [
        ("mesh.stage=2", "mesh.data=2", "mesh.tensor=2", "mesh.rules=tp"),
        ("mesh.stage=4", "mesh.data=2", "train.pipeline_microbatches=8"),
        ("mesh.stage=2", "mesh.stage_repeats=2", "mesh.data=2", "mesh.tensor=2",
         "mesh.rules=tp", "train.pipeline_microbatches=4"),
    ]:  # fmt: skip
        result = train(_exp(*over))
        mesh = jax.tree.leaves(result.state.params)[0].sharding.mesh
        assert dict(mesh.shape)["stage"] == int(over[0].split("=")[1])
        np.testing.assert_allclose(_losses(result.history), single, rtol=1e-5, err_msg=over)


class _StopAt(Callback):
    def __init__(self, n):
        self.n = n

    def on_log(self, step, split, scalars, state):
        if step == self.n:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_resume_from_stage4_onto_stage1_and_back(tmp_path):
    """A checkpoint written by an 8-device stage=4 run continues on 1 device (stage=1), whose
    checkpoint continues on stage=4 again: one curve, equal to the uninterrupted run's."""
    workdir = str(tmp_path / "w")
    common = ("checkpoint.every=7",)
    stage4 = (*common, "mesh.stage=4", "mesh.data=2")
    straight = _losses(train(_exp(), devices=jax.devices()[:1]).history)
    with pytest.raises(KeyboardInterrupt):
        train(_exp(*stage4), workdir=workdir, callbacks=[_StopAt(8)])
    with pytest.raises(KeyboardInterrupt):
        train(_exp(*common), workdir=workdir, devices=jax.devices()[:1], callbacks=[_StopAt(15)])
    final = train(_exp(*stage4), workdir=workdir)
    assert final.summary["resumed_from"] == 14
    with open(f"{workdir}/metrics.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    by_step = {r["step"]: r["loss"] for r in rows if r["split"] == "train"}
    np.testing.assert_allclose([by_step[s] for s in range(1, 21)], straight, rtol=1e-5)
    wqkv = final.state.params["blocks"]["attn"]["wqkv"]  # (L, ...): each device its stage's
    assert {s.data.shape[0] for s in wqkv.addressable_shards} == {wqkv.shape[0] // 4}


def test_report_shows_bubble_per_stage_memory_and_stage_traffic():
    from jaxnv.parallel.report import _size, format_report

    run = build(_exp("mesh.stage=4", "mesh.data=2", "train.pipeline_microbatches=8"),
                abstract=True)  # fmt: skip
    text = format_report(run)
    assert f"bubble (S-1)/(M*R+S-1) = {3 / 11:.1%}" in text
    assert "11 iterations" in text
    # the stacked blocks are split over the 4 stages: each device stores a quarter of them
    table = {path: spec for path, _, _, spec in run.plan.table}
    assert table["blocks/attn/wqkv"][0] == "stage" and table["embedding"][:1] != ("stage",)
    full = sum(int(np.prod(shape)) * 4 for path, _, shape, _ in run.plan.table
               if path.startswith("blocks/"))  # fmt: skip
    assert f"{_size(full / 4)}: its 1/4 of the blocks" in text, text
    # activation per device: 16 rows / data 2 = 8 rows x 16 tokens x 32 wide x 4 bytes
    act = 8 * 16 * 32 * 4
    assert stage_bytes(act, 4, 8)["forward"] == 11 * act / 8
    assert f"{11 * act / 8 / 2**20:.2f} MiB forward" in text
    assert bubble_fraction(4, 8, 2) == pytest.approx(3 / 19)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (("mesh.stage=3", "model.num_layers=4"), r"mesh.stage=3 does not divide the 8 devices"),
        (("mesh.stage=4", "model.num_layers=6"), r"mesh.stage=4 does not divide model.num_layers"),
        (("mesh.stage=2", "train.pipeline_microbatches=3"),
         r"pipeline_microbatches=3 does not divide train.batch_size=16"),
        (("mesh.stage=4", "mesh.stage_repeats=2", "model.num_layers=8",
          "train.pipeline_microbatches=2"), r"needs train.pipeline_microbatches >= mesh.stage=4"),
        (("mesh.stage_repeats=2",), r"stage_repeats=2 needs pipeline stages"),
        (("mesh.stage=0",), r"mesh.stage=0 must be an integer >= 1"),
    ],
)  # fmt: skip
def test_bad_pipeline_settings_are_one_line_errors(overrides, match):
    with pytest.raises(ValueError, match=match) as err:
        build(_exp(*overrides), abstract=True)
    assert "\n" not in str(err.value)


def test_direct_errors_are_one_line():
    with pytest.raises(ValueError, match="does not divide model.num_layers=6") as err:
        check_pipeline(6, 4, 0)
    assert "\n" not in str(err.value)
    mesh = make_mesh(MeshConfig(stage=2, data=4))
    graphdef, params = nnx.split(_tiny())
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="has no pipeline") as err:
        jax.eval_shape(_loss, params, graphdef, jnp.zeros((8, 16), jnp.int32))
    assert "\n" not in str(err.value)
    graphdef, params = nnx.split(_tiny(Pipeline(2, 3)))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="does not divide the batch of 8"):
        jax.eval_shape(_loss, params, graphdef, jnp.zeros((8, 16), jnp.int32))


def test_fit_pipelines_a_users_transformer_on_the_stage_axis():
    """`jaxnv.fit(model, ..., mesh={"stage": 2, ...})` attaches the pipeline itself: the loss
    curve equals the same model trained on one device."""
    from jaxnv import fit
    from jaxnv.core.losses import softmax_ce_loss

    tokens = np.random.default_rng(0).integers(0, 37, (64, 17)).astype(np.int32)
    data = {"x": tokens[:, :-1], "y": tokens[:, 1:]}

    def run(**kw):
        model = Transformer(37, num_layers=4, num_heads=2, embed_dim=16, max_seq_len=16,
                            rngs=nnx.Rngs(0))  # fmt: skip
        out = fit(model, softmax_ce_loss, data, steps=4, batch_size=8, log_every=1,
                  progress=False, tensorboard=False, mfu=False, **kw)  # fmt: skip
        return _losses(out.history)

    piped = run(mesh={"stage": 2, "data": 4})
    np.testing.assert_allclose(piped, run(devices=jax.devices()[:1]), rtol=1e-5)
