"""Step-indexed batching on grain.

    batches = StepBatches(ds.train, batch_size=32, seed=0)
    batch = batches[step]          # a pure function of (data, seed, step)

The batch for step `s` depends only on the data, the seed and `s` (shuffled per epoch), so a
resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np

from jaxnv.data.sources import Arrays


class StepBatches:
    """Random-access training batches: `batches[step]` is the global batch for `step`.

    Examples are shuffled per epoch from (`seed`, epoch) with numpy's generator (one permutation
    an epoch, cheaper than random access to grain's per-element shuffle); a batch may straddle two
    epochs. Background threads (grain) prepare batches ahead of the loop. With
    `process_count > 1` each process materialises only its contiguous slice of the global batch
    (`local(step)`), and the slices of all processes concatenate to `batches[step]`.
    """

    holds_global = True  # batches[step] is the global batch; local(step) this process's rows

    # `iterate` prepares runs of consecutive steps together when batches are small: grain's
    # per-element cost and jax.device_put's per-call cost are paid once a chunk instead of once
    # a step (docs/performance.md). A chunk holds at most this many steps and bytes.
    chunk_steps: int = 16
    chunk_bytes: int = 1 << 20

    def __init__(
        self,
        arrays: Arrays,
        batch_size: int,
        seed: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ):
        sizes = {k: len(v) for k, v in arrays.items()}
        n = next(iter(sizes.values()))
        if len(set(sizes.values())) != 1:
            raise ValueError(f"data arrays differ in length {sizes}: give every array N rows")
        if batch_size % process_count:
            raise ValueError(
                f"train.batch_size={batch_size} does not split over {process_count} processes: "
                "use a multiple of the process count"
            )
        self.arrays = arrays
        self.batch_size = batch_size
        self.seed, self.num_examples = seed, n
        self.process_index, self.process_count = process_index, process_count
        self._epochs: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # the prefetch threads share the permutation cache

    def _permutation(self, epoch: int) -> np.ndarray:
        """The example order of `epoch`: a pure function of (seed, epoch), cached."""
        perm = self._epochs.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            with self._lock:
                while len(self._epochs) >= 4:
                    self._epochs.pop(min(self._epochs))
                self._epochs[epoch] = perm
        return perm

    def _positions(self, begin: int, end: int) -> np.ndarray:
        """Example indices at positions `begin, ..., end - 1` of the endless shuffled stream."""
        n = self.num_examples
        parts = []
        for epoch in range(begin // n, (end - 1) // n + 1):  # one or two epochs per batch
            lo, hi = max(begin, epoch * n) - epoch * n, min(end, (epoch + 1) * n) - epoch * n
            parts.append(self._permutation(epoch)[lo:hi])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def indices(self, step: int) -> np.ndarray:
        """Example indices of the global batch for `step` (batch_size,)."""
        b = self.batch_size
        return self._positions(int(step) * b, (int(step) + 1) * b)

    def _gather(self, idx: np.ndarray) -> Arrays:
        return {k: np.take(v, idx, axis=0) for k, v in self.arrays.items()}

    def __getitem__(self, step: int) -> Arrays:
        return self._gather(self.indices(step))  # (batch_size, ...) global batch

    resumable = True  # the batch of a step is a pure function of the step

    def sample(self) -> Arrays:
        """A batch of the stream's structure and shapes (step 0's)."""
        return self[0]

    def local(self, step: int) -> Arrays:
        """This process's rows of the global batch for `step`."""
        return self._local_run(step, step + 1)[0]

    def _local_run(self, start: int, stop: int) -> list[Arrays]:
        """`[local(s) for s in range(start, stop)]`, gathered at once (one take per array)."""
        b, k = self.batch_size, stop - start
        idx = self._positions(start * b, stop * b)  # (k * batch_size,)
        per = b // self.process_count
        if self.process_count > 1:  # this process's rows of each step: (k, per) -> (k * per,)
            lo = self.process_index * per
            idx = idx.reshape(k, b)[:, lo : lo + per].reshape(-1)
        rows = self._gather(idx)  # (k * per, ...); each step's batch is a contiguous view
        return [{key: v[i * per : (i + 1) * per] for key, v in rows.items()} for i in range(k)]

    def local_steps(self, start: int, n: int) -> Arrays:
        """This process's rows of steps `start, ..., start + n - 1` by one gather: the step's
        batch for n = 1, else the n batches stacked `(n, rows, ...)` (one compiled call's)."""
        b, per = self.batch_size, self.batch_size // self.process_count
        idx = self._positions(start * b, (start + n) * b).reshape(n, b)
        idx = idx[:, self.process_index * per : (self.process_index + 1) * per]  # (n, per)
        rows = self._gather(idx.reshape(-1))  # {key: (n * per, ...)}
        if n == 1:
            return rows
        return {key: v.reshape(n, per, *v.shape[1:]) for key, v in rows.items()}

    def _local_stack(self, start: int, stop: int) -> Arrays:
        """The batches of `_local_run(start, stop)` stacked on a last axis: `(per, ..., k)`."""
        b, k = self.batch_size, stop - start
        per = b // self.process_count
        idx = self._positions(start * b, stop * b).reshape(k, b)
        idx = idx[:, self.process_index * per : (self.process_index + 1) * per]
        return {
            key: np.moveaxis(np.take(v, idx.T, axis=0), 1, -1) for key, v in self.arrays.items()
        }

    def _steps_per_chunk(self) -> int:
        per = self.batch_size // self.process_count
        row = sum(v[:1].nbytes for v in self.arrays.values())
        return max(1, min(self.chunk_steps, self.chunk_bytes // max(1, per * row)))

    def iterate(self, start: int, stop: int, *, prefetch: int = 2, put=None) -> Iterator[Arrays]:
        """This process's batches for steps `start, ..., stop - 1`, prepared by `prefetch`
        background threads (grain) while the device runs earlier steps.

        `put` (e.g. a host-to-device copy) runs in those threads too. It must map a pytree of
        host arrays, batch axis first, to the same pytree placed (`jax.device_put`,
        `parallel.put_batch`); it may be given several batches at once (a list, or the batches
        stacked on a last axis, which the threads then split on the device), so that its
        per-call cost is shared.
        """
        if stop <= start:
            return iter(())
        k = min(self._steps_per_chunk(), stop - start)
        stacked = put is not None and k > 1 and jax.process_count() == 1

        def chunk(first: int) -> list:
            last = min(first + k, stop)
            if put is None:
                return self._local_run(first, last)
            if stacked and last - first == k:  # one copy per array, split on the device
                return _split_last_axis(put(self._local_stack(first, last)), k)
            return list(put(self._local_run(first, last)))

        chunks = grain.MapDataset.range(start, stop, k).map(chunk)
        if prefetch > 0:
            options = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=2 * prefetch)
            chunks = chunks.to_iter_dataset(options)
        return (batch for run in iter(chunks) for batch in run)


@functools.lru_cache(maxsize=32)
def _splitter(k: int, shardings: tuple) -> Any:
    """A compiled `leaves -> [[leaf[..., i] for leaf in leaves] for i in range(k)]`; each slice
    keeps its stack's sharding (the stacked axis is last, so no device gives up any rows)."""

    def split(leaves):
        return [[x[..., i] for x in leaves] for i in range(k)]

    return jax.jit(split, out_shardings=[list(shardings)] * k)


def _split_last_axis(tree, k: int) -> list:
    """`[tree[..., i] for i in range(k)]`, in one device computation for placed arrays."""
    leaves, treedef = jax.tree.flatten(tree)
    if all(isinstance(x, jax.Array) for x in leaves):
        parts = _splitter(k, tuple(x.sharding for x in leaves))(leaves)
    else:
        parts = [[x[..., i] for x in leaves] for i in range(k)]
    return [jax.tree.unflatten(treedef, p) for p in parts]


def eval_batches(arrays: Arrays, batch_size: int) -> Iterator[tuple[Arrays, int]]:
    """`(batch, n)` slices in order; the last may be partial (never dropped)."""
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in arrays.items()}
        yield batch, len(batch["x"]) if "x" in batch else len(next(iter(batch.values())))


