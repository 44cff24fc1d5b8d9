"""Checkpoints from before the transformer's blocks were stacked.

Until jaxnv 0.1 the blocks were a list, each layer's params under `blocks/<i>/...`; they are now
one array per param with a leading layer axis (`blocks/...`, (L, ...)). `Checkpointer.restore`
reads such a checkpoint layer by layer (`per_layer` gives the abstract target it is read onto)
and stacks it (`restack`), so runs started before the change resume exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _has_blocks(x) -> bool:
    return isinstance(x, dict) and "blocks" in x


def stacked_blocks(tree) -> bool:
    """Whether `tree` holds stacked blocks: a `blocks` subtree of arrays (no layer keys)."""
    found = []
    jax.tree.map(lambda x: found.append(x) if _has_blocks(x) else None, tree, is_leaf=_has_blocks)
    return any(not any(isinstance(k, int) for k in x["blocks"]) for x in found)


def _drop_leading(sharding):
    """`sharding` for one layer of a stacked array: the layer axis's entry left out."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec)[1:]
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    return sharding


def per_layer(tree):
    """`tree` (abstract) with each stacked `blocks` subtree as {i: layer i's subtree}."""

    def split(node):
        if not _has_blocks(node):
            return node
        blocks = node["blocks"]
        L = jax.tree.leaves(blocks)[0].shape[0]
        one = (
            lambda x: jax.ShapeDtypeStruct(  # noqa: E731
                x.shape[1:], x.dtype, sharding=_drop_leading(getattr(x, "sharding", None))
            )
        )
        return {**node, "blocks": {i: jax.tree.map(one, blocks) for i in range(L)}}

    return jax.tree.map(split, tree, is_leaf=_has_blocks)


def restack(tree, target):
    """The per-layer `tree` (arrays) with its `blocks` stacked again, placed like `target`."""

    def stack(node):
        if not _has_blocks(node):
            return node
        layers = [node["blocks"][i] for i in range(len(node["blocks"]))]
        return {**node, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}

    stacked = jax.tree.map(stack, tree, is_leaf=_has_blocks)
    return jax.tree.map(
        lambda x, t: jax.device_put(x, t.sharding) if getattr(t, "sharding", None) else x,
        stacked,
        target,
    )
