"""Named device meshes and sharding plans from logical axis names.

    mesh = make_mesh(MeshConfig(data=2, fsdp=4))           # axes (data, fsdp, tensor)
    mesh = make_mesh(MeshConfig(stage=2, data=2, tensor=2))  # axes (stage, data, fsdp, tensor)
    plan = make_plan(abstract_model, abstract_state, mesh, "fsdp")
    graphdef, state = init_state(..., out_shardings=plan.state)

Params carry logical names (`embed`, `mlp`, `heads`, `kv`, `vocab`, `conv_in`, `conv_out`); a rule
table maps each name to a mesh axis (or None: replicated). Mesh axis names appear only here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
STAGE_AXIS = "stage"  # pipeline stages (jaxnv.parallel.pipeline); in the mesh only when > 1
BATCH_AXES = ("data", "fsdp")  # the batch is split over both: FSDP is data parallel too
LOGICAL_NAMES = ("embed", "mlp", "heads", "kv", "vocab", "conv_in", "conv_out", "layers")
# the stacked layers' axis ("layers") is split over `stage` whenever the mesh has that axis
STAGE_RULE = {"layers": STAGE_AXIS}

RULES: dict[str, dict[str, str | None]] = {
    # params replicated; only the batch is split
    "dp": {},
    # ZeRO-3: every param (hence its grads and optimizer moments) split over `fsdp` along one dim
    "fsdp": {"embed": "fsdp", "conv_out": "fsdp"},
    # Megatron: attention heads and the MLP hidden dim split over `tensor` (column- then
    # row-parallel), the vocabulary too
    "tp": {"mlp": "tensor", "heads": "tensor", "vocab": "tensor", "conv_out": "tensor"},
    "fsdp+tp": {
        "embed": "fsdp",
        "mlp": "tensor",
        "heads": "tensor",
        "vocab": "tensor",
        "conv_in": "fsdp",
        "conv_out": "tensor",
    },
}
# Params smaller than this may stay replicated under fsdp/tp without a warning.
LARGE_PARAM = 1 << 16


@dataclasses.dataclass
class MeshConfig:
    """Mesh axis sizes (one may be -1: "the rest of the devices") and the sharding rule preset."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: str = "dp"  # dp | fsdp | tp | fsdp+tp
    stage: int = 1  # pipeline stages (> 1: the transformer's blocks split over a `stage` axis)
    stage_repeats: int = 1  # > 1: the circular schedule, each stage holding this many chunks


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) sizes for `num_devices`, resolving one -1; one-line errors.

    With `cfg.stage` > 1 they cover the devices of one stage (`num_devices // stage`)."""
    stage = getattr(cfg, "stage", 1)
    if not isinstance(stage, int) or stage < 1:
        raise ValueError(f"mesh.stage={stage!r} must be an integer >= 1 (1: no pipeline)")
    repeats = getattr(cfg, "stage_repeats", 1)
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"mesh.stage_repeats={repeats!r} must be an integer >= 1 (1: GPipe)")
    if num_devices % stage:
        raise ValueError(
            f"mesh.stage={stage} does not divide the {num_devices} devices: choose a stage "
            f"count that divides {num_devices}"
        )
    num_devices //= stage
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise ValueError("only one of mesh.data, mesh.fsdp, mesh.tensor may be -1 (the rest)")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be >= 1 or -1, got data/fsdp/tensor={sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"mesh fixed sizes multiply to {known}, which does not divide {num_devices} "
                "devices: choose sizes whose product divides the device count"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh data*fsdp*tensor = {'*'.join(map(str, sizes))} = {math.prod(sizes)} but "
            f"{num_devices} devices are present: make the product {num_devices} "
            "(or set one axis to -1)"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), in an order that puts the
    inner axes (tensor, then fsdp) on the closest devices. With `cfg.stage` > 1 a `stage` axis
    comes first (outermost): stages exchange one activation per microbatch, the least traffic."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(cfg, len(devices))
    axes = MESH_AXES
    stage = getattr(cfg, "stage", 1)
    if stage > 1:
        shape, axes = (stage, *shape), (STAGE_AXIS, *MESH_AXES)
    return jax.make_mesh(shape, axes, (AxisType.Auto,) * len(axes), devices=devices)


def stage_count(mesh) -> int:
    """Pipeline stages of `mesh` (a Mesh or AbstractMesh; 1 when it has no `stage` axis)."""
    if mesh is None or getattr(mesh, "empty", False):
        return 1
    return dict(mesh.shape).get(STAGE_AXIS, 1)


def get_rules(rules: str | dict[str, str | None]) -> dict[str, str | None]:
    """A rule table from a preset name or a user dict (validated)."""
    if isinstance(rules, str):
        if rules not in RULES:
            close = difflib.get_close_matches(rules, list(RULES), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown mesh.rules {rules!r}: use one of {', '.join(RULES)}{hint}")
        return RULES[rules]
    for name, axis in rules.items():
        if axis is not None and axis not in MESH_AXES:
            raise ValueError(f"rule {name!r} -> {axis!r}: mesh axes are {', '.join(MESH_AXES)}")
    return dict(rules)


def path_names(path) -> tuple[str, ...]:
    """`("params", "hidden", "0", "kernel")` for a key path, whatever nodes (dict, dataclass,
    sequence) it crosses."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return tuple(out)


