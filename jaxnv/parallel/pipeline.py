"""Pipeline parallelism: a model's stacked layers split over the mesh's `stage` axis.

    pipe = Pipeline(stages=4, microbatches=8)               # GPipe; repeats=R: circular
    y = pipe(layer_fn, stacked, x)       # inside jit, under a mesh with stage=4
    # layer_fn(params, x, batched, shared, layer, microbatch) -> x, one layer's params (no L axis)

The layers' params arrive stacked, (L, ...) leaves (the transformer stores its blocks that way,
the L axis named "layers", which the sharding plan splits over `stage`: stage s holds layers
s*L/S .. (s+1)*L/S - 1 and no others). Layer l runs on stage (l // K) % S, where
K = L / (S * R): GPipe (R = 1) gives stage s the layers s*L/S .. (s+1)*L/S - 1; the circular
schedule (R > 1) gives it R chunks of K layers, chunk r holding layers (r*S + s)*K .. +K-1, and
sends every microbatch round the ring of stages R times. GPipe therefore computes with the layers
each stage stores; the circular schedule reorders the stack to its chunks, which moves
(S-1)/S of the blocks' params between stages each step (and their gradients back).

The schedule runs inside `jax.shard_map`, manual over `stage` only (data, fsdp and tensor stay
automatic, so the layers' own shardings and collectives compose with it). The batch is cut into
M microbatches; at iteration t stage s works on item i = t - s (microbatch i % M, round i // M),
so a step is M*R + S - 1 iterations, of which S - 1 per stage are bubble: a theoretical bubble
fraction of (S - 1) / (M*R + S - 1). Between iterations each stage `ppermute`s its activation to
the next; the last stage's results reach every device with one `psum` at the end. The backward
pass is autodiff of this loop (ppermute transposes to the reverse ppermute). Bubble iterations
compute on zeros or on stale inputs and their results are never selected, so their cotangents
are exactly zero: the gradients equal the unpipelined ones up to float rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxnv.parallel.mesh import STAGE_AXIS, stage_count

LayerFn = Callable[..., jax.Array]  # (params, x, batched, shared, layer, microbatch) -> x
# the most layer bodies (iterations x layers per stage) an auto-unrolled schedule holds: the
# compilation grows with them (8 layers, M = 16 on the CPU: 14 s unrolled against 3 s looped)
UNROLL_LIMIT = 48


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """The idle share of a step in theory: (S - 1) / (M*R + S - 1)."""
    return (stages - 1) / (microbatches * repeats + stages - 1)


def check_pipeline(num_layers: int, stages: int, microbatches: int, repeats: int = 1) -> None:
    """One-line ValueErrors for a pipeline that cannot be built, each naming the fix."""
    if stages < 1 or repeats < 1 or microbatches < 0:
        raise ValueError(
            f"mesh.stage={stages}, mesh.stage_repeats={repeats} must be >= 1 and "
            f"train.pipeline_microbatches={microbatches} >= 0 (0: one per stage)"
        )
    if num_layers % (stages * repeats):
        what = "mesh.stage" + ("*mesh.stage_repeats" if repeats > 1 else "")
        raise ValueError(
            f"{what}={stages * repeats} does not divide model.num_layers={num_layers}: choose "
            f"stages (times repeats) that divide the {num_layers} layers"
        )
    m = microbatches or stages
    if repeats > 1 and m < stages:
        raise ValueError(
            f"the circular schedule (mesh.stage_repeats={repeats}) needs "
            f"train.pipeline_microbatches >= mesh.stage={stages}, got {m}: raise it to {stages}"
        )


def _microbatched(x: jax.Array, m: int) -> jax.Array:
    """(B, ...) -> (M, B/M, ...), row j in microbatch j % M: each device's rows stay its own
    when the batch is split over the data axes (a reshape and a transpose, no communication)."""
    return x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)


def _unmicrobatched(x: jax.Array) -> jax.Array:
    """(M, B/M, ...) -> (B, ...), the inverse of `_microbatched`."""
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A GPipe (repeats=1) or circular (repeats > 1) schedule over `stages` stages and
    `microbatches` microbatches a step (0: one per stage). Hashable: models keep it as static
    data. Called under a mesh whose `stage` axis has `stages` devices."""

    stages: int
    microbatches: int = 0
    repeats: int = 1
    axis: str = STAGE_AXIS
    pad: bool = False  # a batch M does not divide: False raises, True pads it with copies of
    # its first row (sliced off again; for eval's last partial batch)
    # the schedule's M*R + S - 1 iterations and each stage's K layers as straight-line code
    # rather than two nested scans: no loop-carried buffers, a faster step (benchmarks/RESULTS.md,
    # pipeline_parallel), for a compilation that grows with the layer bodies it holds. True
    # unrolls both, False neither; None (auto) the layers always, the iterations while they hold
    # at most UNROLL_LIMIT layer bodies
    unroll: bool | None = None

    @property
    def num_microbatches(self) -> int:
        return self.microbatches or self.stages

    @property
    def iterations(self) -> int:
        """Loop iterations a step: M*R + S - 1."""
        return self.num_microbatches * self.repeats + self.stages - 1

    @property
    def bubble(self) -> float:
        return bubble_fraction(self.stages, self.num_microbatches, self.repeats)

    def __call__(self, layer_fn: LayerFn, stacked: Any, x: jax.Array, batched: Any = None,
                 shared: Any = None) -> jax.Array:  # fmt: skip
        """All L layers over x (B, ...): `stacked` holds (L, ...) leaves, `batched` leaves with
        x's leading B (cut into microbatches with it), `shared` leaves every layer sees whole."""
        S, R, M = self.stages, self.repeats, self.num_microbatches
        L = jax.tree.leaves(stacked)[0].shape[0]
        check_pipeline(L, S, self.microbatches, R)
        B = x.shape[0]
        if B % M and not self.pad:
            raise ValueError(
                f"train.pipeline_microbatches={M} does not divide the batch of {B} rows: use a "
                f"batch size that is a multiple of {M} (or another microbatch count)"
            )
        if B % M:  # copies of a real row: finite, and their (zero) cotangents change nothing
            extra = M - B % M

            def grow(a):
                return jnp.concatenate([a, jnp.repeat(a[:1], extra, axis=0)])

            x, batched = grow(x), jax.tree.map(grow, batched)
        mesh = jax.sharding.get_abstract_mesh()
        if stage_count(mesh) != S:
            raise ValueError(
                f"the pipeline has {S} stages but the mesh in context has "
                f"{self.axis}={stage_count(mesh)}: set mesh.stage={S} (and run under jax.set_mesh)"
            )
        K = L // (S * R)
        # (L, ...) -> (R, S, K, ...): layer (r*S + s)*K + k sits at [r, s, k], split over the
        # stages on axis 1 (for GPipe, R = 1, exactly the stored split of L over `stage`)
        params = jax.tree.map(lambda p: p.reshape(R, S, K, *p.shape[1:]), stacked)
        xs = _microbatched(x, M)  # (M, B/M, ...)
        batched = jax.tree.map(lambda a: _microbatched(a, M), batched)
        body = self._per_stage(layer_fn, K)
        run = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(None, self.axis), P(), P(), P()),
            out_specs=P(),
            axis_names=frozenset({self.axis}),
        )
        return _unmicrobatched(run(params, xs, batched, shared))[:B]

    def _per_stage(self, layer_fn: LayerFn, K: int):
        """The per-stage program: params (R, 1, K, ...) (this stage's), microbatches
        (M, B/M, ...) whole."""
        S, R, M, axis = self.stages, self.repeats, self.num_microbatches, self.axis
        shift = [(s, s + 1) for s in range(S - 1)] + ([(S - 1, 0)] if R > 1 else [])

        def stage_fn(params, xs, batched, shared):
            s = jax.lax.axis_index(axis)
            params = jax.tree.map(lambda p: p[:, 0], params)  # (R, K, ...)
            # varying from here: the input's cotangent is then summed over stages once, after
            # the loop, not once per iteration
            xs = jax.lax.pcast(xs, (axis,), to="varying")

            def chunk(x, r, m):
                """This stage's K layers of round r over one microbatch x (B/M, ...)."""
                mine = jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, r, 0, False), params)
                aux = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, m, 0, False), batched)

                def layer(x, k_params):
                    k, p = k_params
                    return layer_fn(p, x, aux, shared, (r * S + s) * K + k, m), None

                ks = jnp.arange(K, dtype=jnp.int32)
                return jax.lax.scan(layer, x, (ks, mine), unroll=self.unroll is not False)[0]

            def step(carry, t):
                recv, buf, out = carry  # (B/M, ...), (M, B/M, ...), (M, B/M, ...)
                i = t - s  # this stage's item: microbatch i % M, round i // M
                m, r = i % M, jnp.clip(i // M, 0, R - 1)
                if R > 1:  # stage 0 keeps what the last stage finished at t-1 for its next round
                    j = t - S
                    keep = (s == 0) & (j >= 0)
                    buf = jax.lax.dynamic_update_index_in_dim(
                        buf, jnp.where(keep, recv, buf[j % M]), j % M, 0
                    )
                first = jax.lax.dynamic_index_in_dim(xs, m, 0, False)
                if R > 1:
                    again = jax.lax.dynamic_index_in_dim(buf, m, 0, False)
                    first = jnp.where(i < M, first, again)
                y = chunk(jnp.where(s == 0, first, recv), r, m)
                done = (s == S - 1) & (i >= (R - 1) * M) & (i < R * M)
                old = jax.lax.dynamic_index_in_dim(out, m, 0, False)
                out = jax.lax.dynamic_update_index_in_dim(out, jnp.where(done, y, old), m, 0)
                return (jax.lax.ppermute(y, axis, shift), buf, out), None

            def varying(a):
                return jax.lax.pcast(a, (axis,), to="varying")

            zero = varying(jnp.zeros(xs.shape[1:], xs.dtype))
            buf = varying(jnp.zeros(xs.shape if R > 1 else (1,), xs.dtype))
            out = varying(jnp.zeros(xs.shape, xs.dtype))
            steps = jnp.arange(self.iterations, dtype=jnp.int32)
            unroll = self.unroll if self.unroll is not None else self.iterations * K <= UNROLL_LIMIT
            out = jax.lax.scan(step, (zero, buf, out), steps, unroll=unroll)[0][2]
            # only the last stage's buffer holds results: adding zeros from the others is exact
            return jax.lax.psum(jnp.where(s == S - 1, out, jnp.zeros_like(out)), axis)

        return stage_fn


def attach_pipeline(model, cfg):
    """`model` with the pipeline of `cfg` (mesh.stage, mesh.stage_repeats,
    train.pipeline_microbatches) when mesh.stage > 1; one-line errors for what cannot split."""
    S, R = cfg.mesh.stage, cfg.mesh.stage_repeats
    M, batch = cfg.train.pipeline_microbatches, cfg.train.batch_size
    if S <= 1:
        if R > 1:
            raise ValueError(
                f"mesh.stage_repeats={R} needs pipeline stages: set mesh.stage > 1 (or repeats 1)"
            )
        return model
    if not hasattr(model, "pipeline") or not hasattr(model, "num_layers"):
        raise ValueError(
            f"mesh.stage={S} pipelines the transformer's blocks, and {type(model).__name__} has "
            "none: set mesh.stage=1"
        )
    check_pipeline(model.num_layers, S, M, R)
    if batch % (M or S):
        raise ValueError(
            f"train.pipeline_microbatches={M or S} does not divide train.batch_size={batch}: "
            f"use a batch size that is a multiple of {M or S} (or another microbatch count)"
        )
    model.pipeline = Pipeline(S, M, R, pad=True)
    return model


def stage_bytes(activation_bytes: int, stages: int, microbatches: int, repeats: int = 1) -> dict:
    """Bytes one device sends to the next stage per train step, in theory, for an activation
    (the whole batch's residual stream on this device) of `activation_bytes`:

    - `forward`: one microbatch (activation / M) per iteration, M*R + S - 1 iterations;
    - `backward`: the same again, cotangents sent the other way;
    - `gather`: the psum that brings the last stage's output (B rows) to every stage, and its
      transpose in the backward pass: an all-reduce over S devices each way, 2(S-1)/S x buffer.
    """
    if stages <= 1:
        return {"forward": 0.0, "backward": 0.0, "gather": 0.0}
    iters = microbatches * repeats + stages - 1
    shift = iters * activation_bytes / microbatches
    gather = 2 * 2 * (stages - 1) / stages * activation_bytes
    return {"forward": shift, "backward": shift, "gather": gather}


__all__ = ["Pipeline", "attach_pipeline", "bubble_fraction", "check_pipeline", "stage_bytes"]
