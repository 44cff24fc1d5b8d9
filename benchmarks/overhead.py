"""Framework overhead: a jaxnv train step against a hand-written plain JAX + optax step.

Run:  jaxnv bench overhead [--repeats 7] [--steps 200] [--quick] [--record]

Step level: both steps train the same MLP with adamw, fp32, the same device-resident batch, both
jitted with the state donated. jaxnv's contender is what its loop calls: the jitted step behind
the per-call batch check. Loop level: `jaxnv.train` (batches gathered and copied to the device by
grain threads, metrics fetched every `log_every` steps) against the same jitted step called in a
bare Python loop on one resident batch; and the whole loop on the dispatch-bound 10-5-1 MLP with
`train.steps_per_call` = 1, 8 and 32 (K steps a compiled call). Contenders run interleaved in
one process; medians of `repeats`; ratios last. Appends a row per case to benchmarks/RESULTS.md
with --record. The transformer case of the same comparison is in benchmarks/transformer.py
(column "/ plain JAX").
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import parser, report, time_steps

from jaxnv import apply_overrides
from jaxnv.core.losses import mse_loss
from jaxnv.core.optim import OptimizerConfig, make_optimizer
from jaxnv.core.precision import get_policy
from jaxnv.core.state import init_state
from jaxnv.core.step import batch_spec_of, make_train_step
from jaxnv.experiment import load_experiment
from jaxnv.models import MLP
from jaxnv.train import build, train

CASES = {  # name: (in, hidden widths, out, batch)
    "mlp 10-5-1, batch 16": (10, (5,), 1, 16),
    "mlp 256-1024-1024-10, batch 256": (256, (1024, 1024), 10, 256),
}


def plain_step_fn(tx):
    """The same MLP and loss written by hand over a dict of arrays."""

    def loss(params, batch):
        h = batch["x"]
        n = len([k for k in params if k.startswith("w")])
        for i in range(n):
            h = h @ params[f"w{i}"] + params[f"b{i}"][None, :]
            if i < n - 1:
                h = jax.nn.relu(h)
        return jnp.mean((h - batch["y"]) ** 2)

    def step(state, batch):
        params, opt_state = state
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    return jax.jit(step, donate_argnums=0)


def bench_step(spec, repeats, steps):
    """Median seconds per step: plain JAX + optax vs jaxnv's checked, AOT-compiled step."""
    d_in, hidden, d_out, bs = spec
    policy = get_policy("fp32")
    tx = make_optimizer(OptimizerConfig(name="adamw", learning_rate=1e-3), 10_000)
    rng = np.random.default_rng(0)
    batch = {
        "x": jnp.asarray(rng.normal(size=(bs, d_in)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(bs, d_out)), jnp.float32),
    }
    graphdef, state = init_state(
        lambda r: MLP(d_in, hidden, d_out, policy=policy, rngs=r), tx, policy, jax.random.key(0)
    )
    step = make_train_step(graphdef, mse_loss, tx, policy, batch_spec=batch_spec_of(batch))
    params = {}
    dims = [d_in, *hidden, d_out]
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        params[f"w{i}"] = jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32)
        params[f"b{i}"] = jnp.zeros((b,), jnp.float32)
    plain_tx = optax.adamw(1e-3)
    contenders = {
        "plain": [plain_step_fn(plain_tx), (params, plain_tx.init(params))],
        "jaxnv": [step, state],
    }
    times = {k: [] for k in contenders}
    for r in range(repeats + 1):
        for k, (fn, st) in contenders.items():
            contenders[k][1], dt = time_steps(fn, st, batch, steps if r else 3)
            if r:  # the first round compiles and warms up
                times[k].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


LOOP_CASES = {"mlp 2-256-256-1, batch 256": "256,256", "mlp 2-1024-1024-1, batch 256": "1024,1024"}


