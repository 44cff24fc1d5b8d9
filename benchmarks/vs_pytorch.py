"""jaxnv's whole training loop against a PyTorch eager loop: tokens/s at 4 x 128 and 4 x 512.

Run:  jaxnv bench vs_pytorch [--sizes 4x128,4x512] [--repeats 3] [--steps 20] [--record]
      jaxnv bench vs_pytorch --profile --sizes 4x128    # where a step's time goes, both sides

jaxnv: `jaxnv.train` on the char_gpt experiment resized to LAYERSxWIDTH (64-wide heads, SiLU,
batch 16 x 128 characters, AdamW at a constant rate, no clipping), with everything the loop does:
the data pipeline, metrics every 10 steps, MFU; tokens/s is the median of its logged windows
after the first. Its jitted step alone on one resident batch is timed too ("bare step"), so the
loop's own host cost shows. PyTorch: the same model (benchmarks/transformer.py's, loaded with
jaxnv's initial weights, first loss checked to 1e-4 against the hand-written JAX model; jaxnv
also masks the 25 padded vocabulary logits, a negligible difference in work) in eager mode,
stepped in a paired process on one resident batch with `loss.item()` each step: the cheapest
loop PyTorch can have. "jaxnv loop, model.matmul=mkl" is the same loop with the projections
through Intel MKL's sgemm (where the mkl wheel and a C++ compiler are present; skipped
otherwise). Rounds are interleaved. With --profile, a per-op breakdown of one step
in both frameworks (jaxnv's `op_profile`, PyTorch's profiler), bucketed by what the op does, is
printed before the table.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import time

if "--profile" in sys.argv:  # XLA:CPU emits per-op events only with this, set before jax starts
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
    ).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from _common import interleave, parser, report, time_steps  # noqa: E402
from transformer import TorchWorker, parse_size, per_layer, plain_loss  # noqa: E402

from jaxnv import apply_overrides  # noqa: E402
from jaxnv.experiment import load_experiment  # noqa: E402
from jaxnv.train import build  # noqa: E402
from jaxnv.train.loop import _train  # noqa: E402
from jaxnv.train.profiling import op_profile  # noqa: E402


def make_run(layers, width, batch, seq, steps, log_every, extra=()):
    exp = load_experiment("char_gpt")
    exp.config = apply_overrides(
        exp.config,
        [
            f"model.num_layers={layers}",
            f"model.embed_dim={width}",
            f"model.num_heads={max(1, width // 64)}",
            f"train.batch_size={batch}",
            f"data.seq_len={seq}",
            f"train.steps={steps}",
            f"logging.log_every={log_every}",
            "optimizer.schedule=constant",
            "optimizer.warmup_steps=0",
            "optimizer.clip_norm=0",
            "optimizer.learning_rate=1e-3",
            "logging.progress=false",
            "logging.tensorboard=false",
            *extra,
        ],
    )
    exp.summarize = None
    run = build(exp, jax.devices()[:1], abstract=True)
    run.eval_data = None  # the loop's steps only: no evaluation at the end of each round
    return run


def bench_size(layers, width, batch, seq, steps, repeats, peak_n):
    log_every = max(1, steps // 4)
    run = make_run(layers, width, batch, seq, steps, log_every)
    state = run.init()
    host = run.batches[0]
    params = per_layer(jax.tree.map(np.asarray, state.params))
    worker = TorchWorker(params, host, run.cfg.model.activation, False, peak_n)
    # the hand-written JAX model on the same weights: jaxnv's own loss differs by masking the
    # vocabulary's padding (103 characters padded to 128), which PyTorch's model does not do
    first = float(jax.jit(plain_loss, static_argnums=2)(params, host, jax.nn.silu))
    if worker.first is not None and abs(worker.first - first) > 1e-4 * abs(first):
        raise AssertionError(f"PyTorch starts at loss {worker.first}, jaxnv at {first}")
    resident = jax.device_put(host, run.plan.batch)
    holder = {"state": state}

    def loop(
        run=run,
    ):  # seconds per step of the whole loop, from its logged windows after the first
        result = _train(run, None, [])
        rates = [h["steps_per_sec"] for h in result.history if h["split"] == "train"][1:]
        return 1.0 / statistics.median(rates)

    def bare():
        holder["state"], dt = time_steps(run.train_step.fn, holder["state"], resident, steps)
        return dt

    contenders = {"jaxnv loop": loop, "jaxnv bare step": bare}
    try:  # model.matmul=mkl: the projections through MKL's sgemm (jaxnv/models/mkl.py)
        mkl_run = make_run(layers, width, batch, seq, steps, log_every, ["model.matmul=mkl"])
        contenders["jaxnv loop, model.matmul=mkl"] = lambda: loop(mkl_run)
    except ValueError as e:
        print(f"model.matmul=mkl skipped: {e}", file=sys.stderr)
    if worker.first is not None:
        contenders["PyTorch eager"] = lambda: worker.run(steps)
    settle = {k: (lambda fn=fn: (time.sleep(0.3), fn())[1]) for k, fn in contenders.items()}
    times = interleave(settle, repeats)
    worker.close()
    return times, run, holder["state"], resident


# ------------------------------------------------------------------------------ per-op profile
JAX_BUCKETS = [  # (bucket, pattern on "op name  shape  JAX source"), first match wins
    ("optimizer update", r"cond/branch"),
    ("attention", r"BNTS|BSNH|BTNH|dot_product_attention"),
    ("embedding / loss", r"_take|scatter|log_softmax|logsumexp|integer_labels"),
    ("matmul (fused projections)", r"btd,|dkgh|dcf|btf,|nhd|btnh,|btcf"),
    ("weight layout copies", r"state\.params|wrapped_copy"),
    ("reductions (norms, softmax sums)", r"reduce_sum|reduce_max"),
    ("transposes", r"transpose|copy"),
]
TORCH_BUCKETS = [
    ("optimizer update", r"_foreach|adamw|lerp|addcdiv|zero_"),
    ("attention", r"scaled_dot_product|_flash|_efficient_attention|attention"),
    ("embedding / loss", r"embedding|index|nll_loss|log_softmax|cross_entropy"),
    ("matmul", r"aten::(mm|addmm|bmm|matmul|linear)\b"),
    ("reductions (norms, softmax sums)", r"mean|sum|rsqrt|pow|_softmax"),
    ("transposes", r"copy_|clone|contiguous|permute|transpose|cat|chunk"),
]


def bucket(text: str, buckets) -> str:
    for name, pattern in buckets:
        if re.search(pattern, text):
            return name
    return "elementwise (RoPE, SiLU gate, residuals, ...)"


def jax_profile(run, state, batch, top=12):
    """{bucket: ms per step} and the `top` matmul rows of jaxnv's step."""
    rows = op_profile(run.train_step.fn, state, batch, steps=3, top=10_000, carry=True)
    out, mats = {}, []
    for name, ms, what in rows:
        if name.startswith("[category]"):
            continue
        b = bucket(f"{name}  {what}", JAX_BUCKETS)
        out[b] = out.get(b, 0.0) + ms
        if b.startswith("matmul") or b == "attention":
            mats.append((ms, f"{name} {what[:90]}"))
    return out, sorted(mats, reverse=True)[:top]


