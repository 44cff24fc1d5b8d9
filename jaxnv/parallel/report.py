"""What a sharded step costs before it runs: per-device state bytes, collective traffic, memory.

    print(format_report(run))           # mesh, rules, bytes per device, collectives per step
    print(dry_run(run))                 # + the per-param table and XLA's memory analysis
    ops = collectives(compiled.as_text())   # every collective op: kind, buffer, group, bytes sent

Collectives are read from the compiled HLO. Two figures per op:

- **buffer bytes**: the size of the op's result as printed (an all-gather's gathered output, a
  reduce-scatter's shard, an all-reduce's whole buffer);
- **bytes sent per device** under the bandwidth-optimal ring algorithms NCCL uses, with n the size
  of the op's replica group: all-reduce 2(n-1)/n x buffer, all-gather (n-1)/n x output,
  reduce-scatter (n-1)/n x input, all-to-all (n-1)/n x buffer, collective-permute the buffer.

The textbook minimum (`param_traffic`) is counted in the same unit, from the plan's param shapes:
data parallel all-reduces each gradient over the batch axes, FSDP all-gathers each param once and
reduce-scatters its gradient over `fsdp`, then all-reduces the shard over `data`. Tensor-parallel
activation traffic depends on the model (see benchmarks/collectives.py for the transformer's).

XLA's CPU pipeline has no reduce-scatter creation pass: a gradient that should be reduce-scattered
is compiled as an all-reduce followed by a per-device dynamic-slice. `collectives` marks such
all-reduce bytes as `sliced`; `sent_bytes(ops, as_gpu=True)` counts them as the reduce-scatters
XLA's GPU pipeline (`ReduceScatterCreator`) makes of them.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np

from jaxnv.parallel.mesh import format_table, stage_count
from jaxnv.parallel.pipeline import bubble_fraction, stage_bytes

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
_OP = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_KIND = re.compile(r"^(" + "|".join(COLLECTIVES) + r")(-start)?$")


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded arrays or ShapeDtypeStructs with shardings."""
    total = 0
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
    return total


def _shape_bytes(text: str) -> list[int]:
    """Bytes of every array shape in `text` (`f32[8,4]{1,0}` -> 128), in order."""
    return [
        int(np.prod([int(d) for d in dims.split(",") if d])) * _DTYPE_BYTES[dtype]
        for dtype, dims in _SHAPE.findall(text)
    ]


def group_size(line: str, devices: int) -> int:
    """Devices in each replica group of a collective op's HLO line.

    Reads the three spellings XLA prints: explicit `{{0,1},{2,3}}`, iota `[2,4]<=[8]` (2 groups
    of 4) and mesh `mesh['axis_0'=4,'axis_1'=2], device_ids=(...) {'axis_0'}` (the listed axes).
    An empty or missing list means all `devices`.
    """
    m = re.search(
        r"replica_groups=(\{\{[^}]*\}|\[[\d,]+\]<=|mesh\[[^\]]*\])"
        r"(?:, device_ids=\(\S*\))?(?: \{([^}]*)\})?",
        line,
    )
    if m is None:
        return devices
    spec, chosen = m.groups()
    if spec.startswith("{{"):
        return len(spec[2:].split(","))
    if spec.startswith("["):
        return int(spec[1:].split("]")[0].split(",")[-1])
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", spec))
    if chosen is None:
        return math.prod(int(v) for v in sizes.values())
    n = 1
    for name, sub in re.findall(r"'([^']+)'(?::\(\d+\)(\d+))?", chosen):
        n *= int(sub) if sub else int(sizes.get(name, 1))  # `'a':(k)m`: m devices of axis a
    return n


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective op of a compiled step."""

    kind: str  # one of COLLECTIVES
    buffer: int  # bytes of the result (all-gather: gathered; reduce-scatter: the shard)
    group: int  # devices in each replica group
    op_name: str  # the JAX op it came from (HLO metadata), for explanations
    sliced: int = 0  # all-reduce bytes whose results are only dynamic-sliced per device
    count: int = 1  # executions per step (a collective in a loop body runs once per trip)

    def sent(self, as_gpu: bool = False) -> float:
        """Bytes one device sends per step (ring algorithms); `as_gpu` counts the `sliced` part
        of an all-reduce as the reduce-scatter XLA's GPU pipeline makes of it."""
        n, b = self.group, self.buffer
        if n <= 1 and self.kind != "collective-permute":
            return 0.0
        if self.kind == "all-reduce":
            rs = self.sliced if as_gpu else 0
            one = 2 * (n - 1) / n * (b - rs) + (n - 1) / n * rs
        elif self.kind == "reduce-scatter":
            one = (n - 1) * b
        elif self.kind == "collective-permute":
            one = b
        else:  # all-gather, all-to-all
            one = (n - 1) / n * b
        return one * self.count

    def effective_kind(self, as_gpu: bool = False) -> str:
        return (
            "reduce-scatter" if as_gpu and self.kind == "all-reduce" and self.sliced else self.kind
        )