def bench_loop(repeats, steps, features):
    """Median steps/s: the jaxnv loop vs its own jitted step in a bare Python loop."""
    overrides = [
        "logging.progress=false",
        "logging.mfu=false",
        "logging.tensorboard=false",
        f"train.steps={steps}",
        "train.eval_every=0",
        "logging.log_every=50",
        "optimizer.warmup_steps=5",
        f"model.features={features}",
        "train.batch_size=256",
    ]
    exp = load_experiment("binary_classification")
    exp.config = apply_overrides(exp.config, overrides)
    run = build(exp, jax.devices()[:1])
    batch = jax.device_put(run.batches[0], run.plan.batch)
    bare_step = run.train_step.fn
    state = run.state
    loop, bare = [], []
    for r in range(repeats + 1):
        result = train(exp, devices=jax.devices()[:1])
        rows = [h["steps_per_sec"] for h in result.history if h["split"] == "train"][1:]
        state, dt = time_steps(bare_step, state, batch, steps)
        if r:
            loop.append(statistics.median(rows))
            bare.append(1.0 / dt)
    return statistics.median(loop), statistics.median(bare)


CALLS_CASE = "mlp 10-5-1, batch 16"  # the mlp_regression experiment: dispatch-bound


def bench_calls(repeats, steps, ks=(1, 8, 32)):
    """Median steps/s of the whole loop with `train.steps_per_call` = each of `ks`, and of the
    jitted single step in a bare Python loop on one resident batch; rounds interleaved."""
    overrides = [
        "logging.progress=false",
        "logging.mfu=false",
        "logging.tensorboard=false",
        f"train.steps={steps}",
        "train.eval_every=0",
        "logging.log_every=160",  # a multiple of every K: full-length calls only
    ]
    exps = {}
    for k in ks:
        exps[k] = load_experiment("mlp_regression")
        exps[k].config = apply_overrides(exps[k].config, [*overrides, f"train.steps_per_call={k}"])
    run = build(exps[ks[0]], jax.devices()[:1])
    batch = jax.device_put(run.batches[0], run.plan.batch)
    state, samples = run.state, {k: [] for k in (*ks, "bare")}
    for r in range(repeats + 1):
        for k, exp in exps.items():
            result = train(exp, devices=jax.devices()[:1])
            rows = [h["steps_per_sec"] for h in result.history if h["split"] == "train"][1:]
            if r:  # the first round compiles
                samples[k].append(statistics.median(rows))
        state, dt = time_steps(run.train_step.fn, state, batch, steps)
        if r:
            samples["bare"].append(1.0 / dt)
    return {k: statistics.median(v) for k, v in samples.items()}


def main():
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=200, help="steps per timed round")
    args = p.parse_args()
    cases, loop_cases, steps = CASES, LOOP_CASES, args.steps
    if args.quick:
        cases = {k: v for k, v in CASES.items() if "10-5-1" in k}
        loop_cases = dict(list(LOOP_CASES.items())[:1])
        steps, args.repeats = 60, 2
    rows = []
    for name, spec in cases.items():
        med = bench_step(spec, args.repeats, steps)
        p_us, j_us = med["plain"] * 1e6, med["jaxnv"] * 1e6
        rows.append((f"step: {name}", f"{p_us:.1f} us", f"{j_us:.1f} us", f"{j_us / p_us:.3f}"))
    for name, features in loop_cases.items():
        loop, bare = bench_loop(max(2, args.repeats // 2), 2 * steps, features)
        rows.append(
            (
                f"loop: {name}",
                f"{bare:.0f} steps/s (bare)",
                f"{loop:.0f} steps/s (loop)",
                f"{loop / bare:.3f} (loop/bare)",
            )
        )
    calls = bench_calls(max(2, args.repeats // 2), 4 * steps if not args.quick else 320)
    for k in (8, 32):
        rows.append(
            (
                f"loop: {CALLS_CASE}, train.steps_per_call={k} vs 1",
                f"{calls[1]:.0f} steps/s (K=1)",
                f"{calls[k]:.0f} steps/s (K={k})",
                f"{calls[k] / calls[1]:.2f} (target >= 3 at K=8)",
            )
        )
    rows.append(
        (
            f"loop: {CALLS_CASE}, train.steps_per_call=8 vs bare step",
            f"{calls['bare']:.0f} steps/s (bare)",
            f"{calls[8]:.0f} steps/s (K=8)",
            f"{calls[8] / calls['bare']:.2f} (loop/bare)",
        )
    )
    report("overhead.py", ("case", "reference", "jaxnv", "ratio"), rows, args)


if __name__ == "__main__":
    main()
