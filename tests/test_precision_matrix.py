"""Every precision preset trains every model family, on 1 device and on 8 under fsdp and tp.

A combination fails if it raises, ends with non-finite params, or skips more steps than the
dynamic loss scale's warm-up: within these few steps the scale only comes down from 2**15 (it grows
after 2000 finite steps), so each skip is part of that warm-up, and a policy without loss scaling
skips none.
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
WARMUP = 3  # the most overflow skips allowed while the dynamic loss scale comes down
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
    state, finite, scales = run.state, [], []
    with jax.set_mesh(run.plan.mesh):
        for step in range(STEPS):
            state, metrics = run.train_step(state, put_batch(run.batches[step], run.plan.batch))
            finite.append(bool(metrics["grads_finite"]))
            scales.append(float(metrics["loss_scale"]))
    return jax.device_get(state), finite, scales


def _check(state, finite, scales):
    leaves = jax.tree.leaves(state.params)
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in leaves)
    skips = finite.count(False)
    if scales[0] == 1.0:  # no loss scaling: nothing may overflow
        assert skips == 0, f"steps skipped without loss scaling: {finite}"
    else:
        assert skips <= WARMUP, f"{skips} overflow skips: {finite}"
        # every skip halved the scale on the way down (the warm-up), and the last step updated
        assert scales[-1] == scales[0] / 2**skips and finite[-1], (finite, scales)


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


# The CI row of docs/precision.md's quality table: a small char_gpt, 150 steps from one seed.
# Short runs drift apart more than converged ones (bf16's rounding changes the trajectory), so
# this row's stated tolerance is 5 % relative eval loss; the full-length rows hold 2 %.
QUALITY = [
    "train.steps=150",
    "optimizer.warmup_steps=10",
    "model.num_layers=2",
    "model.embed_dim=64",
    "model.num_heads=4",
    "data.seq_len=64",
    "train.eval_every=0",
    "logging.progress=false",
    "logging.mfu=false",
]


@pytest.mark.slow
def test_bf16_and_fp16_reach_fp32_eval_loss_on_char_gpt():
    from jaxnv.train import train

    losses, skipped = {}, {}
    for preset in ("fp32", "bf16", "fp16"):
        exp = load_experiment("char_gpt")
        exp.config = apply_overrides(exp.config, [*QUALITY, f"precision.policy={preset}"])
        exp.summarize = None
        result = train(exp, devices=jax.devices()[:1])
        losses[preset] = result.eval_metrics["loss"]
        skipped[preset] = result.summary["nonfinite_skipped"]
    assert losses["fp32"] < 2.6  # it learned: a uniform guess over the characters is ~4.4
    for preset in ("bf16", "fp16"):
        assert losses[preset] == pytest.approx(losses["fp32"], rel=0.05), losses
    assert skipped["fp32"] == skipped["bf16"] == 0 and skipped["fp16"] <= WARMUP