def torch_profile(params, batch, act, steps=3, top=12):
    """The same, from PyTorch's profiler (self CPU time of each aten op, by input shapes)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformer import make_torch

    step, _ = make_torch(params, batch, act, False)
    step()  # warm up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    out, mats = {}, []
    for e in prof.key_averages(group_by_input_shape=True):
        ms = e.self_cpu_time_total / 1e3 / steps
        b = bucket(e.key, TORCH_BUCKETS)
        out[b] = out.get(b, 0.0) + ms
        if b in ("matmul", "attention") and ms > 0:
            mats.append((ms, f"{e.key} {str(e.input_shapes)[:90]}"))
    del torch
    return out, sorted(mats, reverse=True)[:top]


def print_profile(run, state, batch):
    """Both frameworks' step, op time by bucket, then their largest matmuls and attention ops."""
    host = {k: np.asarray(v) for k, v in batch.items()}
    params = per_layer(jax.tree.map(np.asarray, state.params))
    mine, my_mats = jax_profile(run, state, batch)
    try:
        theirs, their_mats = torch_profile(params, host, run.cfg.model.activation)
    except ImportError:
        theirs, their_mats = {}, []
    total_j, total_t = sum(mine.values()), sum(theirs.values()) or float("nan")
    print(f"\nper-op time of one step (ms; jaxnv {total_j:.1f}, PyTorch {total_t:.1f} in ops)")
    for b in sorted(set(mine) | set(theirs), key=lambda k: -mine.get(k, 0.0)):
        j, t = mine.get(b, 0.0), theirs.get(b, 0.0)
        print(f"  {b:44} jaxnv {j:8.2f} ({j / total_j:5.1%})   PyTorch {t:8.2f}")
    print("largest matmul / attention ops, jaxnv:")
    for ms, what in my_mats:
        print(f"  {ms:7.2f} ms  {what}")
    print("largest matmul / attention ops, PyTorch:")
    for ms, what in their_mats:
        print(f"  {ms:7.2f} ms  {what}")


def host_costs(run, steps):
    """The loop's own host work per step, measured alone: the data feed (gather and copy to the
    device) and the metrics fetch at a log step."""
    from jaxnv.parallel.mesh import put_batch

    start = time.perf_counter()
    for _ in run.batches.iterate(0, steps, put=lambda b: put_batch(b, run.plan.batch)):
        pass
    feed = (time.perf_counter() - start) / steps
    return {"data feed per step": feed}


def main():
    p = parser(__doc__, repeats=3)
    p.add_argument("--sizes", default="4x128,4x512", help="LAYERSxWIDTH, comma-separated")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="steps per timed round")
    p.add_argument("--profile", action="store_true", help="per-op breakdown, both frameworks")
    args = p.parse_args()
    sizes, batch, seq, steps, peak_n = args.sizes, args.batch, args.seq, args.steps, 2048
    if args.quick:
        sizes, batch, seq, steps, peak_n, args.repeats = "1x64", 2, 32, 4, 256, 1
    rows = []
    for size in sizes.split(","):
        layers, width = parse_size(size)
        times, run, state, resident = bench_size(
            layers, width, batch, seq, steps, args.repeats, peak_n
        )
        if args.profile and size == sizes.split(",")[0]:
            print_profile(run, state, resident)
            for k, v in host_costs(run, 4 * steps).items():
                print(f"host: {k} {v * 1e3:.2f} ms (step {times['jaxnv bare step'] * 1e3:.1f} ms)")
        tokens, ref = batch * seq, times.get("PyTorch eager")
        for name, dt in times.items():
            rows.append(
                (
                    size,
                    name,
                    f"{dt * 1e3:.1f} ms",
                    f"{tokens / dt:,.0f}",
                    f"{ref / dt:.2f}" if ref else "n/a",
                )
            )
    header = ("model", "contender", "per step", "tokens/s", "x PyTorch eager")
    report("vs_pytorch.py", header, rows, args, f"Batch {batch} x {seq}, fp32, AdamW.")


if __name__ == "__main__":
    main()
