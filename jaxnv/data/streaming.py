"""Streaming language-model batches from files that are not indexed (text, JSONL, Parquet).

    ds = stream_dataset(files, "jsonl", "text", tokenizer, seq_len=1024, batch_size=32)
    it = iter(ds)                       # a grain iterator: it.get_state() / it.set_state(state)
    batch = next(it)                    # this process's rows: {"x": (B/P, T), "y": (B/P, T)} int32

Documents are read in file order (files shuffled per epoch from (seed, epoch)), tokenized with
eos appended, then either concatenated and cut into windows of `seq_len + 1` (grain's
`ConcatThenSplitIterDataset`) or packed (grain's `FirstFitPackIterDataset`). The reader is a small
`grain.DatasetIterator` whose state is (epoch, file, offset in the file, document count, pieces
already given), so grain's packers above it restore exactly: a resumed stream gives the batches an
uninterrupted one gives. With `process_count` processes each reads its own files (files[p::P]),
or, with fewer files than processes, every P-th document of every file.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path

import grain
import numpy as np
import pyarrow.parquet as pq
from grain.experimental import ConcatThenSplitIterDataset, FirstFitPackIterDataset

from jaxnv.data.files import PARQUET_BATCH_ROWS, _load_json
from jaxnv.data.packing import lm_batch

FORMATS = ("text", "jsonl", "parquet")


class _Reader:
    """Documents of one file from a position: `read()` gives the next text (None at the end) and
    moves `position` past it. Positions: jsonl the byte offset of the next line (a `.json` file
    holding one array of records: the next record's index), parquet the next row, text 0 or 1
    (one document a file)."""

    def __init__(self, path: str, format: str, field: str, position: int):
        self.path, self.format, self.field, self.position = path, format, field, position
        self._file = self._pq = self._records = None
        if format == "jsonl":  # binary, so that tell() is a byte offset (gzip: uncompressed)
            self._file = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # noqa: SIM115
            head = self._file.read(64)
            while head and not head.strip():  # leading whitespace
                head = self._file.read(64)
            self._file.seek(0)
            if head.strip().startswith(b"["):  # one JSON array of records, as files.py reads it
                self._records = _load_json(self._file, path)
                self._file.close()
                self._file = None
            else:
                self._file.seek(position)
        elif format == "parquet":
            self._pq = pq.ParquetFile(path)
            names = self._pq.schema_arrow.names
            if field not in names:
                raise ValueError(
                    f"{path} has no column {field!r} (columns: {', '.join(names)}): "
                    "set data.field to one of them"
                )
            sizes = [
                self._pq.metadata.row_group(g).num_rows for g in range(self._pq.num_row_groups)
            ]
            self._group_ends = np.cumsum(sizes, dtype=np.int64)
            # rows [_first, _end) of the current batch: `_rows` (None for a batch skipped over)
            self._batches, self._rows, self._first, self._end = None, None, 0, 0

    def read(self) -> str | None:
        text = self._read()
        if text is not None and not isinstance(text, str):
            raise ValueError(
                f"{self.path}: field {self.field!r} holds {type(text).__name__}, not text: "
                "set data.field to a string field"
            )
        return text

    def _read(self):
        if self.format == "text":
            if self.position:
                return None
            self.position = 1
            opener = gzip.open if self.path.endswith(".gz") else open
            with opener(self.path, "rb") as f:
                raw = f.read()
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{self.path} is not UTF-8 text (byte {e.start}): convert it (iconv -t utf-8) "
                    "or leave it out"
                ) from None
        if self.format == "jsonl" and self._records is not None:
            at = self.position
            if at >= len(self._records):
                return None
            self.position = at + 1
            record = self._records[at]
            if not isinstance(record, dict) or self.field not in record:
                raise ValueError(
                    f"{self.path} record {at + 1}: not a JSON object with a {self.field!r} "
                    "field: fix the record or set data.field"
                )
            return record[self.field] or ""  # null: an empty document, skipped
        if self.format == "jsonl":
            while True:
                at = self._file.tell()
                line = self._file.readline()
                if not line:
                    return None
                self.position = self._file.tell()
                if line.strip():
                    break
            try:
                return json.loads(line)[self.field] or ""  # null: an empty document, skipped
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(
                    f"{self.path} at byte {at}: not a JSON object with a {self.field!r} field: "
                    "fix the line or set data.field"
                ) from None
        row = self.position  # parquet: one batch of rows of one column in memory at a time
        if row >= (self._group_ends[-1] if len(self._group_ends) else 0):
            return None
        if self._batches is None:  # from the row group holding `row`, batches read in order
            group = int(np.searchsorted(self._group_ends, row, side="right"))
            self._batches = self._pq.iter_batches(
                batch_size=PARQUET_BATCH_ROWS,
                row_groups=list(range(group, self._pq.num_row_groups)),
                columns=[self.field],
            )
            self._first = self._end = int(self._group_ends[group - 1]) if group else 0
        while row >= self._end:  # rows are read forward only; a resume skips whole batches
            batch = next(self._batches)
            self._first, self._end = self._end, self._end + batch.num_rows
            self._rows = batch.column(0).to_pylist() if row < self._end else None
        self.position = row + 1
        return self._rows[row - self._first] or ""  # null: an empty document, skipped

    def close(self):
        for f in (self._file, self._pq):
            if f is not None:
                f.close()


class _Documents(grain.IterDataset):
    """Token pieces of the documents of `paths`: {"tokens": (L,) int32}, eos appended, split
    into pieces of at most `max_piece` tokens when given. Endless unless `num_epochs`."""

    def __init__(self, paths, format, field, tokenizer, *, max_piece, seed, shuffle_files,
                 process_index, process_count, num_epochs):  # fmt: skip
        super().__init__()
        paths = list(paths)
        if len(paths) >= process_count:  # each process its own files
            self.paths, self.doc_shard = paths[process_index::process_count], None
        else:  # fewer files than processes: every process reads all, keeps its documents
            self.paths, self.doc_shard = paths, (process_index, process_count)
        self.format, self.field, self.tokenizer = format, field, tokenizer
        self.max_piece, self.seed, self.shuffle_files = max_piece, seed, shuffle_files
        self.num_epochs = num_epochs

    def file_order(self, epoch: int) -> list[str]:
        if not self.shuffle_files:
            return self.paths
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.paths))
        return [self.paths[i] for i in perm]

    def __iter__(self):
        return _DocumentIterator(self)


class _DocumentIterator(grain.DatasetIterator):
    """The reader of `_Documents`; its state names where the current document starts and how
    many of its pieces were given, so that `set_state` continues exactly."""

    def __init__(self, spec: _Documents):
        super().__init__()
        self.spec = spec
        self._set({"epoch": 0, "file": 0, "offset": 0, "docs": 0, "piece": 0})

    def _set(self, state: dict) -> None:
        self._pos = {k: int(state[k]) for k in ("epoch", "file", "offset", "docs")}
        self._reader: _Reader | None = None
        self._pieces: list[np.ndarray] = []
        self._given = 0
        self._doc_start = dict(self._pos)
        # documents taken since the start of an epoch read whole (none: the data is empty)
        self._epoch_docs = 0
        self._whole_epoch = not (self._pos["file"] or self._pos["offset"] or self._pos["docs"])
        skip = int(state["piece"])
        if skip:  # re-read the current document and drop the pieces already given
            self._load()
            self._given = skip

    def get_state(self) -> dict:
        if self._given < len(self._pieces):
            return {**self._doc_start, "piece": self._given}
        return {**self._pos, "piece": 0}

    def set_state(self, state: dict) -> None:
        if self._reader is not None:
            self._reader.close()
        self._set(state)

    def _next_text(self) -> str | None:
        """The next document of this process, advancing the position; None when done."""
        spec, pos = self.spec, self._pos
        while True:
            if spec.num_epochs is not None and pos["epoch"] >= spec.num_epochs:
                return None
            files = spec.file_order(pos["epoch"])
            if pos["file"] >= len(files):  # the epoch is over
                if self._whole_epoch and self._epoch_docs == 0:
                    raise ValueError(
                        f"the streamed files {spec.paths[:3]} hold no documents for this process: "
                        "check data.path and data.field"
                    )
                pos.update(epoch=pos["epoch"] + 1, file=0, offset=0, docs=0)
                self._epoch_docs, self._whole_epoch = 0, True
                continue
            if self._reader is None:
                self._reader = _Reader(files[pos["file"]], spec.format, spec.field, pos["offset"])
            text = self._reader.read()
            if text is None:
                self._reader.close()
                self._reader = None
                pos.update(file=pos["file"] + 1, offset=0)
                continue
            pos["offset"] = self._reader.position
            mine = spec.doc_shard is None or pos["docs"] % spec.doc_shard[1] == spec.doc_shard[0]
            pos["docs"] += 1
            if mine and text:
                self._epoch_docs += 1
                return text

    def _load(self) -> bool:
        """Read and tokenize the next document into pieces; False at the end of the stream."""
        self._doc_start = dict(self._pos)
        text = self._next_text()
        if text is None:
            return False
        ids = np.asarray(self.spec.tokenizer.encode(text) + [self.spec.tokenizer.eos_id], np.int32)
        step = self.spec.max_piece or len(ids)
        self._pieces = [ids[i : i + step] for i in range(0, len(ids), step)]
        self._given = 0
        return True

    def __next__(self) -> dict:
        if self._given >= len(self._pieces) and not self._load():
            raise StopIteration
        piece = self._pieces[self._given]
        self._given += 1
        return {"tokens": piece}


def stream_dataset(
    paths: Sequence[str],
    format: str,
    field: str,
    tokenizer,
    seq_len: int,
    batch_size: int,
    *,
    packing: bool = False,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    shuffle_files: bool = True,
    packing_bins: int | None = None,
) -> grain.IterDataset:
    """This process's batches of a global `batch_size`, streamed from `paths` (a grain
    `IterDataset`; wrap it in `IterableBatches` to train, its iterator state goes into the
    checkpoint). `{"x", "y"}` (B/P, T) int32, plus `segment_ids`, `positions`, `weights` when
    `packing`. Endless unless `num_epochs` (the last partial window or batch is dropped)."""
    if format not in FORMATS:
        raise ValueError(f"data.format={format!r} cannot be streamed: use one of {FORMATS}")
    paths = [str(p) for p in ([paths] if isinstance(paths, str | Path) else paths)]
    if not paths:
        raise ValueError("no files to stream: check data.path")
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p} not found: check data.path")
    if batch_size % process_count:
        raise ValueError(
            f"train.batch_size={batch_size} does not split over {process_count} processes: "
            "use a multiple of the process count"
        )
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}: use at least 1")
    per = batch_size // process_count
    span = seq_len + 1  # x = row[:-1], y = row[1:]
    docs = _Documents(
        paths, format, field, tokenizer, max_piece=span if packing else None, seed=seed,
        shuffle_files=shuffle_files, process_index=process_index, process_count=process_count,
        num_epochs=num_epochs,
    )  # fmt: skip
    if packing:
        rows = FirstFitPackIterDataset(
            docs, length_struct={"tokens": span}, num_packing_bins=packing_bins or per, seed=seed
        )
        rows = rows.map(
            lambda r: lm_batch(r["tokens"], r["tokens_segment_ids"], r["tokens_positions"])
        )
    else:
        rows = ConcatThenSplitIterDataset(docs, length_struct={"tokens": span})
        rows = rows.filter(lambda r: r["tokens_segment_ids"][-1] != 0)  # the padded last window
        rows = rows.map(lambda r: {"x": r["tokens"][:-1], "y": r["tokens"][1:]})
    return rows.batch(per, drop_remainder=True)
