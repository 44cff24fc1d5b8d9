"""The GPU benchmark: framework overhead, MFU of a ~1B transformer, fp32 / bf16 / fp16 steps, the
loop's steps per call, the serving engine and the input pipeline.

Run on a GPU machine with jaxnv installed (no network; parts 1-3 import only jaxnv's functional
core, parts 4-6 its training loop, serving engine and data pipeline):

    python benchmarks/gpu.py                 # ~1B params, seq 2048: needs one 80 GB GPU
    python benchmarks/gpu.py --size 12x1024  # smaller
    python benchmarks/gpu.py --parts mfu,serve  # a subset, for a session short on time
    jaxnv bench gpu --quick                  # the CI smoke run, on whatever backend is there

Seven parts (`--parts overhead,mfu,precision,attention,spc,serve,data`, default all), each
printed as rows of one table:
1. overhead: jaxnv's train step / the hand-written JAX + optax step of benchmarks/transformer.py
   (4 x 512 GPT, fp32, batch 16 x 128), interleaved medians. Target <= 1.03.
2. mfu: model FLOPs per step (6N + 12LTD, cross-checked with XLA's cost analysis) over step time,
   over the peak of a large matmul in the same dtype measured in the same run (and over the
   card's nominal dense peak when known). Target >= 50 % in bf16. Alone it runs bf16 only.
3. precision: the same model's step in fp32, bf16 and fp16 (dynamic loss scaling); target
   bf16 <= 0.5 x fp32. fp32 matmuls use the backend's default precision (TF32 on NVIDIA
   tensor cores).
3b. attention: the MFU model's bf16 step with `model.attention=xla` and `=cudnn` (cuDNN's
   fused flash kernel), interleaved, and their losses after one step (agree to 2 %); target
   cudnn < xla. Off an NVIDIA GPU the row gives the reason cuDNN's cannot run.
4. spc: the loop with `train.steps_per_call` = 8 and 32 over 1 (benchmarks/overhead.py's 10-5-1
   MLP). Target >= 3x at K=8.
5. serve: jaxnv.serve.engine.Engine on the MFU-sized model (`--size`) in bf16 (params and KV
   cache), 16 slots, 64 greedy requests (prompts 65-128 tokens, 32-128 new), driven as 16
   clients that each send the next request when the last one ends: generated tokens/s, time to
   first token and inter-token latency p50 / p99 (benchmarks/serve.py's `_stats`), the idle
   TTFT of one 128-token prompt, and the engine's tokens/s over offline `generate` of 16 x
   (128 + 128) in one jitted loop (its ceiling; serve.py has no hand-written reference).
   No target; bounded: a round takes no new request once its share of `--serve-deadline` s
   (the whole part's, default 180) has passed.
6. data: a 4 x 512 GPT's bf16 step at 16 x 512 (fast, so that input could be what it waits for)
   fed by jaxnv's pipelines (benchmarks/data_pipeline.py's data: stdlib .py text, bytes
   tokenizer; `PackedBatches` with its prefetch threads, and the streamed packed Parquet
   dataset), as the loop feeds it, over the same step on one device-resident batch: target
   <= 1.05. And each pipeline's tokens/s alone over the step's: target >= 20x.
In --quick every model is tiny. A configuration that does not fit in memory is reported as "OOM",
and a part that fails (an unsupported kernel, say) as a row naming the error, rather than
stopping the run. `--xla-overlap` adds XLA's GPU flags for overlapping collectives with compute
(jaxnv/parallel/xla_flags.py). The `jaxnv` command adds them itself on an NVIDIA machine, so
`jaxnv bench gpu` runs with them and `JAXNV_XLA_OVERLAP=0 jaxnv bench gpu` without; the table's
note records the XLA_FLAGS of the run.
"""

from __future__ import annotations

import gc
import itertools
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout

# XLA's GPU flags for collective/compute overlap (the anchors' recipes: parallel/xla_flags.py).
# The `jaxnv` command adds them where an NVIDIA driver is loaded unless JAXNV_XLA_OVERLAP=0;
# `--xla-overlap` adds them to a plain `python benchmarks/gpu.py` run.
from jaxnv.parallel.xla_flags import with_overlap_flags  # noqa: E402

if "--xla-overlap" in sys.argv:  # XLA reads its flags once, when JAX starts its backend
    os.environ["XLA_FLAGS"] = with_overlap_flags(os.environ.get("XLA_FLAGS", ""))

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