class IndexedBatches:
    """Batches from a random-access source of batches (a grain `MapDataset` after `.batch()`, a
    list): the batch for step `s` is `source[s % len(source)]`, so a resume is exact."""

    resumable = True

    def __init__(self, source):
        if len(source) < 1:
            raise ValueError("the training data holds no batches: give it at least one")
        self.source = source

    def __getitem__(self, step: int):
        return self.source[int(step) % len(self.source)]

    def sample(self):
        return self[0]

    def iterate(self, start: int, stop: int, *, put=None) -> Iterator[Any]:
        put = put or (lambda b: b)
        return (put(self[s]) for s in range(start, stop))


class IterableBatches:
    """Batches from any iterable or iterator (a generator, a grain `IterDataset`, a
    `DataLoader`-like object); step `s` takes the next batch. A grain dataset's iterator state goes
    into the checkpoint (`state_dict` / `load_state_dict`), so its resume is exact. Any other
    iterable's position is not stored: a resume at step `s` either skips `s` batches of a fresh
    pass (`on_resume="skip"`) or is refused (`"refuse"`), never silently fed other data."""

    def __init__(self, source, on_resume: str = "refuse"):
        if on_resume not in ("skip", "refuse"):
            raise ValueError(f"on_resume={on_resume!r}: use 'skip' or 'refuse'")
        self.source, self.on_resume = source, on_resume
        # grain's IterDataset (or one of its iterators) can report and restore its position
        self.resumable = isinstance(source, grain.IterDataset) or hasattr(source, "set_state")
        self._it = None  # the live iterator and how many batches it has given
        self._pos = 0
        self._peeked: list = []

    def state_dict(self) -> dict | None:
        """The stream's position (grain's iterator state and the step), or None if unstored."""
        if not self.resumable or self._it is None or self._peeked:
            return None
        return {"iterator": self._it.get_state(), "position": self._pos}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position `state_dict` gave (a fresh iterator set to that state)."""
        self._it = iter(self.source)
        self._it.set_state(state["iterator"])
        self._pos, self._peeked = int(state["position"]), []

    def _fresh(self):
        it = iter(self.source)
        return None if it is self.source and self._it is not None else it

    def sample(self):
        """The first batch the data gives (kept, and yielded again at its step)."""
        if not self._peeked:
            if self._it is None:
                self._it, self._pos = iter(self.source), 0
            try:
                self._peeked.append(next(self._it))
            except StopIteration:
                raise ValueError("the training data yielded no batches") from None
        return self._peeked[0]

    def skip_to(self, step: int) -> None:
        """Fast-forward the stream so that the next batch is the one for `step`."""
        if step == self._pos:
            return
        if step < self._pos:
            fresh = self._fresh()
            if fresh is None:
                raise ValueError(
                    f"the training data is a one-shot iterator already past step {step}: pass a "
                    "re-iterable (a list, a grain dataset, a function's generator made anew)"
                )
            self._it, self._pos, self._peeked = fresh, 0, []
        while self._pos < step:
            self._next(step)

    def _next(self, step):
        if self._peeked:
            self._pos += 1
            return self._peeked.pop()
        try:
            batch = next(self._it)
        except StopIteration:
            raise ValueError(
                f"the training data ran out after {self._pos} batches, before step {step + 1}: "
                "give at least `steps` batches (repeat the data, e.g. itertools.cycle or "
                "grain's .repeat())"
            ) from None
        self._pos += 1
        return batch

    def iterate(self, start: int, stop: int, *, put=None) -> Iterator[Any]:
        put = put or (lambda b: b)
        if self._it is None:
            self._it, self._pos = iter(self.source), 0
        self.skip_to(start)
        for step in range(start, stop):
            yield put(self._next(step))
