"""Remat through the real train step: `model.remat` reaches the blocks, changes what the backward
pass keeps, and changes nothing in the numbers (tests/test_transformer.py checks the bare model).
"""

import contextlib
import io
import math
import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from jaxnv import apply_overrides
from jaxnv.experiment import load_experiment
from jaxnv.parallel import put_batch
from jaxnv.train import build

SETTINGS = ("none", "full", "dots")
SEQ, BATCH = 64, 4  # SEQ != embed_dim (32), so (SEQ, SEQ) picks out attention tensors
RESIDUAL = re.compile(r"^(f32|bf16|f16|i32|u32|bool)\[([\d,]*)\]")
BYTES = {"f32": 4, "i32": 4, "u32": 4, "bf16": 2, "f16": 2, "bool": 1}


def _run(remat):
    exp = load_experiment("char_gpt")
    exp.config = apply_overrides(
        exp.config,
        [
            f"model.remat={remat}",
            "model.num_layers=2",
            "model.embed_dim=32",
            "model.num_heads=2",
            "model.dropout=0.1",  # the recomputed forward must draw the same dropout masks
            f"data.seq_len={SEQ}",
            f"train.batch_size={BATCH}",
            "logging.progress=false",
            "logging.mfu=false",
        ],
    )
    return build(exp, jax.devices()[:1])


@pytest.fixture(scope="module")
def runs():
    return {remat: _run(remat) for remat in SETTINGS}


def _params_of(jaxpr, names):
    """(primitive name, params) of every equation named in `names`, nested ones included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            yield eqn.primitive.name, eqn.params
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _params_of(sub.jaxpr, names)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _params_of(sub, names)


def _remat_policies(jaxpr):
    """The `policy` of every remat equation in a jaxpr, nested ones included."""
    return [params["policy"] for _, params in _params_of(jaxpr, ("remat2", "checkpoint"))]


def test_the_config_key_reaches_every_block(runs):
    expected = {
        "none": None,
        "full": None,
        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }
    for remat, run in runs.items():
        batch = put_batch(run.batches[0], run.plan.batch)
        jaxpr = jax.make_jaxpr(run.train_step.fn)(run.state, batch)
        policies = list(_remat_policies(jaxpr.jaxpr))
        if remat == "none":
            assert policies == []
        else:
            # the blocks run as one scan of 2 (layers) over a remat with the setting's policy
            assert policies and all(p is expected[remat] for p in policies)
            lengths = [params["length"] for _, params in _params_of(jaxpr.jaxpr, ("scan",))]
            assert 2 in lengths, lengths


def test_remat_keeps_fewer_residuals(runs):
    """What the backward pass keeps, by jax's own account: full < dots < none, and with full
    no (B, N, T, T) attention tensor is kept."""
    kept, attention = {}, {}
    for remat, run in runs.items():
        model = nnx.merge(run.graphdef, run.state.params, run.state.model_state)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tokens = np.asarray(run.batches[0]["x"])
        rng = jax.random.key(0)

        def loss(params, graphdef=graphdef, rest=rest, tokens=tokens, rng=rng):
            return nnx.merge(graphdef, params, rest)(tokens, rng).sum()

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(loss, params)
        shapes = [
            (m.group(1), tuple(int(d) for d in m.group(2).split(",") if d))
            for m in map(RESIDUAL.match, out.getvalue().splitlines())
            if m
        ]
        assert shapes, out.getvalue()[:500]
        kept[remat] = sum(BYTES[dtype] * math.prod(shape) for dtype, shape in shapes)
        attention[remat] = sum(1 for _, shape in shapes if shape[-2:] == (SEQ, SEQ))
    # dots keeps about half of none: the projections' and attention's own backward passes
    # (models/layers.py) already keep less without remat (q/k/v, gate/up and probabilities once)
    assert kept["full"] < kept["dots"] < 0.6 * kept["none"], kept
    assert attention["none"] > 0 and attention["full"] == 0, attention


def test_same_loss_grads_and_params_after_two_steps(runs):
    results = {}
    for remat, run in runs.items():
        state, rows = run.state, []
        for i in range(2):
            batch = put_batch(run.batches[i], run.plan.batch)
            state, metrics = run.train_step(state, batch)
            rows.append({k: float(metrics[k]) for k in ("loss", "grad_norm")})
        results[remat] = (rows, jax.device_get(state.params))
    ref_rows, ref_params = results["none"]
    assert ref_rows[0]["loss"] != ref_rows[1]["loss"]  # the second step saw new params
    for remat in ("full", "dots"):
        rows, params = results[remat]
        for row, ref in zip(rows, ref_rows, strict=True):
            np.testing.assert_allclose(row["loss"], ref["loss"], rtol=1e-5)
            np.testing.assert_allclose(row["grad_norm"], ref["grad_norm"], rtol=1e-5)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, ref_params
        )


def test_mfu_counts_model_flops_whatever_the_remat(runs):
    """Under remat the blocks run in a scan, whose body XLA's cost analysis counts once: the MFU
    uses the model's 6N + attention formula instead, which matches the unrolled step's count."""
    from jaxnv.config import LoggingConfig
    from jaxnv.train.profiling import flops_and_peak, step_flops

    log = LoggingConfig(mfu=True, peak_flops=1.0)
    flops = {r: flops_and_peak(log, run, run.state, run.batches[0])[0] for r, run in runs.items()}
    assert flops["none"] == flops["full"] == flops["dots"] > 0
    none = runs["none"]
    hlo = step_flops(none.train_step.fn, none.state, none.batches[0])
    # XLA also counts elementwise work (norms, softmax, AdamW): 7 % at this tiny width, 0.6 % at
    # 4 x 256 (benchmarks/transformer.py)
    assert 0.9 < flops["none"] / hlo <= 1.0, (flops["none"], hlo)
    full = runs["full"]
    assert step_flops(full.train_step.fn, full.state, full.batches[0]) < 0.8 * hlo  # the scan