def _parse(hlo_text: str):
    """`{name: (result text, opcode, operand names, line)}`, users by name, trips by name."""
    ops, users, computation_of, trips = {}, {}, {}, {}
    computation = ""
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            computation = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
            computation = computation.lstrip("%")
            continue
        m = _OP.match(line)
        if m is None:
            continue
        name, result, opcode, rest = m.groups()
        head = rest.split("metadata=")[0]
        operands = re.findall(r"(?<![=\w])%([\w.\-]+)", head)
        ops[name] = (result, opcode, operands, line)
        computation_of[name] = computation
        for o in operands:
            users.setdefault(o, []).append(name)
        if opcode == "while":
            body = re.search(r"body=%([\w.\-]+)", line)
            n = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            if body and n:
                trips[body.group(1)] = int(n.group(1))
    return ops, users, computation_of, trips


def _only_sliced(name: str, ops, users, depth: int = 0) -> bool:
    """Whether every use of `name` cuts out this device's part (a dynamic-slice by partition)."""
    uses = users.get(name, [])
    if not uses or depth > 3:
        return False
    for u in uses:
        _, opcode, operands, _ = ops[u]
        if opcode in ("bitcast", "copy", "reshape"):
            if not _only_sliced(u, ops, users, depth + 1):
                return False
        elif not (
            opcode == "dynamic-slice"
            or "dynamic-slice" in u
            or any(o.startswith("partition-id") for o in operands)
        ):
            return False
    return True


