"""Parallelism: the named mesh and logical-axis rules (`mesh`), explicit-collective steps
(`shardmap`), multi-process start-up (`distributed`) and the sharding/memory report (`report`)."""

from jaxnv.parallel.mesh import (
    BATCH_AXES,
    LOGICAL_NAMES,
    MESH_AXES,
    RULES,
    MeshConfig,
    Plan,
    batch_divisor,
    format_table,
    get_rules,
    logical_axes,
    make_mesh,
    make_plan,
    mesh_shape,
    path_names,
    put_batch,
    spec_for,
)

__all__ = [
    "BATCH_AXES",
    "LOGICAL_NAMES",
    "MESH_AXES",
    "RULES",
    "MeshConfig",
    "Plan",
    "batch_divisor",
    "format_table",
    "get_rules",
    "logical_axes",
    "make_mesh",
    "make_plan",
    "mesh_shape",
    "path_names",
    "put_batch",
    "spec_for",
]
