"""Language-model batches from a prepared token corpus or a nanoGPT token file, step-indexed.

    corpus = PreparedCorpus("data/prepared")             # written by `jaxnv data prepare`
    train_ids, eval_ids = corpus.split(0.01, seed=0)
    batches = WindowBatches(corpus, train_ids, seq_len=1024, batch_size=32, seed=0)
    batch = batches[step]                                  # {"x": (B, T), "y": (B, T)} int32

Every class here follows `StepBatches`' contract: `batches[step]` is the global batch of `step`, a
pure function of (data, seed, step), so a resumed run sees exactly the batches it would have seen;
`local(step)` is this process's rows; `iterate` prefetches in grain threads. Batches read only the
records they need, never the whole corpus.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jaxnv.data.packing import first_fit, lm_batch, pack_rows, split_pieces
from jaxnv.data.pipeline import StepBatches
from jaxnv.data.prepare import open_shards

FORMAT = "jaxnv-tokens/1"


class PreparedCorpus:
    """A directory written by `jaxnv data prepare`: documents of token ids, random access.

    `lengths` (N,) int64 tokens a document; `doc(i)` the ids of document `i` (no eos appended).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        # open_shards checks the manifest and that every shard holds its records (not truncated)
        manifest, self.source = open_shards(self.directory)
        if manifest.get("format") != FORMAT:
            raise ValueError(
                f"{self.directory} holds a {manifest.get('format')!r} preparation, not {FORMAT}: "
                "prepare the corpus again with this version of jaxnv"
            )
        self.manifest = manifest
        self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        self.eos_id = int(manifest["tokenizer"]["eos_id"])
        self.vocab_size = int(manifest["tokenizer"]["vocab_size"])
        self.lengths = np.load(self.directory / "lengths.npy", allow_pickle=False).astype(np.int64)
        if len(self.lengths) != manifest["documents"]:
            raise ValueError(
                f"{self.directory}/lengths.npy holds {len(self.lengths)} documents, the manifest "
                f"{manifest['documents']}: prepare the corpus again"
            )

    def __len__(self) -> int:
        return len(self.lengths)

    def doc(self, i: int) -> np.ndarray:
        """The token ids of document `i` (L,)."""
        return np.frombuffer(self.source[int(i)], dtype=self.dtype)

    def docs(self, ids) -> list[np.ndarray]:
        """The token ids of documents `ids`, read in one call."""
        ids = [int(i) for i in ids]
        if not ids:
            return []
        return [np.frombuffer(r, dtype=self.dtype) for r in self.source.__getitems__(ids)]

    def split(self, eval_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Hold out whole documents: `(train_ids, eval_ids)`, sorted.

        Document `i` goes to eval when a hash of (`seed`, `i`) falls under `eval_fraction`, so the
        split does not move when documents are appended. At least one document is held out when
        the fraction is positive.
        """
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"eval_fraction={eval_fraction}: use a fraction in [0, 1)")
        u = _unit_hash(np.arange(len(self), dtype=np.uint64), seed)
        held = u < eval_fraction
        if eval_fraction > 0 and not held.any() and len(self):
            held[int(u.argmin())] = True
        if len(self) and held.all():
            raise ValueError(
                f"eval_fraction={eval_fraction} leaves no training document of {len(self)}: "
                "lower it or prepare more documents"
            )
        ids = np.arange(len(self), dtype=np.int64)
        return ids[~held], ids[held]


def _unit_hash(x: np.ndarray, seed: int) -> np.ndarray:
    """A uniform float in [0, 1) per uint64 of `x`, from (seed, x) by splitmix64."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class _ComputedBatches(StepBatches):
    """`StepBatches` whose examples are computed by `_gather(idx)` instead of taken from arrays.

    Subclasses set `num_examples` (the length of one epoch) and define `_gather`; the shuffled
    positions, the per-process slices and the prefetching `iterate` are StepBatches' own (this
    class leans on its `_positions` / `_local_run` internals and sets no `arrays`; the tests of
    `local`, `iterate` and the stacked `put` path in tests/test_lm_data.py guard that).
    """

    holds_global = True

    def _setup(self, batch_size, seed, num_examples, process_index, process_count):
        if batch_size % process_count:
            raise ValueError(
                f"train.batch_size={batch_size} does not split over {process_count} processes: "
                "use a multiple of the process count"
            )
        self.batch_size, self.seed, self.num_examples = batch_size, seed, num_examples
        self.process_index, self.process_count = process_index, process_count
        self._epochs: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def _gather(self, idx: np.ndarray) -> dict:
        raise NotImplementedError

    def _local_stack(self, start: int, stop: int) -> dict:
        runs = self._local_run(start, stop)
        return {k: np.stack([r[k] for r in runs], axis=-1) for k in runs[0]}

    def _steps_per_chunk(self) -> int:
        per = self.batch_size // self.process_count
        row = sum(v[:1].nbytes for v in self._gather(np.zeros(1, np.int64)).values())
        return max(1, min(self.chunk_steps, self.chunk_bytes // max(1, per * row)))


def _check_sizes(seq_len: int, batch_size: int) -> None:
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len={seq_len}, batch_size={batch_size}: both must be at least 1")


class WindowBatches(_ComputedBatches):
    """Pretraining windows: the documents `doc_ids` concatenated in order with eos after each,
    cut into non-overlapping windows of `seq_len + 1` tokens (x = w[:-1], y = w[1:]); windows are
    shuffled per epoch from (`seed`, epoch). The tail shorter than a window is dropped."""

    def __init__(
        self,
        corpus: PreparedCorpus,
        doc_ids,
        seq_len: int,
        batch_size: int,
        seed: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ):
        _check_sizes(seq_len, batch_size)
        self.corpus, self.seq_len = corpus, seq_len
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        # ends[j]: offset in the concatenation just past document j's eos
        self._ends = np.cumsum(corpus.lengths[self.doc_ids] + 1)
        total = int(self._ends[-1]) if len(self._ends) else 0
        windows = total // (seq_len + 1)
        if windows < 1:
            raise ValueError(
                f"the documents hold {total} tokens, fewer than one window of seq_len + 1 = "
                f"{seq_len + 1}: lower model.seq_len or add documents"
            )
        self._setup(batch_size, seed, windows, process_index, process_count)

    def _window_tokens(self, windows: np.ndarray) -> np.ndarray:
        """Tokens of windows `windows` (n, seq_len + 1), reading only the documents they cover."""
        span = self.seq_len + 1
        out = np.empty((len(windows), span), dtype=np.int32)
        starts = np.asarray(windows, dtype=np.int64) * span
        first = np.searchsorted(self._ends, starts, side="right")  # doc holding the first token
        last = np.searchsorted(self._ends, starts + span - 1, side="right")
        needed = np.unique(
            np.concatenate([np.arange(a, b + 1) for a, b in zip(first, last, strict=True)])
        )
        eos = np.array([self.corpus.eos_id], dtype=self.corpus.dtype)
        docs = {  # document j of the concatenation, with its eos
            j: np.concatenate([d, eos])
            for j, d in zip(needed.tolist(), self.corpus.docs(self.doc_ids[needed]), strict=True)
        }
        ends = self._ends.tolist()
        for row, (s, a, b) in enumerate(
            zip(starts.tolist(), first.tolist(), last.tolist(), strict=True)
        ):
            at = 0
            for j in range(a, b + 1):  # copy the part of each document inside the window
                lo = s + at - (ends[j - 1] if j else 0)
                part = docs[j][lo : lo + span - at]
                out[row, at : at + len(part)] = part
                at += len(part)
        return out

    def _gather(self, idx: np.ndarray) -> dict:
        w = self._window_tokens(idx)  # (n, T + 1)
        return {"x": w[:, :-1], "y": w[:, 1:]}

    def eval_batches(self, batch_size: int) -> Iterator[tuple[dict, int]]:
        """Every window in order, `(batch, real_rows)`; the last batch may be partial."""
        for start in range(0, self.num_examples, batch_size):
            idx = np.arange(start, min(start + batch_size, self.num_examples))
            yield self._gather(idx), len(idx)


class PackedBatches(_ComputedBatches):
    """Documents (eos appended; longer ones split into pieces of at most `seq_len + 1` tokens)
    packed first-fit into rows of `seq_len + 1`, in an order shuffled per epoch from (`seed`,
    epoch). Batches carry `x`, `y`, `segment_ids`, `positions` (B, T) int32 and `weights` (B, T)
    float32 (see `packing.lm_batch`).

    grain's `FirstFitPackIterDataset` packs a stream: row `r` of an epoch is known only after
    packing every row before it, and its state is an iterator position. A step-indexed batch must
    be computable for any step on its own, so the plan of an epoch is computed here in numpy from
    the lengths alone (no token is read), cached, and each batch reads only its rows' documents.
    Epochs hold different numbers of rows, so step `s` needs the row counts of the epochs before
    it: a resume in epoch `e` plans epochs 0..e once (seconds per million documents).
    """

    def __init__(
        self,
        corpus: PreparedCorpus,
        doc_ids,
        seq_len: int,
        batch_size: int,
        seed: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
        open_rows: int = 64,
    ):
        _check_sizes(seq_len, batch_size)
        self.corpus, self.seq_len, self.open_rows = corpus, seq_len, open_rows
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        lengths = corpus.lengths[self.doc_ids] + 1  # + eos
        self._doc, self._start, self._len = split_pieces(lengths, seq_len + 1)
        if len(self._doc) == 0:
            raise ValueError("no documents to pack: give at least one document")
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._row_counts: list[int] = []  # rows of epochs 0, 1, ... planned so far
        self._setup(batch_size, seed, len(self._doc), process_index, process_count)

    def _plan(self, epoch: int | None) -> tuple[np.ndarray, np.ndarray]:
        """`(pieces, bounds)` of `epoch` (None: unshuffled, for evaluation); row `r` holds
        pieces `pieces[bounds[r]:bounds[r + 1]]`."""
        plan = self._plans.get(epoch)
        if plan is None:
            if epoch is None:
                order = np.arange(len(self._doc))
            else:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self._doc))
            rows, bounds = first_fit(self._len[order], self.seq_len + 1, self.open_rows)
            plan = (order[rows], bounds)
            with self._lock:
                while len(self._plans) >= 4:
                    self._plans.pop(next(iter(self._plans)))
                self._plans[epoch] = plan
        return plan

    def plan(self, epoch: int | None) -> list[list[tuple[int, int, int]]]:
        """The rows of `epoch` (None: the unshuffled evaluation rows), each a list of pieces
        `(document id, start, length)` over the document with its eos appended."""
        order, bounds = self._plan(epoch)
        doc, start, length = self.doc_ids[self._doc[order]], self._start[order], self._len[order]
        triples = list(zip(doc.tolist(), start.tolist(), length.tolist(), strict=True))
        return [triples[bounds[r] : bounds[r + 1]] for r in range(len(bounds) - 1)]

    def _epoch_of(self, position: int) -> tuple[int, int]:
        """The (epoch, row) of row `position` of the endless stream of rows."""
        epoch, begin = 0, 0
        while True:
            with self._lock:
                known = epoch < len(self._row_counts)
                rows = self._row_counts[epoch] if known else None
            if rows is None:
                rows = len(self._plan(epoch)[1]) - 1
                with self._lock:
                    if epoch == len(self._row_counts):
                        self._row_counts.append(rows)
            if position < begin + rows:
                return epoch, position - begin
            epoch, begin = epoch + 1, begin + rows

    def _positions(self, begin: int, end: int) -> np.ndarray:
        return np.arange(begin, end, dtype=np.int64)  # rows are planned, not permuted

    def _rows(self, rows: list[tuple[int | None, int]]) -> dict:
        """Packed batch of rows given as (epoch, row-in-epoch)."""
        pieces = []
        for epoch, r in rows:
            order, bounds = self._plan(epoch)
            pieces.append(order[bounds[r] : bounds[r + 1]])
        needed = np.unique(np.concatenate(pieces))
        docs = np.unique(self._doc[needed])
        tokens = dict(zip(docs.tolist(), self.corpus.docs(self.doc_ids[docs]), strict=True))
        eos = np.array([self.corpus.eos_id], dtype=np.int32)

        def piece(p: int) -> np.ndarray:
            d, s = int(self._doc[p]), int(self._start[p])
            full = np.concatenate([tokens[d], eos])  # the document and its eos
            return full[s : s + int(self._len[p])]

        packed = pack_rows([[piece(p) for p in row] for row in pieces], self.seq_len + 1)
        return lm_batch(**packed)

    def _gather(self, idx: np.ndarray) -> dict:
        return self._rows([self._epoch_of(int(p)) for p in idx])

    def eval_batches(self, batch_size: int) -> Iterator[tuple[dict, int]]:
        """Every row of the unshuffled plan in order, `(batch, real_rows)`; the last batch may
        be partial."""
        n = len(self._plan(None)[1]) - 1
        for start in range(0, n, batch_size):
            rows = [(None, r) for r in range(start, min(start + batch_size, n))]
            yield self._rows(rows), len(rows)


def _max_id(path: Path, dtype: np.dtype, chunk_bytes: int = 1 << 25) -> int:
    """The largest id of a flat token file, read in chunks into one buffer (never whole, and
    not mapped: the pages of a scan would stay resident)."""
    buf = np.empty(chunk_bytes // dtype.itemsize, dtype)
    top = -1
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            top = max(top, int(buf[: n // dtype.itemsize].max()))
    return top


class TokenFileBatches(_ComputedBatches):
    """Random windows of a nanoGPT token file (a flat array of `dtype` ids, no header), read
    through `np.memmap` (never whole). The offsets of step `s` are drawn from (`seed`, `s`).
    `max_id` is the file's largest id, scanned once when it is opened."""

    def __init__(
        self,
        path: str | Path,
        dtype: str,
        seq_len: int,
        batch_size: int,
        seed: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ):
        _check_sizes(seq_len, batch_size)
        self.path, self.seq_len = Path(path), seq_len
        if not self.path.is_file():
            raise FileNotFoundError(f"token file {path} not found: check data.path")
        if dtype not in ("uint16", "uint32"):
            raise ValueError(f"token file dtype {dtype!r}: use uint16 or uint32")
        self.dtype = np.dtype(dtype).newbyteorder("<")
        size = self.path.stat().st_size
        if size % self.dtype.itemsize:
            raise ValueError(
                f"{path} holds {size} bytes, not a whole number of {dtype} tokens: check the dtype"
            )
        self.num_tokens = size // self.dtype.itemsize
        if self.num_tokens < seq_len + 1:
            raise ValueError(
                f"{path} holds {self.num_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}: "
                "lower model.seq_len"
            )
        self.max_id = _max_id(self.path, self.dtype)  # the largest id in the file
        self._setup(batch_size, seed, self.num_tokens, process_index, process_count)

    def _positions(self, begin: int, end: int) -> np.ndarray:
        return np.arange(begin, end, dtype=np.int64)  # row positions; offsets drawn per step

    def offsets(self, step: int) -> np.ndarray:
        """Window starts of the global batch of `step` (B,), from (seed, step)."""
        high = self.num_tokens - self.seq_len  # windows of seq_len + 1 tokens fit below
        return np.random.default_rng([self.seed, int(step)]).integers(0, high, self.batch_size)

    def _windows(self, offsets) -> dict:
        # A mapping a batch: a long-lived one keeps every page it ever touched resident (the
        # kernel maps ~64 KB around each window), 550 MB after 300 steps of 32 x 1024 tokens.
        tokens = np.memmap(self.path, dtype=self.dtype, mode="r")  # (N,), paged on demand
        w = np.stack([tokens[o : o + self.seq_len + 1] for o in offsets]).astype(np.int32)
        del tokens  # unmapped: the copies above hold no reference to it
        return {"x": w[:, :-1], "y": w[:, 1:]}  # (n, T) each

    def _gather(self, idx: np.ndarray) -> dict:
        b = self.batch_size
        steps = idx // b
        table = {int(s): self.offsets(s) for s in np.unique(steps)}
        return self._windows([table[int(p // b)][int(p % b)] for p in idx])

    def eval_batches(self, batch_size: int, max_batches: int | None = None):
        """Non-overlapping windows from the start of the file in order, `(batch, real_rows)`."""
        span = self.seq_len + 1
        n = self.num_tokens // span
        if max_batches is not None:
            n = min(n, max_batches * batch_size)
        for start in range(0, n, batch_size):
            offs = np.arange(start, min(start + batch_size, n)) * span
            yield self._windows(offs), len(offs)
