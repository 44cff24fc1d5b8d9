"""Checkpoints on orbax: async saves every N steps, keep-N and best-K, atomic commits, strict
restores.

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=100, keep=3)
    ckpt.maybe_save(step, state, meta)          # returns at once; the write goes on behind
    state, meta = ckpt.restore(abstract_state)  # newest complete checkpoint, onto any sharding

    ckpt = Checkpointer(path, keep=2, keep_best=3, best_metric="loss", best_mode="min")
    ckpt.maybe_save(step, state, meta, metrics={"loss": 0.31})  # the eval metrics of that step
    state, meta = ckpt.restore(abstract_state, "best")          # lowest loss still on disk

A checkpoint holds the whole `TrainState` and a JSON `meta` item (config, jaxnv version, step);
for a LoRA run (`state.frozen`) the frozen base is left out: the checkpoint holds the adapters,
their optimizer state and a fingerprint of the base, and a restore takes the base from the target
(built from `model.init_from` or the model's seeded init) after checking its fingerprint.
orbax writes each step into a temporary directory and renames it when complete, so a half-written
checkpoint is never picked up. Arrays are written uncompressed by default (OCDBT, zarr): zstd saves
little on trained fp32 weights and moments and slows saves and restores (benchmarks/RESULTS.md,
checkpoint_async); `compress=True` turns it on. Either kind restores, since each
array's codec is stored with it.

Retention keeps the `keep` newest checkpoints plus the `keep_best` best by `best_metric` among
those saved with metrics; orbax stores a step's metrics beside it (`<step>/metrics`), so a new
Checkpointer on the same directory ranks the old steps too.

A restore that fails is one CheckpointError line saying what failed. Only missing, short or
undecodable files are called corrupt, with the step directory to remove and the older step that
then takes over; out of memory, devices, shardings or permissions say nothing against the files,
and their message never suggests removing anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxnv.checkpoint.failures import failure_kind, innermost, root_cause
from jaxnv.checkpoint.legacy import per_layer, restack, stacked_blocks
from jaxnv.core.precision import all_finite
from jaxnv.core.state import path_str, with_frozen, without_frozen
from jaxnv.parallel.mesh import path_names


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message names the fix."""


def _frozen_leaves(state) -> list[tuple[str, Any]]:
    """(path, leaf) of the frozen base in `state.model_state`."""
    keep = set(getattr(state, "frozen", ()))
    if not keep:
        return []
    leaves = jax.tree_util.tree_leaves_with_path(state.model_state)
    return [(path_str(p), x) for p, x in leaves if path_str(p) in keep]


def base_fingerprint(state) -> str | None:
    """A hash of the frozen base of a LoRA train state (None without one), the same on any mesh:
    two wrapping uint32 sums per leaf over its float32 bits (integer sums do not depend on the
    order a sharded reduction takes), one of them position-weighted, then sha256 with the paths,
    shapes and dtypes. One pass over the base on its devices; a few bytes reach the host."""
    if not getattr(state, "frozen", ()):
        return None
    leaves = _frozen_leaves(state)

    def sums(xs):
        out = []
        for x in xs:
            u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32).ravel()
            i = jnp.arange(u.size, dtype=jnp.uint32)
            out.append(jnp.stack([jnp.sum(u, dtype=jnp.uint32),
                                  jnp.sum(u * (2 * i + 1), dtype=jnp.uint32)]))  # fmt: skip
        return out

    values = jax.device_get(jax.jit(sums)([x for _, x in leaves]))
    digest = hashlib.sha256()
    for (path, x), v in zip(leaves, values, strict=True):
        digest.update(f"{path}:{tuple(x.shape)}:{np.dtype(x.dtype).name}:{v.tolist()};".encode())
    return digest.hexdigest()[:16]


def _flat(tree) -> dict[str, Any]:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {"/".join(path_names(p)): v for p, v in leaves if hasattr(v, "shape")}


def _mismatches(saved: Any, target: Any, limit: int = 3) -> list[str]:
    """Paths where the saved tree differs from the target in presence, shape or dtype; params
    first (the optimizer state follows from them), then `and N more`."""
    flat_saved, flat_target = _flat(getattr(saved, "tree", saved)), _flat(target)
    out, extra = [], 0
    keys = set(flat_saved) | set(flat_target)
    for key in sorted(keys, key=lambda k: (k.split("/")[0] != "params", k)):
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
        if len(out) > limit:
            out.pop()
            extra += 1
    if extra:
        out.append(f"and {extra} more")
    return out


