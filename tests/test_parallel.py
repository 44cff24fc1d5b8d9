"""Meshes, rule tables, and the invariant: the same loss curve on 1 device and on 8 under every
sharding preset; elastic resume from 8 devices (fsdp) onto 4 (dp)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxnv import apply_overrides
from jaxnv.core.optim import OptimizerConfig, make_optimizer
from jaxnv.core.precision import get_policy
from jaxnv.core.state import abstract_model, abstract_state
from jaxnv.experiment import load_experiment
from jaxnv.models import MLP, Transformer
from jaxnv.parallel import MeshConfig, get_rules, make_mesh, make_plan, mesh_shape
from jaxnv.train import Callback, build, train

QUIET = ["logging.progress=false", "logging.mfu=false"]
BASE = [
    *QUIET,
    "model.features=32,32",
    "train.steps=30",
    "train.eval_every=0",
    "logging.log_every=1",
    "optimizer.warmup_steps=5",
]


def _exp(*overrides):
    exp = load_experiment("binary_classification")
    exp.config = apply_overrides(exp.config, [*BASE, *overrides])
    return exp


def _losses(result):
    return np.array([r["loss"] for r in result.history if r["split"] == "train"])


@pytest.fixture(scope="module")
def one_device():
    return train(_exp(), devices=jax.devices()[:1])


def test_mesh_shapes_and_errors():
    assert mesh_shape(MeshConfig(), 8) == (8, 1, 1)
    assert mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="only one of"):
        mesh_shape(MeshConfig(data=-1, fsdp=-1), 8)
    with pytest.raises(ValueError, match=r"3\*1\*1 = 3 but 8 devices.*make the product 8"):
        mesh_shape(MeshConfig(data=3), 8)
    with pytest.raises(ValueError, match="does not divide 8 devices"):
        mesh_shape(MeshConfig(data=-1, fsdp=3), 8)
    with pytest.raises(ValueError, match="did you mean 'fsdp'"):
        get_rules("fsdb")
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def _mlp_plan(rules, mesh_cfg):
    policy = get_policy("fp32")
    tx = make_optimizer(OptimizerConfig(name="adamw"), 10)

    def model_fn(rngs):
        return MLP(16, (64, 64), 8, policy=policy, rngs=rngs)

    template = abstract_state(model_fn, tx, policy, jax.random.PRNGKey(0))
    return make_plan(abstract_model(model_fn), template, make_mesh(mesh_cfg), rules)


GOLDEN_MLP = {  # param path -> PartitionSpec, per preset (mesh 2 x 2 x 2)
    "dp": {"hidden/0/kernel": P(None, None), "hidden/1/kernel": P(None, None)},
    "fsdp": {
        "hidden/0/kernel": P("fsdp", None),
        "hidden/0/bias": P(None),
        "hidden/1/kernel": P(None, "fsdp"),
        "hidden/1/bias": P("fsdp"),
        "head/kernel": P("fsdp", None),
    },
    "tp": {
        "hidden/0/kernel": P(None, "tensor"),  # column-parallel
        "hidden/0/bias": P("tensor"),
        "hidden/1/kernel": P("tensor", None),  # row-parallel
        "hidden/1/bias": P(None),
        "head/kernel": P(None, None),
    },
    "fsdp+tp": {
        "hidden/0/kernel": P("fsdp", "tensor"),
        "hidden/1/kernel": P("tensor", "fsdp"),
        "head/kernel": P("fsdp", None),
    },
}


@pytest.mark.parametrize("rules", sorted(GOLDEN_MLP))
def test_golden_mlp_sharding_tables(rules):
    plan = _mlp_plan(rules, MeshConfig(data=2, fsdp=2, tensor=2))
    table = {path: spec for path, _, _, spec in plan.table}
    for path, spec in GOLDEN_MLP[rules].items():
        assert table[path] == spec, (path, table[path])
    # adam moments shaped like a param share its sharding; the step counter is replicated
    mu = plan.state.opt_state["optimizer"][0].mu
    assert mu["hidden"][0]["kernel"].spec == table["hidden/0/kernel"]
    assert plan.state.step.spec == P()


def test_golden_transformer_tp_table():
    policy = get_policy("fp32")
    tx = make_optimizer(OptimizerConfig(name="adamw"), 10)

    def model_fn(rngs):
        return Transformer(
            100, num_layers=1, num_heads=4, embed_dim=32, max_seq_len=16, policy=policy, rngs=rngs
        )

    template = abstract_state(model_fn, tx, policy, jax.random.PRNGKey(0))
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
    table = {p: s for p, _, _, s in make_plan(abstract_model(model_fn), template, mesh, "tp").table}
    wqkv = next(k for k in table if k.endswith("wqkv"))
    wo = next(k for k in table if k.endswith("wo"))
    gate_up = next(k for k in table if k.endswith("w_gate_up"))
    # the blocks' params are stacked: a leading layer axis, whole without a stage axis
    assert table[wqkv] == P(None, None, "tensor", None, None)  # kv groups split: column-parallel
    assert table[gate_up] == P(None, None, None, "tensor")  # mlp split: column-parallel
    assert table[wo] == P(None, "tensor", None, None)  # row-parallel back to embed
    emb = next(k for k in table if "embed" in k and table[k] != P(None))
    assert table[emb][0] == "tensor"  # vocabulary (padded to 128) split over tensor


@pytest.mark.parametrize(
    "mesh",
    [
        ("dp", 8, 1, 1),
        ("fsdp", 1, 8, 1),
        ("tp", 4, 1, 2),
        ("fsdp+tp", 2, 2, 2),
    ],
    ids=lambda m: m[0],
)
def test_same_loss_curve_on_8_devices_under_every_preset(one_device, mesh):
    rules, d, f, t = mesh
    result = train(
        _exp(f"mesh.rules={rules}", f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}")
    )
    np.testing.assert_allclose(_losses(result), _losses(one_device), rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(jax.device_get(result.state.params)),
        jax.tree.leaves(jax.device_get(one_device.state.params)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fsdp_state_is_really_sharded():
    run = build(_exp("mesh.rules=fsdp", "mesh.data=1", "mesh.fsdp=8"))
    kernel = run.state.params["hidden"][1]["kernel"]  # (32, 32), split on the embed dim
    assert kernel.sharding.spec == P(None, "fsdp")
    assert {s.data.shape for s in kernel.addressable_shards} == {(32, 4)}
    nu = run.state.opt_state["optimizer"][0].nu["hidden"][1]["kernel"]
    assert {s.data.shape for s in nu.addressable_shards} == {(32, 4)}


def test_batch_that_does_not_split_is_refused():
    with pytest.raises(ValueError, match="does not split over mesh data\\*fsdp=8"):
        build(_exp("train.batch_size=36"))


class Crash(Callback):
    def on_log(self, step, split, scalars, state):
        if step == 17:
            raise KeyboardInterrupt


def test_elastic_resume_from_8_fsdp_devices_onto_4_dp(one_device, tmp_path):
    workdir = str(tmp_path / "w")
    with pytest.raises(KeyboardInterrupt):
        train(
            _exp("mesh.rules=fsdp", "mesh.data=1", "mesh.fsdp=8", "checkpoint.every=15"),
            workdir=workdir,
            callbacks=[Crash()],
        )
    resumed = train(
        _exp("mesh.rules=dp", "mesh.data=4", "checkpoint.every=15"),
        workdir=workdir,
        devices=jax.devices()[:4],
    )
    assert resumed.summary["resumed_from"] == 15
    assert len(resumed.state.params["head"]["kernel"].sharding.device_set) == 4
    with open(f"{workdir}/metrics.jsonl", encoding="utf-8") as f:
        import json

        losses = [json.loads(line)["loss"] for line in f if '"train"' in line]
    np.testing.assert_allclose(losses, _losses(one_device), rtol=1e-5)


def test_max_device_batch_accumulates_to_the_same_global_batch(one_device):
    """Global batch 64 on 8 devices, at most 2 examples per device: 4 micro-batches."""
    from jaxnv.train import micro_batches_for

    assert micro_batches_for(64, 8, 1, 2) == 4
    result = train(_exp("train.batch_size=64", "train.max_device_batch=2", "mesh.data=8"))
    reference = train(_exp("train.batch_size=64"), devices=jax.devices()[:1])
    np.testing.assert_allclose(_losses(result), _losses(reference), rtol=1e-5)


def test_tensor_degree_that_does_not_divide_heads_is_refused():
    exp = load_experiment("char_gpt")
    exp.config = apply_overrides(
        exp.config, ["model.num_heads=2", "model.embed_dim=64", "mesh.rules=tp", "mesh.tensor=4"]
    )
    with pytest.raises(ValueError, match=r"heads=2\) does not split over mesh.tensor=4") as err:
        build(exp, abstract=True)
    assert "\n" not in str(err.value)


TINY_GPT = [
    *QUIET,
    "model.embed_dim=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "data.seq_len=32",
    "train.batch_size=16",
    "train.steps=20",
    "train.eval_every=0",
    "logging.log_every=1",
    "optimizer.warmup_steps=5",
    "train.eval_batch_size=512",
]


@pytest.mark.slow
def test_transformer_same_curve_under_every_preset():
    def gpt(*overrides, devices=None):
        exp = load_experiment("char_gpt")
        exp.config = apply_overrides(exp.config, [*TINY_GPT, *overrides])
        exp.summarize = None  # no sampling
        return train(exp, devices=devices)

    single = gpt(devices=jax.devices()[:1])
    for rules, d, f, t in [
        ("dp", 8, 1, 1),
        ("fsdp", 1, 8, 1),
        ("tp", 2, 1, 4),
        ("fsdp+tp", 2, 2, 2),
    ]:
        result = gpt(f"mesh.rules={rules}", f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}")
        np.testing.assert_allclose(_losses(result), _losses(single), rtol=1e-5, err_msg=rules)
        for a, b in zip(
            jax.tree.leaves(jax.device_get(result.state.params)),
            jax.tree.leaves(jax.device_get(single.state.params)),
            strict=True,
        ):
            # relative to the param's norm: single elements near 0 differ by ~1e-6 absolute
            assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), rules


def test_fsdp_compiled_memory_holds_one_eighth_of_the_state():
    """The compiled step's argument bytes per device under fsdp on 8 devices are within 10% of
    the replicated state divided by 8 (plus the batch and scalars)."""
    from jaxnv.parallel.report import compile_step, per_device_bytes

    over = ["model.features=256,256", "mesh.rules=fsdp", "mesh.data=1", "mesh.fsdp=8"]
    sharded = build(_exp(*over), abstract=True)
    replicated = build(_exp("model.features=256,256"), abstract=True)
    full = per_device_bytes((replicated.state.params, replicated.state.opt_state))
    mine = per_device_bytes((sharded.state.params, sharded.state.opt_state))
    assert abs(mine - full / 8) <= 0.1 * full / 8
    args = compile_step(sharded).memory_analysis().argument_size_in_bytes
    args_replicated = compile_step(replicated).memory_analysis().argument_size_in_bytes
    assert args < 0.2 * args_replicated  # the dry run's memory shrinks as the state part predicts
    assert abs(args - full / 8) <= 0.1 * full / 8 + 64 * 1024  # + batch, rng, step


def test_elastic_8_fsdp_then_4_dp_then_1(one_device, tmp_path):
    workdir = str(tmp_path / "e")
    common = ["checkpoint.every=10"]

    class At(Callback):
        def __init__(self, n):
            self.n = n

        def on_log(self, step, split, scalars, state):
            if step == self.n:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(
            _exp(*common, "mesh.rules=fsdp", "mesh.data=1", "mesh.fsdp=8"),
            workdir=workdir,
            callbacks=[At(12)],
        )
    with pytest.raises(KeyboardInterrupt):
        train(
            _exp(*common, "mesh.rules=dp", "mesh.data=4"),
            workdir=workdir,
            devices=jax.devices()[:4],
            callbacks=[At(22)],
        )
    final = train(_exp(*common, "mesh.data=1"), workdir=workdir, devices=jax.devices()[:1])
    assert final.summary["resumed_from"] == 20
    import json

    with open(f"{workdir}/metrics.jsonl", encoding="utf-8") as f:
        losses = [json.loads(line)["loss"] for line in f if '"train"' in line]
    np.testing.assert_allclose(losses, _losses(one_device), rtol=1e-5)