def heads_of(width):
    """Heads of 128 from width 1024 up, else of 64."""
    return max(1, width // 128) if width >= 1024 else max(1, width // 64)


def is_oom(err):
    return "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower()


def build_step(layers, width, seq, batch, policy_name, remat="none", vocab=VOCAB, data=None,
               loss_fn=softmax_ce_loss, attention="auto"):  # fmt: skip
    """jaxnv's compiled step, its initial state and a batch (`data`, default random tokens);
    (None, reason) if it does not fit."""
    policy = get_policy(policy_name)
    cfg = OptimizerConfig(name="adamw", learning_rate=3e-4, weight_decay=0.1, schedule="constant")
    model_fn = lambda r: Transformer(  # noqa: E731
        vocab, num_layers=layers, num_heads=heads_of(width), embed_dim=width, max_seq_len=seq,
        remat=remat, attention=attention, policy=policy, rngs=r,
    )  # fmt: skip
    tx = make_optimizer(cfg, 10_000, stacked=stacked_paths(abstract_model(model_fn)))
    try:
        graphdef, state = init_state(model_fn, tx, policy, jax.random.key(0))
        data = tokens_batch(batch, seq, vocab) if data is None else data
        step = make_train_step(graphdef, loss_fn, tx, policy, batch_spec=batch_spec_of(data))
        compiled = step.fn.lower(state, data).compile()
        state, metrics = compiled(state, data)
        jax.block_until_ready(metrics)
    except Exception as err:  # noqa: BLE001 - an out-of-memory configuration is a result
        if is_oom(err):
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


def attention_rows(layers, width, seq, batch, repeats, quick):
    """The MFU model's bf16 step with XLA's attention and with cuDNN's fused kernel, interleaved;
    the loss of the step after the first agrees to bf16 precision."""
    label = f"attention {layers}x{width} bf16, batch {batch}x{seq}"
    built = {}
    for kernel in ("xla", "cudnn"):
        try:
            built[kernel], why = build_step(layers, width, seq, batch, "bf16", attention=kernel)
        except ValueError as err:  # cudnn where it cannot run: the one-line reason
            built[kernel], why = None, str(err).split(": ", 1)[-1].split("; use ")[0]
        if built[kernel] is None:
            return [(label, f"{kernel} kernel", why, "", "")]
    holder, losses = {}, {}
    for kernel, (_, compiled, state, data) in built.items():
        holder[kernel], metrics = compiled(state, data)
        losses[kernel] = float(metrics["loss"])
    steps = 2 if quick else 10

    def runner(kernel):
        def go():
            holder[kernel], dt = time_steps(
                built[kernel][1], holder[kernel], built[kernel][3], steps
            )
            return dt

        return go

    t = interleave({k: runner(k) for k in built}, repeats)
    close = abs(losses["cudnn"] - losses["xla"]) <= 2e-2 * abs(losses["xla"])
    return [
        (label, "xla step", f"{t['xla'] * 1e3:.1f} ms", f"loss {losses['xla']:.4f}", ""),
        (label, "cudnn step", f"{t['cudnn'] * 1e3:.1f} ms", f"loss {losses['cudnn']:.4f}",
         f"losses agree: {'yes' if close else 'NO'}"),
        (label, "cudnn / xla", "", f"{t['cudnn'] / t['xla']:.3f}", "< 1"),
    ]  # fmt: skip


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


def drive_engine(engine, requests, tag, deadline_s):
    """Serve `requests` [(prompt ids, new tokens)] as `engine.slots` clients that each send the
    next request when their last one ends; (seconds, [(start, token arrival times)]) for
    serve.py's `_stats`. No request is inserted after `deadline_s`."""
    from jaxnv.serve.engine import SamplingParams

    todo, results, index = list(enumerate(requests)), {}, {}
    start = sent = time.perf_counter()  # sent: when the waiting clients sent their requests
    while todo or engine.active:
        if time.perf_counter() - start > deadline_s:
            todo.clear()
        while todo and engine.free_slots:
            i, (ids, n) = todo.pop(0)
            index[f"{tag}-{i}"] = i
            results[i] = (sent, [])
            engine.insert(f"{tag}-{i}", ids, SamplingParams(max_tokens=n))  # syncs on its token
            results[i][1].append(time.perf_counter())
        events = engine.step()  # one token for every active slot (it syncs on them)
        sent = time.perf_counter()
        for e in events:
            results[index[e.request_id]][1].append(sent)
    return time.perf_counter() - start, [results[i] for i in sorted(results)]


def serve_rows(layers, width, repeats, quick, deadline_s):
    """Part 5: the serving engine under load, its idle TTFT, and offline generate's tokens/s."""
    from flax import nnx
    from serve import _stats

    from jaxnv.models.generate import generate
    from jaxnv.serve.engine import Engine, SamplingParams

    # slots, requests, cache length, prompt lengths, new tokens (each range within one bucket)
    slots, count, max_len, prompt, new = (
        (4, 8, 64, (9, 16), (4, 16)) if quick else (16, 64, 256, (65, 128), (32, 128))
    )
    vocab = 512 if quick else VOCAB  # a small vocabulary keeps the CPU smoke run short
    policy = get_policy("p=bf16,c=bf16,o=f32")  # a server keeps bf16 weights
    model = Transformer(vocab, num_layers=layers, num_heads=heads_of(width), embed_dim=width,
                        max_seq_len=max_len, policy=policy, rngs=nnx.Rngs(0))  # fmt: skip
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model
    engine = Engine(graphdef, params, rest, slots=slots, max_len=max_len)
    rng = np.random.default_rng(0)
    requests = [
        (rng.integers(1, vocab, int(rng.integers(*prompt, endpoint=True))).tolist(),
         int(rng.integers(*new, endpoint=True)))
        for _ in range(count)
    ]  # fmt: skip
    prompts = rng.integers(1, vocab, (slots, prompt[1])).astype(np.int32)  # (S, P)
    rounds, stats = itertools.count(), []

    def serve_round():
        tag, share = f"r{next(rounds)}", deadline_s / (repeats + 1)
        stats.append(_stats(*drive_engine(engine, requests, tag, share)))
        return stats[-1]["rate"]

    def offline():
        start = time.perf_counter()
        out = generate(graphdef, params, prompts, new[1], temperature=0.0, model_state=rest)
        jax.block_until_ready(out)
        return slots * new[1] / (time.perf_counter() - start)

    rates = interleave({"engine": serve_round, "generate": offline}, repeats)
    timed = stats[1:]  # the warm-up round compiled
    med = lambda key, i: float(np.median([s[key][i] for s in timed]))  # noqa: E731
    idle = []
    for k in range(max(3, repeats)):  # the empty engine: prefill + first token of one prompt
        begin = time.perf_counter()
        engine.insert(f"idle-{k}", prompts[0], SamplingParams(max_tokens=2))
        idle.append(time.perf_counter() - begin)
        engine.cancel(f"idle-{k}")
    engine_rate, ref = rates["engine"], rates["generate"]
    case = f"serve {layers}x{width} bf16, {slots} slots"
    return [
        (f"{case}, {count} requests ({timed[-1]['tokens']} tokens)",
         "engine tokens/s; TTFT, inter-token p50 / p99",
         f"{engine_rate:,.0f} tokens/s",
         f"TTFT {med('ttft', 0):.1f} / {med('ttft', 1):.1f} ms, "
         f"inter-token {med('itl', 0):.2f} / {med('itl', 1):.2f} ms",
         f"compilations {engine.compilations()} (one bucket + decode)"),
        (f"{case}, idle", f"TTFT of one {prompt[1]}-token prompt",
         f"{1e3 * float(np.median(idle)):.1f} ms", "", ""),
        (f"offline generate, batch {slots} x ({prompt[1]} + {new[1]})",
         "tokens/s; engine / generate", f"{ref:,.0f} tokens/s", f"{engine_rate / ref:.2f}",
         "generate: one jitted loop"),
    ]  # fmt: skip


def data_rows(repeats, quick):
    """Part 6: the step fed by jaxnv's pipelines over the step on a device-resident batch."""
    import shutil
    import tempfile

    from data_pipeline import TARGET, iterate_rate, stdlib_files, write_parquet

    from jaxnv.core.losses import lm_loss
    from jaxnv.data.files import read_documents
    from jaxnv.data.lm import PackedBatches, PreparedCorpus
    from jaxnv.data.pipeline import IterableBatches
    from jaxnv.data.prepare import prepare
    from jaxnv.data.streaming import stream_dataset
    from jaxnv.data.tokenizers import load_tokenizer

    layers, width, batch, seq, steps, mb = (
        (1, 32, 2, 32, 4, 0.1) if quick else (4, 512, 16, 512, 100, 4.0)
    )
    policy = "fp32" if jax.default_backend() == "cpu" else "bf16"
    workdir = tempfile.mkdtemp(prefix="jaxnv-bench-gpu-data-")
    try:
        paths, tok = stdlib_files(mb), load_tokenizer("bytes")
        prepare(paths, os.path.join(workdir, "bytes"), tokenizer="bytes", progress=False)
        corpus = PreparedCorpus(os.path.join(workdir, "bytes"))
        parquet = os.path.join(workdir, "docs.parquet")
        write_parquet([d for d in read_documents(paths, "text") if d], parquet)
        pipelines = {  # each contender gets its own: a stream is read in order
            "PackedBatches": lambda: PackedBatches(
                corpus, np.arange(len(corpus)), seq_len=seq, batch_size=batch, seed=0
            ),
            "stream parquet, packed": lambda: IterableBatches(
                stream_dataset([parquet], "parquet", "text", tok, seq, batch, packing=True, seed=0)
            ),
        }
        resident = jax.device_put(pipelines["PackedBatches"]()[0])
        built, why = build_step(layers, width, seq, batch, policy, vocab=tok.vocab_size,
                                data=resident, loss_fn=lm_loss)  # fmt: skip
        case = f"data {layers}x{width} {policy} step, batch {batch}x{seq}"
        if built is None:
            return [(case, "step", why, "", "")]
        step, _, state, _ = built
        holder = {"state": state}

        def on_device():
            holder["state"], dt = time_steps(step, holder["state"], resident, steps)
            return dt

        def fed(batches):
            at = [0]

            def run():
                start, s = time.perf_counter(), holder["state"]
                for b in batches.iterate(at[0], at[0] + steps, put=jax.device_put):
                    s, metrics = step(s, b)
                jax.block_until_ready((s, metrics))
                holder["state"], at[0] = s, at[0] + steps
                return (time.perf_counter() - start) / steps

            return run

        contenders = {"resident": on_device}
        for name, make in pipelines.items():
            contenders[("fed", name)] = fed(make())
            contenders[("alone", name)] = iterate_rate(make(), steps)
        times = interleave(contenders, repeats)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    base = times["resident"]
    rows = [(f"{case} (bytes, packed)", "device-resident batch", f"{base * 1e3:.2f} ms/step",
             f"{batch * seq / base:,.0f} tokens/s", "")]  # fmt: skip
    for name in pipelines:
        dt, rate = times[("fed", name)], times[("alone", name)]
        rows.append((f"data: step fed by {name}", "step fed / resident",
                     f"{dt * 1e3:.2f} ms/step", f"{dt / base:.3f}", "<= 1.05"))  # fmt: skip
        rows.append((f"data: {name} alone", "pipeline / step tokens/s", f"{rate:,.0f} tokens/s",
                     f"{rate * base / (batch * seq):.1f}x", f">= {TARGET:.0f}x"))  # fmt: skip
    return rows


PARTS = ("overhead", "mfu", "precision", "attention", "spc", "serve", "data")


def guarded(part, fn, *args):
    """The part's rows, or one row saying why it did not run (OOM, an unsupported feature)."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - a part that fails is a result, not a crash
        traceback.print_exc()
        first = (str(err).strip().splitlines() or [""])[0][:160].replace("|", "/")
        why = "OOM" if is_oom(err) else f"failed: {type(err).__name__}: {first}"
        return [(part, "not run", why, "", "")]
    finally:
        gc.collect()  # drop the part's arrays before the next one


def main():
    p = parser(__doc__, repeats=5)
    p.add_argument("--parts", default=",".join(PARTS), help="which parts, comma-separated")
    p.add_argument("--size", default="18x2048", help="LAYERSxWIDTH of the MFU model (~1B)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    p.add_argument("--policies", default="bf16,fp16,fp32")
    p.add_argument("--serve-deadline", type=float, default=180.0, help="seconds, serve part")
    p.add_argument("--xla-overlap", action="store_true", help="add XLA's GPU overlap flags")
    args = p.parse_args()
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        p.error(f"--parts {args.parts!r}: choose among {','.join(PARTS)}")
    layers, width = (int(v) for v in args.size.lower().split("x"))
    seq, batch = args.seq, args.batch
    if args.quick:
        layers, width, seq, batch, args.repeats = 1, 128, 32, 2, 1
    print(f"devices: {jax.devices()}; parts: {','.join(parts)}", flush=True)
    rows = []
    if "overhead" in parts:
        rows += guarded("overhead", overhead_rows, args.repeats, args.quick)
    policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    if jax.default_backend() == "cpu" and "fp16" in policies:
        print("fp16 skipped: XLA:CPU has no float16 dot_general", flush=True)
        policies.remove("fp16")
    if "precision" not in parts:  # MFU alone: its target is bf16's
        policies = ["bf16"] if "bf16" in policies else policies[:1]
    if "mfu" in parts or "precision" in parts:
        rows += guarded("mfu / precision", mfu_rows, layers, width, seq, batch, policies,
                        args.repeats, args.quick, args.remat)  # fmt: skip
    if "attention" in parts:
        rows += guarded("attention", attention_rows, layers, width, seq, batch, args.repeats,
                        args.quick)  # fmt: skip
    if "spc" in parts:
        rows += guarded("spc", steps_per_call_rows, args.repeats, args.quick)
    if "serve" in parts:
        rows += guarded("serve", serve_rows, layers, width, args.repeats, args.quick,
                        args.serve_deadline)  # fmt: skip
    if "data" in parts:
        rows += guarded("data", data_rows, args.repeats, args.quick)
    flags = os.environ.get("XLA_FLAGS", "")
    notes = f"XLA_FLAGS: {flags}." if "xla_gpu" in flags else "No XLA GPU flags set."
    report("gpu.py", ("case", "measure", "time", "result", "target / check"), rows, args, notes)


if __name__ == "__main__":
    main()
