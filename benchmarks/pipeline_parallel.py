"""Pipeline parallelism: the measured bubble of the GPipe schedule against (S-1)/(M+S-1).

Run:  jaxnv bench pipeline_parallel [--quick] [--repeats 5] [--record]

The timed program is the gradient of a transformer's blocks (jaxnv's `Transformer`, 8 layers,
128 wide, 4 heads, sequences of 64, batch 16, fp32; embeddings and head included), run
  - pipelined: `mesh.stage=S` (S = 2), M = S, 2S, 4S microbatches, through
    `jaxnv.parallel.Pipeline` under `jax.shard_map`;
  - sequentially on one device: the same model without a stage axis (the reference).
Both run in a child process whose S CPU devices each compute on one thread
(`--xla_cpu_multi_thread_eigen=false`, `intra_op_parallelism_threads=1`): with S = 2 on a 2-core
machine each stage has a core of its own, as each stage has its own accelerator in a real
pipeline. The ideal pipelined step is then the sequential step / S (every stage busy all the
time); the measured bubble is 1 - ideal / pipelined, to compare with the theory
(S-1)/(M+S-1). Bubble iterations compute on zeros in this schedule, as on a GPU they would idle:
either way they cost a whole iteration. The embeddings and head run outside the pipeline on
every stage, which the ideal does not divide: the gap to theory includes them, and the
machine's other load. `--quick`: 4 layers, 32 wide, sequences of 16, 2 repeats.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

STAGES = 2


def _child(quick: bool, repeats: int) -> dict:
    """The timings (seconds, medians) in this process: 'seq' and one per microbatch count."""
    import time

    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxnv.models import Transformer
    from jaxnv.parallel import MeshConfig, make_mesh
    from jaxnv.parallel.pipeline import Pipeline

    layers, width, seq, batch = (4, 32, 16, 16) if quick else (8, 128, 64, 16)

    def model(pipe):
        return Transformer(256, num_layers=layers, num_heads=4, embed_dim=width,
                           max_seq_len=seq, pipeline=pipe, rngs=nnx.Rngs(0))  # fmt: skip

    def loss(params, graphdef, tokens):
        logits = nnx.merge(graphdef, params)(tokens)  # (B, T, V)
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, seq), 0, 256)
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    contenders = {}
    graphdef, params = nnx.split(model(None))
    one = jax.devices()[0]
    seq_args = (jax.device_put(params, one), graphdef, jax.device_put(tokens, one))
    contenders["seq"] = (grad, seq_args, None)
    mesh = make_mesh(MeshConfig(stage=STAGES, data=1))
    for m in (STAGES, 2 * STAGES, 4 * STAGES):
        graphdef, params = nnx.split(model(Pipeline(STAGES, m)))
        placed = jax.device_put(tokens, NamedSharding(mesh, P()))
        contenders[m] = (jax.jit(jax.grad(loss), static_argnums=1), (params, graphdef, placed),
                         mesh)  # fmt: skip

    def once(fn, args, mesh):
        start = time.perf_counter()
        if mesh is None:
            jax.block_until_ready(fn(*args))
        else:
            with jax.set_mesh(mesh):
                jax.block_until_ready(fn(*args))
        return time.perf_counter() - start

    samples = {k: [] for k in contenders}
    for r in range(repeats + 1):  # interleaved; round 0 compiles
        for k, (fn, args, mesh) in contenders.items():
            t = once(fn, args, mesh)
            if r:
                samples[k].append(t)
    return {str(k): sorted(v)[len(v) // 2] for k, v in samples.items()}


def main() -> None:
    from _common import parser, report

    args = parser(__doc__, repeats=5).parse_args()
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={STAGES} --xla_cpu_multi_thread_eigen=false "
        "intra_op_parallelism_threads=1"
    )
    env["JAX_PLATFORMS"] = "cpu"
    repeats = args.repeats = 2 if args.quick else args.repeats
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import pipeline_parallel as p; "
        "print('RESULT ' + json.dumps(p._child(sys.argv[2] == '1', int(sys.argv[3]))))"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, "-c", code, here, "1" if args.quick else "0", str(repeats)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"the timing child failed:\n{proc.stderr[-3000:]}")
    times = json.loads(lines[-1][len("RESULT ") :])
    ideal = times["seq"] / STAGES
    rows = [("sequential, 1 device", "-", f"{times['seq'] * 1e3:.1f} ms", "-", "-", "-")]
    for m in (STAGES, 2 * STAGES, 4 * STAGES):
        t = times[str(m)]
        theory = (STAGES - 1) / (m + STAGES - 1)
        measured = 1 - ideal / t
        rows.append((f"GPipe S={STAGES}", str(m), f"{t * 1e3:.1f} ms", f"{ideal * 1e3:.1f} ms",
                     f"{measured:.1%}", f"{theory:.1%}"))  # fmt: skip
    report(
        "pipeline_parallel.py",
        ("schedule", "M", "step (fwd+bwd)", "ideal (seq / S)", "bubble measured", "theory"),
        rows,
        args,
    )


if __name__ == "__main__":
    main()
