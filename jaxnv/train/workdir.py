"""A run's workdir: resume from its newest checkpoint or start it, and its JSON files."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxnv import config as config_lib
from jaxnv.checkpoint.manager import Checkpointer
from jaxnv.data.tokenizers import META_FILE, load_saved
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
    tokenizer = run.data.info.get("tokenizer") if run.data is not None else None
    if tokenizer is not None:
        keep_tokenizer(workdir, tokenizer)
    if ckpt is not None and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(run.state)  # onto shapes and shardings: one copy in memory
        start = int(jax.device_get(state.step))
        best.load(meta.get("best", {}))
        load_data_state(run.batches, meta.get("data"))  # a grain iterator's own position
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


def data_state(batches):
    """Where the training feed stands (a grain iterator's state), for the checkpoint; None for a
    feed that cannot say. With several processes each reads its own rows: every process's state
    is gathered (all processes save together) and stored as `{"per_process": [...]}`."""
    state = batches.state_dict() if hasattr(batches, "state_dict") else None
    if jax.process_count() == 1:
        return state
    return {"per_process": _allgather_json(state)}


def load_data_state(batches, saved) -> None:
    """Set the feed to the position `data_state` saved (this process's share)."""
    if saved is None or not hasattr(batches, "load_state_dict"):
        return
    if isinstance(saved, dict) and "per_process" in saved:
        states = saved["per_process"]
        if len(states) != jax.process_count():
            raise ValueError(
                f"the checkpoint's data stream was read by {len(states)} processes, this run has "
                f"{jax.process_count()}: resume a streaming run on the same process count (or "
                "prepare the data with `jaxnv data prepare` for step-indexed, elastic resume)"
            )
        saved = states[jax.process_index()]
    if saved is not None:
        batches.load_state_dict(saved)


def _allgather_json(obj) -> list:
    """`obj` of every process, in process order (a collective: every process must call it)."""
    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int64)))
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[: raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(buf))  # (processes, longest)
    return [json.loads(bytes(rows[p, : int(sizes[p, 0])]).decode()) for p in range(len(rows))]


def keep_tokenizer(workdir: str, tokenizer) -> None:
    """Save the run's tokenizer in `workdir/tokenizer` (what `generate` and `serve` read), or
    check that the one saved there is the same: a model is never continued on other ids."""
    path = os.path.join(workdir, "tokenizer")
    if os.path.exists(os.path.join(path, META_FILE)):
        saved = load_saved(path)
        if saved.fingerprint != tokenizer.fingerprint:
            raise ValueError(
                f"{workdir} was trained with another tokenizer ({saved.kind}, vocabulary "
                f"{saved.vocab_size}) than this data's ({tokenizer.kind}, {tokenizer.vocab_size}): "
                "use a new --workdir, or the data and tokenizer of that run"
            )
    elif is_primary():
        os.makedirs(workdir, exist_ok=True)
        tokenizer.save(path)