class _QuietMissingMetrics(logging.Filter):
    """Drops orbax's warning for a save without metrics: steps without an evaluation are normal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Requested `tracked_metric`")


_ABSL_LOGGER = logging.getLogger("absl")
if not any(isinstance(f, _QuietMissingMetrics) for f in _ABSL_LOGGER.filters):
    _ABSL_LOGGER.addFilter(_QuietMissingMetrics())

STEP_NAMES = ("latest", "best")


@dataclasses.dataclass
class _AmongScored:
    """Applies `policy` to the checkpoints that have a score only; it preserves none of the rest."""

    policy: Any
    score: Any

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        scored = [i for i, c in enumerate(checkpoints) if self.score(c.metrics) is not None]
        flags = self.policy.should_preserve([checkpoints[i] for i in scored], context=context)
        out = [False] * len(checkpoints)
        for i, keep in zip(scored, flags, strict=True):
            out[i] = bool(keep)
        return out


class Checkpointer:
    """An orbax `CheckpointManager` for train states: every `every` steps (0: only when forced).

    Keeps the `keep` newest checkpoints plus the `keep_best` best by the eval metric `best_metric`
    (`best_mode` "min" or "max") among those saved with `metrics`; deletes the rest."""

    def __init__(
        self,
        directory: str,
        *,
        every: int = 0,
        keep: int = 3,
        async_save: bool = True,
        compress: bool = False,
        keep_best: int = 0,
        best_metric: str = "loss",
        best_mode: str = "min",
    ):
        if best_mode not in ("min", "max"):
            raise CheckpointError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        if keep_best < 0:
            raise CheckpointError(f"keep_best must be >= 0 (0: newest only), got {keep_best}")
        self.directory = os.path.abspath(directory)
        self.every = every
        self.keep_best = keep_best
        self.best_metric = best_metric
        self.best_mode = best_mode
        self._scores: dict[int, float | None] = {}
        cpm = ocp.checkpoint_managers
        policies = [cpm.LatestN(n=keep)]
        if keep_best:
            best = cpm.BestN(get_metric_fn=self._score, reverse=best_mode == "min", n=keep_best)
            policies.append(_AmongScored(best, self._score))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            create=True,
            preservation_policy=cpm.AnyPreservationPolicy(policies),
            best_fn=self._score,  # set so that orbax writes and reloads each step's metrics
            best_mode=best_mode,
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

    def _score(self, metrics: Any) -> float | None:
        """`best_metric` from a step's metrics (NaN ranks worst), or None when it has none."""
        if not isinstance(metrics, dict) or self.best_metric not in metrics:
            return None
        value = float(metrics[self.best_metric])
        if math.isnan(value):
            return math.inf if self.best_mode == "min" else -math.inf
        return value

    def _step_score(self, step: int) -> float | None:
        if step not in self._scores:
            self._scores[step] = self._score(self.manager.metrics(step))
        return self._scores[step]

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The retained step with the best `best_metric` (the newest among ties), or None."""
        sign = -1.0 if self.best_mode == "min" else 1.0
        scored = [
            (sign * score, s)
            for s in self.manager.all_steps()
            if (score := self._step_score(s)) is not None
        ]
        return max(scored)[1] if scored else None

    def maybe_save(
        self,
        step: int,
        state,
        meta: dict | Callable[[], dict],
        *,
        force: bool = False,
        metrics: dict[str, float] | None = None,
    ) -> bool:
        """Save `state` at `step` if it is a save step (or `force`); refuses non-finite params.
        `meta` (JSON values) may be a function, called only when the step is saved.

        `metrics` are that step's eval metrics (None: not evaluated); they rank it for `keep_best`
        and `restore(..., "best")`."""
        if not force and not (self.every and step % self.every == 0):
            return False
        if step in self.manager.all_steps():
            return False
        if metrics is not None:
            try:
                metrics = {str(k): float(jax.device_get(v)) for k, v in metrics.items()}
            except (TypeError, ValueError) as err:
                raise CheckpointError(
                    f"metrics for step {step} must map names to numbers ({err}): pass scalars"
                ) from None
            if self.keep_best and self.best_metric not in metrics:
                raise CheckpointError(
                    f"metrics for step {step} have no {self.best_metric!r} "
                    f"(they have {sorted(metrics)}): pass best_metric= one of them"
                )
        if not bool(jax.device_get(all_finite(state.params))):
            raise CheckpointError(
                f"params are not finite at step {step}: refusing to checkpoint them; the last "
                f"good checkpoint is step {self.latest_step()} (lower the learning rate or use "
                "loss scaling)"
            )
        meta = meta() if callable(meta) else meta
        if getattr(state, "frozen", ()):  # LoRA: the adapters only, and which base they belong to
            meta = {**meta, "frozen_base": base_fingerprint(state)}
            state = without_frozen(state)
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)),
            metrics=metrics,
        )
        self._scores[step] = self._score(metrics)
        return True

    def _resolve(self, step: int | str | None) -> int:
        """The step that `restore(..., step)` reads."""
        if isinstance(step, str):
            if step not in STEP_NAMES:
                raise CheckpointError(
                    f"unknown checkpoint step {step!r}: pass an int, 'latest' or 'best'"
                )
            if step == "best":
                best = self.best_step()
                if best is None and self.latest_step() is not None:
                    raise CheckpointError(
                        f"no checkpoint in {self.directory} was saved with a "
                        f"{self.best_metric!r} metric: pass metrics= to maybe_save, or restore "
                        "'latest'"
                    )
                step = best
            else:
                step = None
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}: train first")
        steps = self.manager.all_steps()
        if step not in steps:
            raise CheckpointError(
                f"no checkpoint step {step} in {self.directory}: the steps there are "
                f"{', '.join(map(str, sorted(steps)))}"
            )
        return step

    def restore(self, target, step: int | str | None = None) -> tuple[Any, dict]:
        """Restore onto `target` (a TrainState of arrays or `jax.ShapeDtypeStruct`s, which may carry
        shardings) from `step`: an int, "latest" (or None) or "best"; a structure, shape or dtype
        mismatch is a one-line CheckpointError, and so is a failed read (see `_restore_error`)."""
        step = self._resolve(step)
        full, target = target, without_frozen(target)
        if any(isinstance(x, jax.ShapeDtypeStruct) for _, x in _frozen_leaves(full)):
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} holds LoRA adapters without their "
                "base: restore onto a state whose base weights are arrays (build(exp) gives one)"
            )
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            target,
        )
        saved, metadata_missing, read_as = None, False, abstract
        try:
            saved = self.manager.item_metadata(step)["state"]
            metadata_missing = saved is None
            if saved is not None and stacked_blocks(abstract):
                layered = per_layer(abstract)  # a checkpoint from before the blocks were stacked
                if any("/blocks/0/" in f"/{k}/" for k in _flat(getattr(saved, "tree", saved))):
                    read_as = layered
            diffs = _mismatches(saved, read_as) if saved is not None else []
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
                        read_as, restore_args=ocp.checkpoint_utils.construct_restore_args(read_as)
                    ),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as err:  # noqa: BLE001 - orbax raises many types for corrupt data
            raise self._restore_error(step, err, metadata_missing) from err
        state = restored["state"]
        if read_as is not abstract:
            state = restack(state, abstract)
        meta = dict(restored["meta"])
        if getattr(full, "frozen", ()):
            saved, ours = meta.get("frozen_base"), base_fingerprint(full)
            if saved != ours:
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory} holds LoRA adapters trained on "
                    f"another base (fingerprint {saved}, this run's {ours}): resume with the "
                    "model.init_from, model and precision.policy it was trained with, or use a "
                    "new --workdir"
                )
        return with_frozen(state, full), meta

    def _restore_error(self, step: int, err: Exception, metadata_missing: bool) -> CheckpointError:
        """A one-line error for a failed restore of `step`: only missing, short or undecodable
        data is called corrupt and answered with the older step to fall back to; any other failure
        (memory, devices, shardings, the store) says what failed and leaves the files alone."""
        where = f"checkpoint step {step} in {self.directory}"
        kind = failure_kind(err, metadata_missing)
        cause = "the metadata of its state is missing" if metadata_missing else root_cause(err)
        if kind == "corrupt":
            older = [s for s in self.manager.all_steps() if s < step]
            fallback = f"step {max(older)}" if older else "none: training starts over"
            return CheckpointError(
                f"{where} cannot be read ({cause}): it may be corrupt; remove that step's "
                f"directory {os.path.join(self.directory, str(step))} to fall back to an older "
                f"one ({fallback})"
            )
        if kind == "memory":
            return CheckpointError(
                f"{where} could not be restored: out of memory ({cause}); this says nothing "
                "against the checkpoint, whose files are unchanged: free accelerator memory "
                "(other processes on the device) or spread the state over more devices (mesh.*), "
                "then run again"
            )
        return CheckpointError(
            f"{where} could not be restored ({type(innermost(err)).__name__}: {cause}); this is "
            "not a sign of a damaged checkpoint and its files are unchanged: fix the cause "
            "(devices, mesh, permissions) and run again (jaxnv --traceback shows the whole error)"
        )

    def wait(self) -> None:
        """Block until background saves have committed (raises their errors here)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
