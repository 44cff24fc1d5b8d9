"""Memory and communication of the sharding presets on 8 simulated devices, against theory.

Run:  .venv/bin/python benchmarks/collectives.py [--quick] [--record]
      jaxnv bench collectives --quick

For a small char_gpt transformer and each preset (dp: data=8; fsdp: fsdp=8; tp: tensor=8;
fsdp+tp: fsdp=4 x tensor=2) the real jaxnv train step is built abstractly (nothing allocated)
and compiled for 8 CPU devices. Reported per device:

- **state bytes**: params + optimizer state, from the placed shardings (`per_device_bytes`),
  against the rule table applied to the model's shapes (dp: a full copy; fsdp: 1/8; tp: 1/8 of
  what has a head, MLP or vocabulary dim, the norm scales whole).
- **collective bytes sent per step**, by kind, from the compiled HLO
  (`jaxnv.parallel.report.collectives`):
  each op's buffer times its ring factor for its replica group of n devices (all-reduce
  2(n-1)/n, all-gather and reduce-scatter (n-1)/n of the full buffer, collective-permute 1).
  Theory, in the same unit, from the shapes alone: dp all-reduces the gradients over 8; fsdp
  all-gathers each param once and reduce-scatters its gradient; tp all-reduces one activation
  (B/(data*fsdp), T, D) per block after attention and after the MLP in the forward and two more
  in the backward (4 per block), plus one for the vocabulary-parallel embedding lookup, one for
  the head's input gradient, and three (B, T) statistics of the vocabulary-parallel softmax.

The tp preset uses tensor=8 (and 8 heads) rather than data=2 x tensor=4, so that its row shows
tensor parallelism's own traffic alone; dp gradient traffic has its own row. The
"GPU" rows count an all-reduce whose result is only sliced per device as the reduce-scatter
that XLA's GPU pipeline (`ReduceScatterCreator`) makes of it; the CPU pipeline does not.
Bytes are deterministic: `--repeats` does not change them. Appends the table to
benchmarks/RESULTS.md with --record. Where every excess comes from: docs/distributed.md.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import time

import numpy as np

DEVICES = 8


def _want_devices() -> bool:
    """Ask for 8 CPU devices; False when JAX's backend already started with fewer."""
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", DEVICES)
    except RuntimeError:  # backend initialised already (e.g. imported and used by a caller)
        pass
    return len(jax.devices("cpu")) >= DEVICES


