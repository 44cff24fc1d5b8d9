"""The GPU benchmark: framework overhead, MFU of a ~1B transformer, and fp32 / bf16 / fp16 steps.

Run on a GPU machine with jaxnv installed (no network; parts 1-3 import only jaxnv's functional
core, part 4 its training loop):

    python benchmarks/gpu.py                 # ~1B params, seq 2048: needs one 80 GB GPU
    python benchmarks/gpu.py --size 12x1024  # smaller
    jaxnv bench gpu --quick                  # the CI smoke run, on whatever backend is there

Three parts, each printed as rows of one table:
1. overhead: jaxnv's train step / the hand-written JAX + optax step of benchmarks/transformer.py
   (4 x 512 GPT, fp32, batch 16 x 128), interleaved medians. Target <= 1.03.
2. MFU: model FLOPs per step (6N + 12LTD, cross-checked with XLA's cost analysis) over step time,
   over the peak of a large matmul in the same dtype measured in the same run (and over the
   card's nominal dense peak when known). Target >= 50 % in bf16.
3. precision: the same model's step in fp32, bf16 and fp16 (dynamic loss scaling); target
   bf16 <= 0.5 x fp32. fp32 matmuls use the backend's default precision (TF32 on NVIDIA
   tensor cores).
4. the loop with `train.steps_per_call` = 8 and 32 over 1 (benchmarks/overhead.py's 10-5-1 MLP).
A configuration that does not fit in memory is reported as "OOM" rather than stopping the run.
`--xla-overlap` sets the XLA GPU flags for overlapping collectives with compute (OVERLAP_FLAGS).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout

# The XLA GPU flags that MaxText's and Levanter's GPU recipes set so that collectives overlap
# with compute: the latency-hiding scheduler, pipelined (loop-carried) all-gather,
# reduce-scatter and all-reduce, double-buffered while loops (the scanned layers), large combine
# thresholds (fewer, bigger collectives), no combining by dimension, and cuBLAS rather than
# Triton GEMMs. They matter on many GPUs (fsdp, tp); on one they should change nothing, which
# `--xla-overlap` checks. All of them parse in jax 0.10.2 (checked on the CPU build).
OVERLAP_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
    "--xla_gpu_enable_all_gather_combine_by_dim=false",
    "--xla_gpu_enable_reduce_scatter_combine_by_dim=false",
    "--xla_gpu_enable_triton_gemm=false",
)
if "--xla-overlap" in sys.argv:  # XLA reads its flags once, when JAX starts
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *OVERLAP_FLAGS]).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _common import interleave, parser, report, time_steps  # noqa: E402

from jaxnv.core.losses import softmax_ce_loss  # noqa: E402
from jaxnv.core.optim import OptimizerConfig, make_optimizer  # noqa: E402
from jaxnv.core.precision import get_policy  # noqa: E402
from jaxnv.core.state import abstract_model, init_state, stacked_paths  # noqa: E402
from jaxnv.core.step import batch_spec_of, make_train_step  # noqa: E402
from jaxnv.models import Transformer  # noqa: E402
from jaxnv.models.transformer import flops_per_token, num_params  # noqa: E402
from jaxnv.train.profiling import measure_peak_flops, step_flops  # noqa: E402

# nominal dense peaks (FLOP/s) by device kind and dtype, for a second MFU column
NOMINAL = {
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "NVIDIA H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "NVIDIA A100-SXM4-80GB": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
}
VOCAB = 32000


def tokens_batch(batch, seq, vocab, seed=0):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, vocab, size=(batch, seq + 1))
    return {"x": jnp.asarray(t[:, :-1], jnp.int32), "y": jnp.asarray(t[:, 1:], jnp.int32)}


def build_step(layers, width, seq, batch, policy_name, remat="none", vocab=VOCAB):
    """jaxnv's compiled step, its initial state and a batch; (None, reason) if it does not fit."""
    policy = get_policy(policy_name)
    cfg = OptimizerConfig(name="adamw", learning_rate=3e-4, weight_decay=0.1, schedule="constant")
    heads = max(1, width // 128) if width >= 1024 else max(1, width // 64)
    model_fn = lambda r: Transformer(  # noqa: E731
        vocab, num_layers=layers, num_heads=heads, embed_dim=width, max_seq_len=seq,
        remat=remat, policy=policy, rngs=r,
    )  # fmt: skip
    tx = make_optimizer(cfg, 10_000, stacked=stacked_paths(abstract_model(model_fn)))
    try:
        graphdef, state = init_state(model_fn, tx, policy, jax.random.key(0))
        data = tokens_batch(batch, seq, vocab)
        step = make_train_step(
            graphdef, softmax_ce_loss, tx, policy, batch_spec=batch_spec_of(data)
        )
        compiled = step.fn.lower(state, data).compile()
        state, metrics = compiled(state, data)
        jax.block_until_ready(metrics)
    except Exception as err:  # noqa: BLE001 - an out-of-memory configuration is a result
        if "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower():
            return None, "OOM"
        raise
    return (step, compiled, state, data), ""


def overhead_rows(repeats, quick):
    """jaxnv vs hand-written JAX + optax, fp32, the transformer.py model."""
    from transformer import make_plain_step, per_layer

    layers, width, batch, seq, steps = (1, 64, 2, 32, 2) if quick else (4, 512, 16, 128, 10)
    built, _ = build_step(layers, width, seq, batch, "fp32", vocab=128)
    _, compiled, state, data = built
    tx = optax.adamw(3e-4, weight_decay=0.1, mask=lambda p: jax.tree.map(lambda a: a.ndim > 1, p))
    params = per_layer(jax.tree.map(jnp.copy, state.params))  # its own buffers (jaxnv's donates)
    plain = make_plain_step(tx, jax.nn.silu)
    holder = {"jaxnv": state, "plain": (params, tx.init(params))}

    def run(name, fn):
        def go():
            holder[name], dt = time_steps(fn, holder[name], data, steps)
            return dt

        return go

    times = interleave({"plain": run("plain", plain), "jaxnv": run("jaxnv", compiled)}, repeats)
    p, j = times["plain"] * 1e3, times["jaxnv"] * 1e3
    name = f"overhead {layers}x{width} fp32, batch {batch}x{seq}"
    return [(name, "plain JAX / jaxnv", f"{p:.2f} / {j:.2f} ms", f"{j / p:.3f}", "<= 1.03")]


def mfu_rows(layers, width, seq, batch, policies, repeats, quick, remat):
    kind = jax.devices()[0].device_kind
    rows, times = [], {}
    n = num_params(VOCAB, num_layers=layers, embed_dim=width)
    formula = flops_per_token(VOCAB, seq_len=seq, num_layers=layers, embed_dim=width)
    formula *= batch * seq
    for name in policies:
        built, why = build_step(layers, width, seq, batch, name, remat)
        label = f"{layers}x{width} ({n / 1e9:.2f}B params) {name}, batch {batch}x{seq}"
        if built is None:
            rows.append((label, "step", why, "", ""))
            continue
        step, compiled, state, data = built
        hlo = step_flops(step.fn, state, data)
        dtype = get_policy(name).compute_dtype
        peak = measure_peak_flops(dtype, n=256 if quick else 8192)
        steps = 2 if quick else 10
        holder = {"s": state}

        def go(compiled=compiled, holder=holder, data=data, steps=steps):
            holder["s"], dt = time_steps(compiled, holder["s"], data, steps)
            return dt

        dt = interleave({name: go}, repeats)[name]
        times[name] = dt
        peak = max(peak, measure_peak_flops(dtype, n=256 if quick else 8192))
        nominal = NOMINAL.get(kind, {}).get(jnp.dtype(dtype).name)
        vs_nominal = f", {formula / dt / nominal:.1%} of nominal" if nominal else ""
        rows.append(
            (
                label,
                "step, tokens/s",
                f"{dt * 1e3:.1f} ms, {batch * seq / dt:,.0f}",
                f"MFU {formula / dt / peak:.1%} of measured {peak / 1e12:.1f} TF/s{vs_nominal}",
                f"FLOPs: formula / XLA = {formula / hlo:.3f}" if hlo else "",
            )
        )
    if "fp32" in times:
        for name in ("bf16", "fp16"):
            if name in times:
                ratio = times[name] / times["fp32"]
                rows.append((f"{layers}x{width} {name} / fp32", "step time", "", f"{ratio:.3f}",
                             "<= 0.5"))  # fmt: skip
    return rows


def main():
    p = parser(__doc__, repeats=5)
    p.add_argument("--size", default="18x2048", help="LAYERSxWIDTH of the MFU model (~1B)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    p.add_argument("--policies", default="bf16,fp16,fp32")
    p.add_argument("--xla-overlap", action="store_true", help="set OVERLAP_FLAGS (see above)")
    args = p.parse_args()
    layers, width = (int(v) for v in args.size.lower().split("x"))
    seq, batch = args.seq, args.batch
    if args.quick:
        layers, width, seq, batch, args.repeats = 1, 128, 32, 2, 1
    print(f"devices: {jax.devices()}", flush=True)
    rows = overhead_rows(args.repeats, args.quick)
    policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    if jax.default_backend() == "cpu" and "fp16" in policies:
        print("fp16 skipped: XLA:CPU has no float16 dot_general", flush=True)
        policies.remove("fp16")
    rows += mfu_rows(layers, width, seq, batch, policies, args.repeats, args.quick, args.remat)
    rows += steps_per_call_rows(args.repeats, args.quick)
    notes = "XLA overlap flags on (gpu.py OVERLAP_FLAGS)." if args.xla_overlap else ""
    report("gpu.py", ("case", "measure", "time", "result", "target / check"), rows, args, notes)


def steps_per_call_rows(repeats, quick):
    """The whole loop on the dispatch-bound 10-5-1 MLP, `train.steps_per_call` 8 and 32 over 1:
    on a GPU every call also pays a kernel launch, so K steps a call should pay off more."""
    from overhead import CALLS_CASE, bench_calls

    calls = bench_calls(1 if quick else max(2, repeats // 2), 320 if quick else 4000)
    return [
        (
            f"loop {CALLS_CASE}",
            f"steps_per_call={k} / 1",
            f"{calls[k]:,.0f} steps/s",
            f"{calls[k] / calls[1]:.2f}x",
            ">= 3 at K=8",
        )
        for k in (8, 32)
    ]


if __name__ == "__main__":
    main()