def collectives(hlo_text: str, devices: int | None = None) -> list[Collective]:
    """Every collective op in an HLO module's text (async `-start` ops once, `-done` not)."""
    devices = jax.device_count() if devices is None else devices
    ops, users, computation_of, trips = _parse(hlo_text)
    out = []
    for name, (result, opcode, _, line) in ops.items():
        m = _KIND.match(opcode)
        if m is None:
            continue
        kind, started = m.group(1), bool(m.group(2))
        sizes = _shape_bytes(result)
        if started and kind != "all-reduce":  # (operands..., outputs..., [contexts]): outputs
            sizes = [s for s in sizes if s > 4] or sizes
            sizes = sizes[len(sizes) // 2 :]
        sliced = 0
        if kind == "all-reduce" and not started:
            if result.startswith("("):  # a tuple: each element is read by get-tuple-elements
                readers: dict[int, bool] = {}
                for u in users.get(name, []):
                    index = re.search(r"index=(\d+)", ops[u][3])
                    if ops[u][1] != "get-tuple-element" or index is None:
                        readers = {}  # the tuple itself is used: nothing is only sliced
                        break
                    i = int(index.group(1))
                    readers[i] = readers.get(i, True) and _only_sliced(u, ops, users)
                sliced = sum(sizes[i] for i, only in readers.items() if only)
            elif _only_sliced(name, ops, users):
                sliced = sum(sizes)
        where = re.search(r'op_name="([^"]*)"', line)
        out.append(
            Collective(
                kind,
                sum(sizes),
                group_size(line, devices),
                where.group(1) if where else "",
                sliced,
                trips.get(computation_of[name], 1),
            )
        )
    return out


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Buffer bytes per step of each kind of collective in an HLO module's text."""
    out = dict.fromkeys(COLLECTIVES, 0)
    for c in collectives(hlo_text, devices=1):
        out[c.kind] += c.buffer * c.count
    return out


def sent_bytes(ops: list[Collective], as_gpu: bool = False) -> dict[str, float]:
    """Bytes one device sends per step, by kind (ring algorithms; see the module docstring)."""
    out = dict.fromkeys(COLLECTIVES, 0.0)
    for c in ops:
        out[c.effective_kind(as_gpu)] += c.sent(as_gpu)
    return out


def param_traffic(plan, params) -> dict[str, float]:
    """The textbook bytes one device sends per step to keep `params` (ShapeDtypeStructs or
    arrays, as laid out by `plan`) in sync, by kind: gradients all-reduced over the batch axes,
    or, for a param split over `fsdp`, gathered once (kept for the backward), its gradient
    reduce-scattered over `fsdp` and the shard all-reduced over `data`. Tensor-parallel
    activation traffic is not included (it depends on the model).
    """
    mesh = plan.mesh
    d, f = mesh.shape["data"], mesh.shape["fsdp"]
    out = dict.fromkeys(COLLECTIVES, 0.0)
    for x, sharding in zip(
        jax.tree.leaves(params), jax.tree.leaves(plan.state.params), strict=True
    ):
        spec = [
            a
            for axes in sharding.spec
            if axes
            for a in (axes if isinstance(axes, tuple) else (axes,))
        ]
        local = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        if "tensor" in spec:
            local //= mesh.shape["tensor"]
        if "fsdp" in spec and f > 1:
            out["all-gather"] += (f - 1) / f * local
            out["reduce-scatter"] += (f - 1) / f * local
            out["all-reduce"] += 2 * (d - 1) / d * local / f
        else:
            n = d * f
            out["all-reduce"] += 2 * (n - 1) / n * local
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _size(n: float) -> str:
    """Bytes in the unit that reads best: 812 B, 3.2 KiB, 14.53 MiB, 1.20 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def pipeline_lines(run) -> list[str]:
    """Per-stage memory, the theoretical bubble and the bytes sent between stages per step (no
    lines without a `stage` axis). The blocks are stored stacked and split over `stage`: each
    device holds its stage's layers and the params outside the blocks."""
    plan, cfg = run.plan, run.cfg
    S = stage_count(plan.mesh)
    if S <= 1:
        return []
    R, M = cfg.mesh.stage_repeats, cfg.train.pipeline_microbatches or S
    leaves = jax.tree.leaves(run.state.params)  # in the order of plan.table
    params = dict(zip((row[0] for row in plan.table), leaves, strict=True))
    blocks = per_device_bytes([x for p, x in params.items() if p.startswith("blocks/")])
    rest = per_device_bytes([x for p, x in params.items() if not p.startswith("blocks/")])
    moments = per_device_bytes(run.state.opt_state) / max(blocks + rest, 1)  # bytes per param byte
    spec = jax.tree.leaves(run.train_step.batch_spec)[0]  # (B, T) tokens
    width = next((x.shape[-1] for p, x in params.items() if p == "embedding"), 0)  # D
    rows = spec.shape[0] // (plan.mesh.shape["data"] * plan.mesh.shape["fsdp"])
    act = rows * int(np.prod(spec.shape[1:])) * width * np.dtype(run.policy.compute_dtype).itemsize
    sent = stage_bytes(act, S, M, R)
    schedule = "GPipe" if R == 1 else f"circular x{R}"
    # circular: each stage computes with R chunks that are mostly stored on other stages, so
    # about (S-1)/S of its layers' params come in each step and their gradients go back
    reorder = 0.0 if R == 1 else 2 * (S - 1) / S * blocks
    return [
        f"pipeline: {S} stages, {schedule}, {M} microbatches: {M * R + S - 1} iterations a "
        f"step, bubble (S-1)/(M*R+S-1) = {bubble_fraction(S, M, R):.1%} in theory",
        f"  per stage: params {_size(blocks + rest)} ({_size(blocks)}: its 1/{S} of the "
        f"blocks, {_size(rest)} outside them) + optimizer {_size((blocks + rest) * moments)}",
        f"  between stages per step per device: {_mib(sent['forward'])} forward + "
        f"{_mib(sent['backward'])} backward ppermutes, {_mib(sent['gather'])} to gather the "
        f"last stage's output (activation {_size(act)} a device)"
        + (
            f", {_mib(reorder)} reordering the blocks' params and gradients into the circular "
            "schedule's chunks"
            if R > 1
            else ""
        ),
    ]


def format_report(run, compiled=None) -> str:
    """Mesh, rules, per-device param/optimizer bytes and (given the compiled step) collectives."""
    plan, state = run.plan, run.state
    params = per_device_bytes(state.params)
    full = sum(
        int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state.params)
    )
    lines = [
        f"mesh {dict(plan.mesh.shape)}, rules {plan.rules or 'dp (replicated params)'}",
        f"per device: params {_size(params)} of {_size(full)}, "
        f"optimizer state {_size(per_device_bytes(state.opt_state))}",
        *pipeline_lines(run),
    ]
    if compiled is not None:
        ops = collectives(compiled.as_text(), plan.mesh.size)
        sent = sent_bytes(ops)
        buffers = collective_bytes(compiled.as_text())
        detail = ", ".join(f"{k} {_mib(v)}" for k, v in sent.items() if v)
        lines.append(
            f"collectives per step per device: {_mib(sum(sent.values()))} sent "
            f"({detail or 'none'}; {len(ops)} ops, buffers {_mib(sum(buffers.values()))})"
        )
        sliced = sum(c.sliced * c.count for c in ops)
        if sliced:
            gpu = sum(sent_bytes(ops, as_gpu=True).values())
            lines.append(
                f"  of which {_mib(sliced)} of all-reduce buffers are only sliced per device: "
                f"reduce-scatters on GPU, {_mib(gpu)} sent there"
            )
        minimum = param_traffic(plan, state.params)
        why = ", ".join(f"{k} {_mib(v)}" for k, v in minimum.items() if v)
        extra = " + tensor-parallel activations" if plan.mesh.shape["tensor"] > 1 else ""
        lines.append(
            f"  textbook minimum: {_mib(sum(minimum.values()))} sent for the params "
            f"({why or 'none'}){extra}"
        )
    return "\n".join(lines)


# for a step that is only inspected, never run: LLVM's optimisations do not change the HLO, the
# collectives or the buffer sizes, and skipping them halves the compile time on a CPU
INSPECT_ONLY = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compile_step(run, compiler_options: dict | None = None):
    """The train step compiled ahead of time for the run's state and batch shapes."""
    batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=run.plan.batch),
        run.train_step.batch_spec,
    )
    with jax.set_mesh(run.plan.mesh):
        return run.train_step.fn.lower(run.state, batch).compile(compiler_options)


def dry_run(run) -> str:
    """The sharding table, the report and XLA's per-device memory analysis of the train step."""
    compiled = compile_step(run, INSPECT_ONLY)
    lines = [format_table(run.plan), format_report(run, compiled), *run.notes]
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