PRESETS = {  # name: mesh overrides
    "dp": ("mesh.rules=dp", "mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1"),
    "fsdp": ("mesh.rules=fsdp", "mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"),
    "tp": ("mesh.rules=tp", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=8"),
    "fsdp+tp": ("mesh.rules=fsdp+tp", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"),
}
SIZES = {  # layers, embed, heads, seq, global batch
    "quick": (1, 64, 8, 32, 16),
    "full": (4, 256, 8, 128, 32),
}


def experiment(preset: str, quick: bool):
    from jaxnv import apply_overrides
    from jaxnv.experiment import load_experiment

    layers, embed, heads, seq, batch = SIZES["quick" if quick else "full"]
    exp = load_experiment("char_gpt")
    overrides = [
        f"model.num_layers={layers}",
        f"model.embed_dim={embed}",
        f"model.num_heads={heads}",
        f"data.seq_len={seq}",
        f"train.batch_size={batch}",
        "precision.policy=fp32",
        *PRESETS[preset],
    ]
    return dataclasses.replace(exp, config=apply_overrides(exp.config, overrides))


def theory(run) -> tuple[int, dict[str, float]]:
    """(state bytes per device, bytes sent per device by kind) from the model's shapes, the
    preset's rule table and the mesh sizes alone (no sharding objects, no HLO)."""
    from jaxnv.parallel import RULES
    from jaxnv.parallel.report import COLLECTIVES

    cfg, mesh = run.cfg, run.plan.mesh
    rules = RULES[cfg.mesh.rules]
    d, f, t = (mesh.shape[a] for a in ("data", "fsdp", "tensor"))
    itemsize = np.dtype(run.policy.param_dtype).itemsize
    param_bytes, sent = 0.0, dict.fromkeys(COLLECTIVES, 0.0)
    for _, logical, shape, _ in run.plan.table:
        ways = {"data": 1, "fsdp": 1, "tensor": 1}
        for dim, name in zip(shape, logical, strict=True):
            axis = rules.get(name) if name else None
            if axis and dim % mesh.shape[axis] == 0:  # the rules keep uneven dims whole
                ways[axis] *= mesh.shape[axis]
        local = math.prod(shape) * itemsize / ways["tensor"]  # this tensor rank's part
        param_bytes += local / ways["fsdp"]
        if ways["fsdp"] > 1:  # gather once (kept for the backward), reduce-scatter the grads
            sent["all-gather"] += (f - 1) / f * local
            sent["reduce-scatter"] += (f - 1) / f * local
            sent["all-reduce"] += 2 * (d - 1) / d * local / f
        else:  # gradients all-reduced over the batch axes
            sent["all-reduce"] += 2 * (d * f - 1) / (d * f) * local
    if t > 1:  # Megatron: activations (B / (data * fsdp), T, D)
        m = cfg.model
        rows = cfg.train.batch_size // (d * f) * cfg.data.seq_len
        act = rows * m.embed_dim * np.dtype(run.policy.compute_dtype).itemsize
        count = 4 * m.num_layers + (2 if rules.get("vocab") == "tensor" else 0)
        stats = 3 * rows * 4 if rules.get("vocab") == "tensor" else 0  # max, sum, target logit
        sent["all-reduce"] += 2 * (t - 1) / t * (count * act + stats)
    opt_bytes = 2 * param_bytes  # adamw: two moments shaped like the params
    return int(param_bytes + opt_bytes), sent


def short(op_name: str, width: int = 70) -> str:
    name = op_name.replace("jit(train_step)/", "")
    return name if len(name) <= width else name[: width - 3] + "..."


def measure(preset: str, quick: bool) -> dict:
    import jax

    from jaxnv.parallel.report import INSPECT_ONLY, collectives, compile_step, per_device_bytes
    from jaxnv.train import build

    run = build(experiment(preset, quick), jax.devices("cpu")[:DEVICES], abstract=True)
    compiled = compile_step(run, INSPECT_ONLY)
    ops = collectives(compiled.as_text(), DEVICES)
    state = per_device_bytes(run.state.params) + per_device_bytes(run.state.opt_state)
    full = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(run.state.params))
    state_theory, sent_theory = theory(run)
    return {
        "run": run,
        "ops": ops,
        "state": state,
        "state_theory": state_theory,
        "sent_theory": sent_theory,
        "param_bytes": full,
    }


def kib(n: float) -> str:
    return f"{n / 1024:,.1f} KiB"


def compare(measured: float, expected: float) -> tuple[str, str]:
    if expected == 0:
        return ("-", "yes" if measured == 0 else "no (none expected)")
    ratio = measured / expected
    return f"{ratio:.3f}", "yes" if abs(ratio - 1) <= 0.10 else "no"


def rows_for(preset: str, r: dict) -> list[tuple]:
    from jaxnv.parallel.report import COLLECTIVES, sent_bytes

    ops = r["ops"]
    rows = [
        (preset, "state bytes/device (params + adamw)", kib(r["state"]), kib(r["state_theory"]))
    ]
    cpu, gpu = sent_bytes(ops), sent_bytes(ops, as_gpu=True)
    for kind in COLLECTIVES:
        n = sum(c.count for c in ops if c.kind == kind)
        if cpu[kind] or r["sent_theory"][kind]:
            label = f"{kind} sent/device ({n} ops)"
            rows.append((preset, label, kib(cpu[kind]), kib(r["sent_theory"][kind])))
    total = sum(r["sent_theory"].values())
    rows.append((preset, "total sent/device", kib(sum(cpu.values())), kib(total)))
    if gpu != cpu:
        label = "total sent/device, sliced all-reduce as reduce-scatter (GPU)"
        rows.append((preset, label, kib(sum(gpu.values())), kib(total)))
    out = []
    for p, q, measured, expected in rows:
        m = float(measured.split()[0].replace(",", ""))
        e = float(expected.split()[0].replace(",", ""))
        out.append((p, q, measured, expected, *compare(m, e)))
    return out


def breakdown(preset: str, r: dict, top: int = 8) -> str:
    """The largest collectives by bytes sent, grouped by kind and source op."""
    groups: dict[tuple[str, int, str], list[float]] = {}
    for c in r["ops"]:
        key = (c.kind, c.group, short(c.op_name))
        groups.setdefault(key, [0.0, 0])
        groups[key][0] += c.sent()
        groups[key][1] += c.count
    lines = [f"{preset}: largest collectives (bytes sent per device, as compiled for CPU)"]
    for (kind, n, where), (sent, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {kib(sent):>12}  {count:3}x {kind:18} n={n}  {where}")
    return "\n".join(lines)


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import parser, report

    args = parser(__doc__, repeats=1).parse_args()
    if not _want_devices():  # JAX already runs with fewer devices: measure in a fresh process
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        flags = env.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES}".strip()
        done = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env=env)
        if done.returncode:
            sys.exit(done.returncode)
        return
    started = time.perf_counter()
    results = {p: measure(p, args.quick) for p in PRESETS}
    rows = []
    for preset, r in results.items():
        print(breakdown(preset, r), end="\n\n")
        rows += rows_for(preset, r)
    layers, embed, heads, seq, batch = SIZES["quick" if args.quick else "full"]
    params = results["dp"]["param_bytes"]
    notes = (
        f"char_gpt {layers} x {embed}, {heads} heads, seq {seq}, global batch {batch}, fp32, "
        f"{params / 2**20:.2f} MiB of params; 8 simulated CPU devices; bytes sent per device per "
        f"step under ring algorithms; built and compiled in {time.perf_counter() - started:.0f} s."
    )
    header = ("preset", "quantity", "measured", "theory", "measured/theory", "within 10%?")
    report("collectives.py", header, rows, args, notes)


if __name__ == "__main__":
    main()
