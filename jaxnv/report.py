"""What a sharded step costs before it runs: per-device state bytes, collective traffic, memory.

    print(format_report(run))           # mesh, rules, bytes per device, collectives per step
    print(dry_run(run))                 # + the per-param table and XLA's memory analysis

Collective bytes are read from the compiled HLO (the result shapes of all-reduce, all-gather,
reduce-scatter, all-to-all and collective-permute ops), next to the textbook minimum of the chosen
strategy: data parallel all-reduces the gradients (2 (n-1)/n of the param bytes on a ring); FSDP
all-gathers the params for the forward and the backward and reduce-scatters the gradients
(3 (n-1)/n).
"""

from __future__ import annotations

import re

import jax
import numpy as np

from jaxnv.parallel import format_table

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
    "f64": 8,
    "f32": 4,
    "bf16": 2,
    "f16": 2,
    "s64": 8,
    "s32": 4,
    "u32": 4,
    "s8": 1,
    "u8": 1,
    "pred": 1,
    "s16": 2,
    "u16": 2,
    "u64": 8,
}
_SHAPE = re.compile(r"(f64|f32|bf16|f16|s64|s32|u32|s16|u16|u64|s8|u8|pred)\[([0-9,]*)\]")


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded arrays or ShapeDtypeStructs with shardings."""
    total = 0
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
    return total


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes produced per device by each kind of collective in an HLO module's text."""
    out = dict.fromkeys(COLLECTIVES, 0)
    for line in hlo_text.splitlines():
        for kind in COLLECTIVES:
            # `%x = f32[8,4]{1,0} all-reduce(...)` or a tuple result `(f32[..], f32[..]) all-...(`
            marker = f" {kind}("
            start_marker = f" {kind}-start("
            if marker in line or start_marker in line:
                lhs = line.split(marker if marker in line else start_marker)[0]
                lhs = lhs.split("=", 1)[-1]
                for dtype, dims in _SHAPE.findall(lhs):
                    n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
                    out[kind] += n * _DTYPE_BYTES[dtype]
                break
    return out


def _minimum(rules: dict, mesh, param_bytes: int) -> tuple[int, str]:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if n == 1 and mesh.shape["tensor"] == 1:
        return 0, "one device: no collectives needed"
    if not rules:
        return int(2 * (n - 1) / n * param_bytes), f"dp: all-reduce grads, 2(n-1)/n, n={n}"
    if set(rules.values()) == {"fsdp"}:
        f, d = mesh.shape["fsdp"], mesh.shape["data"]
        # gather params for forward and backward, reduce-scatter grads over fsdp, then all-reduce
        # each device's grad shard over the data replicas
        gathered = 3 * (f - 1) / f * param_bytes
        replicas = 2 * (d - 1) / d * param_bytes / f
        return int(gathered + replicas), f"fsdp: 2 all-gathers + reduce-scatter (n={f}), " + (
            f"all-reduce over data (n={d})"
        )
    return -1, "tensor parallel: depends on activations (no single textbook figure)"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def format_report(run, compiled=None) -> str:
    """Mesh, rules, per-device param/optimizer bytes and (given the compiled step) collectives."""
    plan, state = run.plan, run.state
    params = per_device_bytes(state.params)
    full = sum(
        int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state.params)
    )
    lines = [
        f"mesh {dict(plan.mesh.shape)}, rules {plan.rules or 'dp (replicated params)'}",
        f"per device: params {_mib(params)} of {_mib(full)}, "
        f"optimizer state {_mib(per_device_bytes(state.opt_state))}",
    ]
    if compiled is not None:
        moved = collective_bytes(compiled.as_text())
        total = sum(moved.values())
        minimum, why = _minimum(plan.rules, plan.mesh, full)
        detail = ", ".join(f"{k} {_mib(v)}" for k, v in moved.items() if v)
        lines.append(f"collectives per step per device: {_mib(total)} ({detail or 'none'})")
        if minimum >= 0:
            lines.append(f"  textbook minimum: {_mib(minimum)} ({why})")
        else:
            lines.append(f"  textbook minimum: {why}")
    return "\n".join(lines)


def compile_step(run):
    """The train step compiled ahead of time for the run's state and batch shapes."""
    batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=run.plan.batch),
        run.train_step.batch_spec,
    )
    with jax.set_mesh(run.plan.mesh):
        return run.train_step.fn.lower(run.state, batch).compile()


def dry_run(run) -> str:
    """The sharding table, the report and XLA's per-device memory analysis of the train step."""
    compiled = compile_step(run)
    lines = [format_table(run.plan), format_report(run, compiled)]
    mem = compiled.memory_analysis()
    if mem is not None:
        parts = {
            "arguments": mem.argument_size_in_bytes,
            "outputs": mem.output_size_in_bytes,
            "temporaries": mem.temp_size_in_bytes,
            "code": mem.generated_code_size_in_bytes,
            "aliased (donated)": mem.alias_size_in_bytes,
        }
        peak = (
            sum(v for k, v in parts.items() if k != "aliased (donated)")
            - parts["aliased (donated)"]
        )
        lines.append(
            "memory per device: "
            + ", ".join(f"{k} {_mib(v)}" for k, v in parts.items())
            + f"; about {_mib(peak)} at peak"
        )
    return "\n".join(lines)
