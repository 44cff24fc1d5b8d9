"""The transformer's blocks, stored stacked, and the three ways to run them: unrolled, as a
rematerialised scan, and through a pipeline over the mesh's `stage` axis.

`stack_layers` turns L `Block`s into one whose params carry a leading (L,) axis named "layers"
(`LAYER_AXIS`); `layer(blocks, i)` gives block i back. The sharding plan splits that axis over
`stage` when the mesh has one, so each pipeline stage holds only its own layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnv.models.layers import Attention, FeedForward, Norm, dropout
from jaxnv.models.sharding import LAYER_AXIS

REMAT_POLICIES = {
    "none": None,
    "full": None,  # save nothing inside a block: recompute it all on the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep projections
}


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, D, *, norm, norm_eps, attn_kw, mlp_kw, dropout_rate, policy, rngs):
        self.dropout = dropout_rate
        self.attn_norm = Norm(D, kind=norm, eps=norm_eps, policy=policy)
        self.attn = Attention(D, **attn_kw, policy=policy, rngs=rngs)
        self.mlp_norm = Norm(D, kind=norm, eps=norm_eps, policy=policy)
        self.mlp = FeedForward(D, **mlp_kw, policy=policy, rngs=rngs)

    def __call__(self, x, positions, mask=None, rng=None, cache=None, index=None):
        rngs = (None, None) if rng is None else jax.random.split(rng)
        h, cache = self.attn(self.attn_norm(x), positions, mask, cache, index)  # (B, T, D)
        x = x + dropout(h, self.dropout, rngs[0])
        x = x + dropout(self.mlp(self.mlp_norm(x)), self.dropout, rngs[1])  # (B, T, D)
        return x, cache


def batch_sharded(x: jax.Array) -> jax.Array:
    """Constrain an activation to the batch layout of the mesh in context (if any): rows split
    over the batch axes, every other dim whole. Without it, XLA may choose to move activations
    instead of weights under fsdp."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not {"data", "fsdp"} <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(("data", "fsdp")))


def stack_layers(modules) -> nnx.Module:
    """One module of `modules`' structure whose variables hold theirs stacked on a leading
    `LAYER_AXIS` axis (L, ...): one array per param for all layers, which a scan runs over and
    the pipeline splits over its stages."""
    graphdef = nnx.graphdef(modules[0])
    states = [nnx.state(m) for m in modules]
    module = nnx.merge(graphdef, jax.tree.map(lambda *layers: jnp.stack(layers), *states))
    for _, var in nnx.iter_graph(module):
        names = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
        if names is not None:
            var.set_metadata(out_sharding=(LAYER_AXIS, *names))
    return module


def layer(blocks: nnx.Module, i: int) -> nnx.Module:
    """Layer i of the stacked `blocks` as a module of its own (its variables are slices, new
    arrays: writing to them does not change `blocks`)."""
    graphdef, state = nnx.split(blocks)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def num_stacked(blocks: nnx.Module) -> int:
    """L, the stacked layers in `blocks`."""
    return jax.tree.leaves(nnx.state(blocks, nnx.Param))[0].shape[0]


def _run_blocks(blocks, x, positions, mask, rng):
    """All blocks over x (B, T, D), unrolled: layer i's params sliced from the stack. RNG streams
    the layers advance (LoRA dropout) are written back to the stack."""
    graphdef, state = nnx.split(blocks)
    streams = []
    for i in range(num_stacked(blocks)):
        block = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
        block_rng = None if rng is None else jax.random.fold_in(rng, i + 1)
        x = batch_sharded(block(x, positions, mask, block_rng)[0])  # (B, T, D)
        streams.append(nnx.state(block, nnx.RngState))
    if jax.tree.leaves(streams[0]):
        nnx.update(blocks, jax.tree.map(lambda *layers: jnp.stack(layers), *streams))
    return x


def _run_blocks_remat(blocks, x, positions, mask, rng, remat: str):
    """All blocks over x (B, T, D), each under `jax.checkpoint` with the `remat` saving policy,
    as one `lax.scan` over the blocks' stacked params.

    The scan is what makes remat save memory: with the blocks unrolled, XLA is free to hoist
    every block's recomputation into the forward pass, where all of them are alive at once; under
    the scan, the backward of one block at a time needs its recomputed activations
    (docs/performance.md). Plain `jax.checkpoint` over the state: nothing is written back to the
    modules, so this also works on a model captured from outside the trace (where nnx.remat
    would refuse).
    """
    graphdef, stacked = nnx.split(blocks)  # (L, ...) leaves

    def run(state, x, rng):
        return nnx.merge(graphdef, state)(x, positions, mask, rng)[0]

    run = jax.checkpoint(run, policy=REMAT_POLICIES[remat], prevent_cse=False)

    def body(x, layer):
        i, state = layer
        block_rng = None if rng is None else jax.random.fold_in(rng, i + 1)
        return batch_sharded(run(state, x, block_rng)), None

    layers = jnp.arange(num_stacked(blocks), dtype=jnp.int32)
    return jax.lax.scan(body, x, (layers, stacked))[0]


def _stages_in_context(axis: str = "stage") -> int:
    """The size of the mesh-in-context's pipeline axis (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get(axis, 1)


def _run_blocks_pipelined(pipeline, blocks, x, positions, mask, rng, remat: str):
    """All blocks over x (B, T, D) through `pipeline` (a `jaxnv.parallel.Pipeline`), which
    splits the stacked params over the mesh's stage axis.

    Each microbatch gets the per-layer dropout key of the unpipelined run folded with its index
    (its rows are a strided slice of the batch, so its masks differ from the unpipelined ones;
    without dropout the result is the same up to float rounding).
    """
    if jax.tree.leaves(nnx.state(blocks, nnx.RngState)):
        raise ValueError(
            "lora.dropout needs mesh.stage=1: a pipeline stage cannot advance the adapters' "
            "dropout stream; set lora.dropout=0 or mesh.stage=1"
        )
    graphdef, stacked = nnx.split(blocks)  # (L, ...) leaves
    batched = {"mask": mask, "positions": positions if positions.ndim == 2 else None}
    shared = {"rng": rng, "positions": positions if positions.ndim == 1 else None}

    def run(state, x, positions, mask, rng):
        return nnx.merge(graphdef, state)(x, positions, mask, rng)[0]

    if remat != "none":
        run = jax.checkpoint(run, policy=REMAT_POLICIES[remat], prevent_cse=False)

    def layer_fn(state, x, batched, shared, layer, microbatch):
        rng = shared["rng"]
        if rng is not None:
            rng = jax.random.fold_in(jax.random.fold_in(rng, layer + 1), microbatch)
        positions = shared["positions"]
        positions = batched["positions"] if positions is None else positions
        return batch_sharded(run(state, x, positions, batched["mask"], rng))

    return pipeline(layer_fn, stacked, x, batched, shared)
