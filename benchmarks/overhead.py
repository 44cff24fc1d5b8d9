"""Framework overhead: a jaxnv train step against a hand-written plain JAX + optax step.

Run:  .venv/bin/python benchmarks/overhead.py [--repeats 7] [--steps 200]

Both steps train the same MLP with the same optimizer (adamw), fp32, same batch, both jitted with
the state donated. The contenders are timed interleaved in one process; each repeat times `steps`
back-to-back calls ending in one `block_until_ready`. Prints medians and the ratio jaxnv / plain.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnv.models import MLP
from jaxnv.optim import OptimizerConfig, make_optimizer
from jaxnv.precision import get_policy
from jaxnv.state import init_state
from jaxnv.step import batch_spec_of, make_train_step
from jaxnv.tasks import mse_loss

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


def time_calls(fn, state, batch, steps):
    start = time.perf_counter()
    for _ in range(steps):
        state, out = fn(state, batch)
    jax.block_until_ready((state, out))
    return state, (time.perf_counter() - start) / steps


def bench_case(name, spec, repeats, steps):
    d_in, hidden, d_out, bs = spec
    policy = get_policy("fp32")
    cfg = OptimizerConfig(name="adamw", learning_rate=1e-3, weight_decay=0.0)
    tx = make_optimizer(cfg, 10_000)
    rng = np.random.default_rng(0)
    batch = {
        "x": jnp.asarray(rng.normal(size=(bs, d_in)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(bs, d_out)), jnp.float32),
    }
    graphdef, state = init_state(
        lambda r: MLP(d_in, hidden, d_out, policy=policy, rngs=r), tx, policy, jax.random.key(0)
    )
    checked = make_train_step(graphdef, mse_loss, tx, policy, batch_spec=batch_spec_of(batch))
    dims = [d_in, *hidden, d_out]
    params = {}
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        params[f"w{i}"] = jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32)
        params[f"b{i}"] = jnp.zeros((b,), jnp.float32)
    plain_tx = optax.adamw(1e-3, weight_decay=0.0)
    plain = plain_step_fn(plain_tx)
    plain_state = (params, plain_tx.init(params))
    contenders = {"plain": [plain, plain_state], "jaxnv": [checked.fn, state]}
    contenders["jaxnv+check"] = [checked, None]
    times = {k: [] for k in contenders}
    for _ in range(2):  # warm up / compile
        for k, (fn, st) in contenders.items():
            if k == "jaxnv+check":
                st = contenders["jaxnv"][1]
            new, _ = time_calls(fn, st, batch, 3)
            contenders["jaxnv" if k == "jaxnv+check" else k][1] = new
    for _ in range(repeats):
        for k, (fn, _) in contenders.items():
            key = "jaxnv" if k == "jaxnv+check" else k
            contenders[key][1], dt = time_calls(fn, contenders[key][1], batch, steps)
            times[k].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    return name, med


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    rows = [bench_case(n, s, args.repeats, args.steps) for n, s in CASES.items()]
    print(f"machine: {platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}")
    print(f"{'case':36} {'plain us':>10} {'jaxnv us':>10} {'+check us':>10} {'ratio':>7}")
    for name, med in rows:
        p, j, c = med["plain"] * 1e6, med["jaxnv"] * 1e6, med["jaxnv+check"] * 1e6
        print(f"{name:36} {p:10.1f} {j:10.1f} {c:10.1f} {j / p:7.3f}")


if __name__ == "__main__":
    main()
