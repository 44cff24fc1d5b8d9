"""Every precision preset trains every model family, on 1 device and on 8 under fsdp and tp.

A combination fails if it raises, ends with non-finite params, or skips steps other than the
dynamic loss scale's warm-up (overflowing steps at the very start, while the scale comes down).
"""

import jax
import numpy as np
import pytest

from jaxnv import apply_overrides
from jaxnv.core.precision import accumulating_dtype, backend_notes, get_policy
from jaxnv.experiment import load_experiment
from jaxnv.parallel import put_batch
from jaxnv.train import build

STEPS = 6
WARMUP = 3  # the most overflow skips allowed, all before the first update
PRESETS = ["fp32", "bf16", "fp16", "auto", "params=float32,compute=bfloat16,output=bfloat16"]
QUIET = ["logging.progress=false", "logging.mfu=false", "optimizer.warmup_steps=1"]
MODELS = {
    "linear": ("house_prices", ["train.batch_size=16"]),
    "mlp": ("mlp_regression", ["train.batch_size=16", "model.features=16,16"]),
    "cnn": ("digits_cnn", ["train.batch_size=16", "model.features=8,16"]),
    "lstm": ("sequence_lstm", ["train.batch_size=16", "data.seq_len=8", "data.num_train=64"]),
    "transformer": (
        "char_gpt",
        [
            "train.batch_size=16",
            "data.seq_len=16",
            "model.num_layers=2",
            "model.embed_dim=32",
            "model.num_heads=2",
        ],
    ),
}
# the transformer's other variants: MLP activations, remat, untied embeddings
VARIANTS = {
    "gelu": ["model.activation=gelu"],
    "relu2-remat": ["model.activation=relu2", "model.remat=full"],
    "untied": ["model.tie_embeddings=false", "model.remat=dots"],
}


def _train_steps(model, preset, extra=(), devices=1):
    experiment, overrides = MODELS[model]
    exp = load_experiment(experiment)
    exp.config = apply_overrides(
        exp.config, [*overrides, *QUIET, f"precision.policy={preset}", *extra]
    )
    run = build(exp, jax.devices()[:devices])
    state, finite = run.state, []
    with jax.set_mesh(run.plan.mesh):
        for step in range(STEPS):
            state, metrics = run.train_step(state, put_batch(run.batches[step], run.plan.batch))
            finite.append(bool(metrics["grads_finite"]))
    return jax.device_get(state), finite


def _check(state, finite):
    leaves = jax.tree.leaves(state.params)
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in leaves)
    skipped = finite.index(True) if True in finite else len(finite)
    assert skipped <= WARMUP, f"{skipped} overflow skips"
    assert all(finite[skipped:]), f"a step after the warm-up was skipped: {finite}"


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_preset_trains_model_on_one_device(model, preset):
    _check(*_train_steps(model, preset))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["bf16", "fp16"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_preset_trains_every_transformer_variant(variant, preset):
    _check(*_train_steps("transformer", preset, VARIANTS[variant]))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["bf16", "fp16"])
@pytest.mark.parametrize(
    "mesh",
    [
        ("fsdp", ["mesh.rules=fsdp", "mesh.data=2", "mesh.fsdp=4"]),
        ("tp", ["mesh.rules=tp", "mesh.data=4", "mesh.tensor=2"]),
    ],
    ids=lambda m: m[0],
)
@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_preset_trains_on_eight_devices(model, mesh, preset):
    _check(*_train_steps(model, preset, mesh[1], devices=8))


def test_cpu_upcasts_only_float16_accumulation():
    f16, bf16, f32 = (np.dtype(d) for d in ("float16", "bfloat16", "float32"))
    assert accumulating_dtype(f16, "cpu") == f32
    assert accumulating_dtype(f16, "gpu") == f16  # GPUs keep the fast path
    assert accumulating_dtype(bf16, "cpu") == bf16
    assert backend_notes(get_policy("fp16"), "cpu") and not backend_notes(get_policy("bf16"), "cpu")
    assert not backend_notes(get_policy("fp16"), "gpu")
