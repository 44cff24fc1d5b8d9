"""Pipeline parallelism: the measured bubble of the GPipe schedule against (S-1)/(M+S-1).

Run:  jaxnv bench pipeline_parallel [--quick] [--repeats 7] [--batch 64] [--record]

The timed program is the gradient of jaxnv's `Transformer` (8 layers, 128 wide, 4 heads,
sequences of 64, batch 64, fp32; embeddings and head included), run
  - pipelined: `mesh.stage=S` (S = 2), M = S, 2S, 4S microbatches, through
    `jaxnv.parallel.Pipeline`, params placed by the sharding plan (each stage holds its layers);
  - sequentially on one device, whole batch: the reference;
  - sequentially on one device over the same M microbatches one after another (unrolled): what
    cutting the batch costs by itself, with no pipeline;
  - sequentially with L/S layers: with the whole model, it gives the unpipelined part F
    (embeddings, head, loss), which every stage of the pipelined step runs.

In one process XLA:CPU's devices share one intra-op thread pool sized to the cores, so S CPU
devices finish the same work no sooner than one device using those cores: the stages cannot
overlap, whatever the thread flags. The child process is therefore pinned to one core, with the
same settings for every contender, and the bubble is measured as the work it wastes (bubble
iterations compute on zeros, at full cost): the ideal pipelined step is the sequential one plus
the (S-1) extra copies of F, and the measured bubble is 1 - ideal / pipelined, in process CPU
time (on one core that is the work done, whatever else the machine runs; the wall time is shown
too). With the bubble iterations the only waste it equals the theory (S-1)/(M+S-1). "vs
microbatched" replaces the sequential step by its microbatched twin, leaving out the cost of
microbatching on XLA:CPU, which is no bubble. At these sizes the pipeline unrolls its schedule
and its layers (`Pipeline.unroll`, auto), as the references unroll theirs; a schedule too long
to unroll runs as a loop, which XLA:CPU runs slower. The batch (`--batch`, 64) keeps the M = 4S
microbatches at 8 rows: smaller ones (batch 16: 2 rows) measure XLA:CPU's loss of matmul
efficiency on tiny operands, which the "vs microbatched" column shows. `--quick`: 4 layers, 32
wide, sequences of 16, batch 16, 2 repeats.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

STAGES = 2


def _child(quick: bool, repeats: int, batch: int) -> dict:
    """Medians of {"cpu": seconds, "wall": seconds} per contender, timed in this process."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # before XLA sizes its thread pools
    import time

    import flax
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxnv.core.state import split_model
    from jaxnv.models import Transformer
    from jaxnv.parallel import MeshConfig, make_mesh
    from jaxnv.parallel.mesh import make_plan
    from jaxnv.parallel.pipeline import Pipeline

    layers, width, seq, batch = (4, 32, 16, 16) if quick else (8, 128, 64, batch)

    def model(pipe, num_layers=layers):
        return Transformer(256, num_layers=num_layers, num_heads=4, embed_dim=width,
                           max_seq_len=seq, pipeline=pipe, rngs=nnx.Rngs(0))  # fmt: skip

    def loss(params, graphdef, tokens, rest):
        logits = nnx.merge(graphdef, params, rest)(tokens)  # (B, T, V)
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    def microbatched_loss(params, graphdef, tokens, rest, m):
        module = nnx.merge(graphdef, params, rest)
        parts = tokens.reshape(batch // m, m, seq).swapaxes(0, 1)  # (M, B/M, T), as the pipeline
        # one after another, unrolled like the pipeline's schedule (a lax.map loop costs more)
        return jnp.mean(jnp.stack([jnp.mean(jax.nn.logsumexp(module(t), -1)) for t in parts]))

    @flax.struct.dataclass
    class Params:  # what make_plan reads: a state with .params (plain dicts, as split_model's)
        params: object

    tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, seq), 0, 256)
    one = jax.devices()[0]
    contenders = {}
    for name, num_layers in (("seq", layers), ("seq L/S", layers // STAGES)):
        graphdef, params, rest = split_model(model(None, num_layers))
        args = (jax.device_put(params, one), graphdef, jax.device_put(tokens, one), rest)
        contenders[name] = (jax.jit(jax.grad(loss), static_argnums=1), args, None)
    mesh = make_mesh(MeshConfig(stage=STAGES, data=1))
    ms = (STAGES, 2 * STAGES, 4 * STAGES)
    for m in ms:
        graphdef, params, rest = split_model(model(None))
        grad = jax.jit(jax.grad(microbatched_loss), static_argnums=(1, 4))
        args = (jax.device_put(params, one), graphdef, jax.device_put(tokens, one), rest, m)
        contenders[f"mb {m}"] = (grad, args, None)
    for m in ms:
        abstract = nnx.eval_shape(lambda m=m: model(Pipeline(STAGES, m)))
        graphdef, params, rest = split_model(model(Pipeline(STAGES, m)))
        plan = make_plan(abstract, Params(jax.eval_shape(lambda p=params: p)), mesh)
        args = (jax.device_put(params, plan.state.params), graphdef,
                jax.device_put(tokens, NamedSharding(mesh, P())), rest)  # fmt: skip
        contenders[f"pipe {m}"] = (jax.jit(jax.grad(loss), static_argnums=1), args, mesh)

    def once(fn, args, mesh):
        cpu, wall = time.process_time(), time.perf_counter()
        if mesh is None:
            jax.block_until_ready(fn(*args))
        else:
            with jax.set_mesh(mesh):
                jax.block_until_ready(fn(*args))
        return time.process_time() - cpu, time.perf_counter() - wall

    samples = {k: [] for k in contenders}
    for r in range(repeats + 1):  # interleaved; round 0 compiles
        for k, (fn, args, mesh_) in contenders.items():
            t = once(fn, args, mesh_)
            if r:
                samples[k].append(t)

    def median(v):
        return sorted(v)[len(v) // 2]

    return {
        k: {"cpu": median([c for c, _ in v]), "wall": median([w for _, w in v])}
        for k, v in samples.items()
    }


def main() -> None:
    from _common import parser, report

    p = parser(__doc__, repeats=7)
    p.add_argument("--batch", type=int, default=64, help="rows per step (a multiple of 4S)")
    args = p.parse_args()
    if args.batch % (4 * STAGES):
        raise SystemExit(f"--batch {args.batch} does not split into {4 * STAGES} microbatches; "
                         f"pass a multiple of {4 * STAGES}")  # fmt: skip
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={STAGES}"
    env["JAX_PLATFORMS"] = "cpu"
    repeats = args.repeats = 2 if args.quick else args.repeats
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import pipeline_parallel as p; "
        "a = sys.argv; print('RESULT ' + json.dumps(p._child(a[2] == '1', int(a[3]), int(a[4]))))"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, "-c", code, here, "1" if args.quick else "0", str(repeats),
           str(args.batch)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"the timing child failed:\n{proc.stderr[-3000:]}")
    times = json.loads(lines[-1][len("RESULT ") :])
    S = STAGES
    seq = times["seq"]["cpu"]
    # seq = F + blocks(L), seq L/S = F + blocks(L)/S: the unpipelined part F, which every stage
    # runs (small; clipped at 0 against timing noise)
    fixed = max(0.0, (S * times["seq L/S"]["cpu"] - seq) / (S - 1))

    def ms_(t):
        return f"{t * 1e3:.1f} ms"

    rows = [
        ("sequential, 1 device", "-", ms_(times["seq"]["wall"]), ms_(seq), "-", "-", "-", "-"),
        ("unpipelined part F", "-", "-", ms_(fixed), "-", "-", "-", "-"),
    ]
    for m in (S, 2 * S, 4 * S):
        mb = times[f"mb {m}"]
        rows.append((f"sequential, {m} microbatches", str(m), ms_(mb["wall"]), ms_(mb["cpu"]),
                     "-", "-", "-", "-"))  # fmt: skip
    for m in (S, 2 * S, 4 * S):
        t = times[f"pipe {m}"]
        ideal = seq + (S - 1) * fixed
        twin = times[f"mb {m}"]["cpu"] + (S - 1) * fixed
        rows.append((f"GPipe S={S}", str(m), ms_(t["wall"]), ms_(t["cpu"]), ms_(ideal),
                     f"{1 - ideal / t['cpu']:.1%}", f"{1 - twin / t['cpu']:.1%}",
                     f"{(S - 1) / (m + S - 1):.1%}"))  # fmt: skip
    report(
        "pipeline_parallel.py",
        (
            "contender",
            "M",
            "step wall",
            "step CPU (1 core)",
            "ideal: seq + (S-1) F",
            "bubble measured",
            "vs microbatched",
            "theory",
        ),  # fmt: skip
        rows,
        args,
        notes=f"Batch {16 if args.quick else args.batch}.",
    )


if __name__ == "__main__":
    main()
