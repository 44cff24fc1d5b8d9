"""The GPU fast paths, tested on a CPU: the attention kernel (`model.attention=auto|xla|cudnn`,
chosen once and printed at start-up) and XLA's GPU flags for collective/compute overlap.

This machine has no GPU, so cuDNN's kernel itself never runs here: what is tested is the choice
(which platform, dtype and head dim take it), the errors, the start-up line, and which calls the
model routes to the chosen kernel (recorded by wrapping jax.nn.dot_product_attention, whose XLA
path still computes the values).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnv import apply_overrides
from jaxnv.experiment import load_experiment
from jaxnv.models import Transformer
from jaxnv.models import layers as layers_mod
from jaxnv.models.generate import generate
from jaxnv.models.layers import choose_attention
from jaxnv.parallel import xla_flags
from jaxnv.train import train

TINY = ["train.steps=2", "model.num_layers=1", "model.embed_dim=32", "model.num_heads=2",
        "data.seq_len=16", "train.batch_size=4", "train.eval_every=0", "logging.log_every=1",
        "logging.progress=false"]  # fmt: skip


@pytest.mark.parametrize(
    "on, dtype, head_dim, kernel",
    [
        ("cuda", jnp.bfloat16, 64, "cudnn"),
        ("cuda", jnp.float16, 128, "cudnn"),
        ("cuda", jnp.float32, 64, "xla"),  # cuDNN's flash kernel takes half precision only
        ("cuda", jnp.bfloat16, 256, "xla"),
        ("cuda", jnp.bfloat16, 12, "xla"),  # not a multiple of 8
        ("cpu", jnp.bfloat16, 64, "xla"),
        ("gpu", jnp.bfloat16, 64, "xla"),  # ROCm: no cuDNN
    ],
)
def test_auto_takes_cudnn_only_where_it_runs(on, dtype, head_dim, kernel):
    got, reason = choose_attention("auto", dtype, head_dim, on=on)
    assert got == kernel and reason
    assert choose_attention("xla", dtype, head_dim, on=on)[0] == "xla"


def test_cudnn_where_it_cannot_run_and_typos_are_one_line_errors():
    with pytest.raises(ValueError, match="model.attention=auto") as err:
        choose_attention("cudnn", jnp.float32, 64, on="cuda")
    assert "bfloat16 or float16" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="did you mean 'cudnn'"):
        choose_attention("cudnm", jnp.bfloat16, 64, on="cuda")


def _exp(*overrides):
    exp = load_experiment("char_gpt")
    exp.config = apply_overrides(exp.config, [*TINY, *overrides])
    exp.summarize = None
    return exp


def test_a_run_prints_its_kernel_at_start(capsys):
    train(_exp(), devices=jax.devices()[:1])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("attention:")]
    assert lines == [f"attention: xla (cuDNN's fused attention needs an NVIDIA GPU; this backend "
                     f"is {jax.default_backend()})"]  # fmt: skip


def test_cudnn_asked_on_this_machine_stops_before_training(tmp_path):
    with pytest.raises(ValueError, match="model.attention=cudnn cannot run here") as err:
        train(_exp("model.attention=cudnn"), workdir=str(tmp_path / "w"), devices=jax.devices()[:1])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").rglob("*.json"))


def test_cudnn_kernel_is_used_for_causal_training_and_xla_for_cached_decoding(monkeypatch):
    """On a CUDA platform in bf16 the model asks for cuDNN where there is no mask and no cache
    (training, scoring) and for XLA's kernel when decoding with a cache (its slots are masked)."""
    calls = []
    real = jax.nn.dot_product_attention

    def recorder(*args, implementation=None, **kwargs):
        calls.append(implementation)
        return real(*args, implementation="xla", **kwargs)  # the values, from XLA here

    monkeypatch.setattr(layers_mod, "platform", lambda: "cuda")
    monkeypatch.setattr(jax.nn, "dot_product_attention", recorder)
    model = Transformer(64, num_layers=2, num_heads=2, embed_dim=32, max_seq_len=16,
                        policy="bf16", rngs=nnx.Rngs(0))  # fmt: skip
    assert model.attention_kernel == "cudnn"
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)
    model(tokens)
    assert calls and set(calls) == {"cudnn"}

    calls.clear()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    out = generate(graphdef, params, np.asarray(tokens), 3, temperature=0.0, model_state=rest)
    assert out.shape == (2, 11) and calls and set(calls) == {"xla"}

    xla = Transformer(64, num_layers=2, num_heads=2, embed_dim=32, max_seq_len=16,
                      policy="bf16", attention="xla", rngs=nnx.Rngs(0))  # fmt: skip
    assert xla.attention_kernel == "xla"
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(xla(tokens)))


# ---- XLA's GPU flags for collective/compute overlap -------------------------------------------


def test_overlap_flags_parse_in_this_jaxlib_and_jaxnv_info_reports_the_kernel():
    """XLA aborts on a flag it does not know: the flags jaxnv adds on a GPU must all exist in the
    installed jaxlib (its CPU build parses the GPU flags too)."""
    import subprocess
    import sys

    env = {**os.environ, "JAXNV_XLA_OVERLAP": "1", "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "jaxnv.cli", "info"], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "attention (auto, head dim 64, float32): xla" in proc.stdout
    bad = {**env, "XLA_FLAGS": "--xla_gpu_no_such_flag=true"}  # the check above could fail
    assert subprocess.run([sys.executable, "-m", "jaxnv.cli", "info"], env=bad,
                          capture_output=True, timeout=120).returncode != 0  # fmt: skip


def test_overlap_flags_are_added_once_and_the_users_values_win(monkeypatch):
    env = {"JAXNV_XLA_OVERLAP": "1", "XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true"}
    assert xla_flags.prepare(env)
    flags = env["XLA_FLAGS"].split()
    assert (
        "--xla_gpu_enable_triton_gemm=true" in flags
        and "--xla_gpu_enable_triton_gemm=false" not in flags
    )
    assert len(flags) == len(xla_flags.GPU_OVERLAP_FLAGS)
    assert xla_flags.prepare(env) and env["XLA_FLAGS"].split() == flags  # idempotent

    off = {"JAXNV_XLA_OVERLAP": "0", "XLA_FLAGS": "--x=1"}
    assert not xla_flags.prepare(off) and off["XLA_FLAGS"] == "--x=1"
    monkeypatch.setattr(xla_flags, "has_nvidia_driver", lambda: False)
    assert not xla_flags.prepare({})  # unset: only where an NVIDIA driver is loaded
    monkeypatch.setattr(xla_flags, "has_nvidia_driver", lambda: True)
    auto = {}
    assert xla_flags.prepare(auto) and len(auto["XLA_FLAGS"].split()) == len(flags)
    with pytest.raises(ValueError, match="use 1"):
        xla_flags.prepare({"JAXNV_XLA_OVERLAP": "yes"})

    assert xla_flags.overlap_note("cpu", env["XLA_FLAGS"]) is None
    note = xla_flags.overlap_note("gpu", env["XLA_FLAGS"])
    n = len(xla_flags.GPU_OVERLAP_FLAGS)
    assert note.startswith(f"xla: {n - 1} of {n} ") and "--xla_gpu_enable_triton_gemm=true" in note
    assert "JAXNV_XLA_OVERLAP=1" in xla_flags.overlap_note("gpu", "")