def logical_axes(abstract_model: nnx.Module) -> dict[tuple[str, ...], tuple]:
    """`{param path: logical names}` read from the params' sharding metadata."""
    specs = nnx.get_partition_spec(nnx.state(abstract_model, nnx.Param))
    flat = jax.tree_util.tree_leaves_with_path(
        nnx.to_pure_dict(specs), is_leaf=lambda x: isinstance(x, P)
    )
    return {path_names(path): tuple(spec) for path, spec in flat}


def spec_for(names: tuple, shape: tuple[int, ...], rules, mesh: Mesh, where: str) -> P:
    """The PartitionSpec for one param: rule-mapped names, dims that do not divide replicated."""
    axes = []
    for i, (dim, name) in enumerate(zip(shape, names, strict=True)):
        axis = rules.get(name) if name is not None else None
        if axis is not None and dim % mesh.shape[axis]:
            if axis == "tensor":  # a tensor-parallel layout that cannot hold is a mistake
                raise ValueError(
                    f"param {where} dim {i} ({name}={dim}) does not split over "
                    f"mesh.tensor={mesh.shape[axis]}: choose a tensor degree that divides it"
                )
            axis = None  # fsdp/data: keep an uneven dim whole (small params often are)
        axes.append(axis)
    used = [a for a in axes if a is not None]
    if len(used) != len(set(used)):
        raise ValueError(
            f"param {where} maps two of its logical axes {names} to the same mesh axis "
            f"{axes}: change the rule table so each mesh axis appears once per param"
        )
    return P(*axes)


@dataclasses.dataclass
class Plan:
    """Shardings for a train state and its batches, plus the per-param table."""

    mesh: Mesh
    rules: dict[str, str | None]
    state: Any  # TrainState-shaped tree of NamedSharding
    batch: NamedSharding
    replicated: NamedSharding
    table: list[tuple[str, tuple, tuple[int, ...], P]]  # (path, logical names, shape, spec)
    unnamed: list[str] = dataclasses.field(default_factory=list)  # params without logical names

    def unnamed_note(self) -> str | None:
        """One line about replicated params that carry no logical names (None if there are
        none, or the mesh is one device)."""
        if not self.unnamed or self.mesh.size == 1:
            return None
        shown = ", ".join(self.unnamed[:4]) + (", ..." if len(self.unnamed) > 4 else "")
        return (
            f"{len(self.unnamed)} params carry no logical axis names and are replicated ({shown}):"
            " to shard them, create them with nnx.with_partitioning(init, ('embed', 'mlp'))"
        )


def make_plan(abstract_model, abstract_state, mesh: Mesh, rules="dp") -> Plan:
    """Shardings for every leaf of `abstract_state` (a TrainState of ShapeDtypeStructs).

    Params follow the rules; optimizer moments shaped like a param share its sharding; every
    other leaf (step, rng, loss scale, counters) is replicated.
    """
    user_rules = not isinstance(rules, str)
    rules = get_rules(rules)
    names = logical_axes(abstract_model)
    used = {n for logical in names.values() for n in logical if n is not None}
    for n in sorted(used - set(LOGICAL_NAMES) - set(rules)):
        warnings.warn(f"logical axis name {n!r} has no rule and is not a known name", stacklevel=2)
    if user_rules:
        for n in sorted(set(rules) - used):
            warnings.warn(f"sharding rule {n!r} matches no parameter of this model", stacklevel=2)
    preset = rules  # what warns about replicated params: the stage rule splits only the stack
    if STAGE_AXIS in mesh.axis_names:
        rules = {**STAGE_RULE, **rules}
    replicated = NamedSharding(mesh, P())
    params = dict(
        (path_names(p), x) for p, x in jax.tree_util.tree_leaves_with_path(abstract_state.params)
    )
    specs, table, unnamed = {}, [], []
    for path, leaf in params.items():
        logical = names.get(path) or ()
        if len(logical) != len(leaf.shape):  # a plain NNX param: no names, replicated
            logical = (None,) * len(leaf.shape)
            unnamed.append("/".join(path))
        spec = spec_for(logical, leaf.shape, rules, mesh, "/".join(path))
        specs[path] = (tuple(leaf.shape), spec)
        table.append(("/".join(path), logical, tuple(leaf.shape), spec))
        if unnamed and unnamed[-1] == "/".join(path):
            continue  # reported once for all of them: Plan.unnamed_note
        if preset and not any(spec) and np.prod(leaf.shape) >= LARGE_PARAM:
            warnings.warn(
                f"param {'/'.join(path)} {tuple(leaf.shape)} stays replicated under the rules "
                f"{preset}: give it logical names or a rule",
                stacklevel=2,
            )

    def leaf_sharding(path, leaf):
        parts = path_names(path)
        for i in range(len(parts)):  # longest suffix that names a param of the same shape
            hit = specs.get(parts[i:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return NamedSharding(mesh, hit[1])
        return replicated

    state = jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)
    batch = NamedSharding(mesh, P(BATCH_AXES))
    return Plan(mesh, rules, state, batch, replicated, table, unnamed)


def batch_divisor(mesh: Mesh) -> int:
    """How many ways the batch is split (data x fsdp)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def put_batch(batch, sharding: NamedSharding):
    """A global batch array from this process's rows (its slice of the global batch)."""
    if jax.process_count() == 1:  # the rows are the whole batch; device_put is cheaper
        return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def format_table(plan: Plan) -> str:
    """The per-param sharding table, one line a param."""
    rows = [f"mesh {dict(plan.mesh.shape)}  rules {plan.rules or 'replicated (dp)'}"]
    for path, logical, shape, spec in plan.table:
        rows.append(f"  {path:40} {str(shape):18} {str(logical):28} {spec}")
    return "\n".join(rows)
