"""A run's workdir: resume from its newest checkpoint or start it, and its JSON files."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING

import jax

from jaxnv import config as config_lib
from jaxnv.checkpoint.manager import Checkpointer
from jaxnv.parallel.distributed import is_primary

if TYPE_CHECKING:  # annotations only: the loop imports this module
    from jaxnv.train.loop import Run


def resume_or_init(run: Run, workdir: str | None, ckpt: Checkpointer | None, best):
    """`(state, start, meta)`: the newest checkpoint restored onto the run's (abstract) state, or
    a fresh state. Creates the workdir; the log of a run stopped before its first checkpoint is
    moved aside (never overwritten) and the run starts again. On resume, `metrics.jsonl` rows
    after the checkpoint's step are dropped so the log continues without duplicates.
    """
    if workdir is None:
        return (run.init() if is_abstract(run.state) else run.state), 0, {}
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if ckpt is not None and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(run.state)  # onto shapes and shardings: one copy in memory
        start = int(jax.device_get(state.step))
        best.load(meta.get("best", {}))
        if meta.get("data") is not None and hasattr(run.batches, "load_state_dict"):
            run.batches.load_state_dict(meta["data"])  # a grain iterator's own position
        if start and not run.batches.resumable:
            if run.batches.on_resume == "refuse":
                raise ValueError(
                    f"cannot resume {workdir!r} at step {start}: the training data is an iterable "
                    "whose position is not stored; pass on_resume='skip' to fast-forward a fresh "
                    "pass over it, or a list / grain MapDataset of batches for an exact resume"
                )
            if is_primary():
                print(f"resuming at step {start}: skipping {start} batches of the data", flush=True)
        if is_primary():  # config.json describes the latest run of this workdir
            write_json(os.path.join(workdir, "config.json"), config_lib.to_dict(run.cfg))
        if os.path.exists(metrics_path) and is_primary():
            with open(metrics_path, encoding="utf-8") as f:
                keep = [line for line in f if json.loads(line)["step"] <= start]
            tmp = metrics_path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(keep)
            os.replace(tmp, metrics_path)  # atomic: the old log is never half-written
        return state, start, meta
    if os.path.exists(metrics_path) and os.path.getsize(metrics_path) > 0 and is_primary():
        # a run stopped before its first checkpoint: start again, its log kept beside
        aside = f"{metrics_path}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(metrics_path, aside)
        print(
            f"jaxnv: {workdir} holds a run stopped before its first checkpoint: starting again "
            f"(its log moved to {os.path.basename(aside)})",
            flush=True,
        )
    os.makedirs(workdir, exist_ok=True)
    if is_primary():
        write_json(os.path.join(workdir, "config.json"), config_lib.to_dict(run.cfg))
    return (run.init() if is_abstract(run.state) else run.state), 0, {}


def write_json(path: str, data) -> None:
    """Write `data` to `path` atomically (a reader sees the old file or the new one)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=float)
    os.replace(tmp, path)


def is_abstract(state) -> bool:
    return isinstance(jax.tree.leaves(state)[0], jax.ShapeDtypeStruct)
