"""Checkpoints on orbax: async saves every N steps, keep-N, atomic commits, strict restores.

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=100, keep=3)
    ckpt.maybe_save(step, state, meta)          # returns at once; the write goes on behind
    state, meta = ckpt.restore(abstract_state)  # newest complete checkpoint, onto any sharding

A checkpoint holds the whole `TrainState` and a JSON `meta` item (config, jaxnv version, step).
orbax writes each step into a temporary directory and renames it when complete, so a half-written
checkpoint is never picked up. Arrays are written uncompressed by default (OCDBT, zarr): zstd saves
little on trained fp32 weights and moments and slows saves and restores (benchmarks/RESULTS.md,
checkpoint_async); `compress=True` turns it on. Either kind restores, since each
array's codec is stored with it.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxnv.core.precision import all_finite
from jaxnv.parallel.mesh import path_names


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the fix."""


def _flat(tree) -> dict[str, Any]:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {"/".join(path_names(p)): v for p, v in leaves if hasattr(v, "shape")}


def _mismatches(saved: Any, target: Any, limit: int = 3) -> list[str]:
    """Paths where the saved tree differs from the target in presence, shape or dtype."""
    flat_saved, flat_target = _flat(getattr(saved, "tree", saved)), _flat(target)
    out = []
    for key in sorted(set(flat_saved) | set(flat_target)):
        s, t = flat_saved.get(key), flat_target.get(key)
        if s is None or t is None:
            out.append(
                f"{key} {'missing from the checkpoint' if s is None else 'not in the model'}"
            )
        elif tuple(s.shape) != tuple(t.shape) or np.dtype(s.dtype) != np.dtype(t.dtype):
            out.append(
                f"{key} saved {tuple(s.shape)} {np.dtype(s.dtype).name}, "
                f"model has {tuple(t.shape)} {np.dtype(t.dtype).name}"
            )
        if len(out) >= limit:
            break
    return out


def _root_cause(err: BaseException) -> str:
    """The first line of the innermost exception with a message: orbax wraps tensorstore's
    precise one ("OUT_OF_RANGE: Error reading ... ") in a generic one that prints a repr."""
    best, seen = err, set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if str(err).strip():
            best = err
        err = err.__cause__ or err.__context__
    text = str(best).strip()
    return text.splitlines()[0][:300] if text else type(best).__name__


class Checkpointer:
    """An orbax `CheckpointManager` for train states: every `every` steps (0: only when forced)."""

    def __init__(
        self,
        directory: str,
        *,
        every: int = 0,
        keep: int = 3,
        async_save: bool = True,
        compress: bool = False,
    ):
        self.directory = os.path.abspath(directory)
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        try:
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=options,
                item_handlers={
                    # StandardCheckpointHandler is this handler with compression always on
                    "state": ocp.PyTreeCheckpointHandler(use_compression=compress),
                    "meta": ocp.JsonCheckpointHandler(),
                },
            )
        except OSError as err:  # a file in the way, no permission, a read-only filesystem
            raise CheckpointError(
                f"cannot create the checkpoint directory {self.directory} "
                f"({err.strerror or type(err).__name__}: {err.filename or self.directory}): "
                "pass a --workdir that is a directory you can write to"
            ) from None

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def maybe_save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        """Save `state` at `step` if it is a save step (or `force`); refuses non-finite params."""
        if not force and not (self.every and step % self.every == 0):
            return False
        if step in self.manager.all_steps():
            return False
        if not bool(jax.device_get(all_finite(state.params))):
            raise CheckpointError(
                f"params are not finite at step {step}: refusing to checkpoint them; the last "
                f"good checkpoint is step {self.latest_step()} (lower the learning rate or use "
                "loss scaling)"
            )
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)),
        )
        return True

    def restore(self, target, step: int | None = None) -> tuple[Any, dict]:
        """Restore onto `target` (a TrainState of arrays or `jax.ShapeDtypeStruct`s, which may carry
        shardings); a structure, shape or dtype mismatch is a one-line CheckpointError."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}: train first")
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            target,
        )
        try:
            saved = self.manager.item_metadata(step)["state"]
            diffs = _mismatches(saved, abstract) if saved is not None else []
        except Exception:  # noqa: BLE001 - metadata is a best-effort pre-check
            diffs = []
        if diffs:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not match this model: "
                + "; ".join(diffs)
                + " -- use the config it was trained with, or a new --workdir"
            )
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)
                    ),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as err:  # noqa: BLE001 - orbax raises many types for corrupt data
            older = [s for s in self.manager.all_steps() if s < step]
            fallback = f"step {max(older)}" if older else "none: training starts over"
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} cannot be read ({_root_cause(err)}): "
                f"it may be corrupt; remove that step's directory "
                f"{os.path.join(self.directory, str(step))} to fall back to an older one "
                f"({fallback})"
            ) from None
        return restored["state"], dict(restored["meta"])

    def wait(self) -> None:
        """Block until background saves have committed (raises their errors here)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
