"""Encode documents into token records and write them into ArrayRecord shards, for `prepare`.

    encoded = encode_all(tok, tokenizer_dir, docs, dtype, num_workers)   # in input order
    shards, lengths, text_bytes = write_shards(encoded, out, docs_per_shard, dtype.itemsize, True)

Documents are encoded in chunks of up to 512 documents or 1 M characters, in this process or in
spawned worker processes that each load the saved tokenizer once; chunks come back in input order.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

from jaxnv.data.tokenizers import Tokenizer, load_saved

SHARD_PATTERN = "shard-{:05d}.array_record"
# group_size:1 makes every record its own chunk: what grain needs for fast random access
WRITER_OPTIONS = "group_size:1"
_CHUNK_DOCS, _CHUNK_BYTES = 512, 1 << 20  # one unit of work: this many docs or bytes of text


def _chunks(docs: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for doc in docs:
        if not doc:
            continue
        chunk.append(doc)
        size += len(doc)
        if len(chunk) >= _CHUNK_DOCS or size >= _CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encode_chunk(tok: Tokenizer, chunk: list[str], dtype: np.dtype):
    """(lengths (n,) int64, the ids of all `chunk` concatenated as `dtype` bytes, text bytes)."""
    arrays = tok.encode_arrays(chunk, dtype)
    lengths = np.fromiter(map(len, arrays), np.int64, len(arrays))
    flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype)
    return lengths, flat.astype(dtype, copy=False).tobytes(), sum(len(d.encode()) for d in chunk)


_WORKER: dict = {}


def _init_worker(tokenizer_dir: str, dtype: str, threads: int) -> None:
    # one tokenizer per process, loaded once; library threads split the cores between workers
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
    _WORKER["tok"] = load_saved(tokenizer_dir)
    _WORKER["dtype"] = np.dtype(dtype)


def _worker_encode(chunk: list[str]):
    return _encode_chunk(_WORKER["tok"], chunk, _WORKER["dtype"])


def encode_all(tok, tokenizer_dir, docs, dtype, num_workers) -> Iterator[tuple]:
    if num_workers == 0:
        for chunk in _chunks(docs):
            yield _encode_chunk(tok, chunk, dtype)
        return
    # spawn, not fork: the parent may hold JAX's and the tokenizer library's threads
    threads = max(1, (os.cpu_count() or 1) // num_workers)
    with cf.ProcessPoolExecutor(
        num_workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(tokenizer_dir, dtype.str, threads),
    ) as pool:
        pending: deque = deque()
        try:
            for chunk in _chunks(docs):
                pending.append(pool.submit(_worker_encode, chunk))
                while len(pending) > 2 * num_workers:  # bounded: the reader waits for workers
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except cf.process.BrokenProcessPool:
            raise RuntimeError(
                "a tokenizer worker process died (out of memory, or a script that starts "
                "prepare(num_workers>0) without `if __name__ == '__main__':`): retry with "
                "num_workers=0 (--workers 0) to see the error"
            ) from None
        finally:
            for f in pending:
                f.cancel()


def write_shards(encoded, tmp: str, docs_per_shard: int, itemsize: int, progress: bool):
    """Write records into `tmp`; return (shard entries, lengths (N,) int64, text bytes)."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    shards: list[dict] = []
    all_lengths: list[np.ndarray] = []
    writer, text_bytes = None, 0
    bar = tqdm(desc="tokenizing", unit="B", unit_scale=True, disable=not progress, leave=False)

    def close():
        if writer is not None:
            writer.close()

    try:
        for lengths, flat, nbytes in encoded:
            text_bytes += nbytes
            bar.update(nbytes)
            ends = np.cumsum(lengths) * itemsize
            keep = lengths > 0  # a document may encode to nothing (e.g. only whitespace)
            for length, end in zip(lengths[keep].tolist(), ends[keep].tolist(), strict=True):
                if writer is None or shards[-1]["documents"] == docs_per_shard:
                    close()
                    shards.append(
                        {"path": SHARD_PATTERN.format(len(shards)), "documents": 0, "tokens": 0}
                    )
                    writer = ArrayRecordWriter(
                        os.path.join(tmp, shards[-1]["path"]), WRITER_OPTIONS
                    )
                writer.write(flat[end - length * itemsize : end])
                shards[-1]["documents"] += 1
                shards[-1]["tokens"] += length
            all_lengths.append(lengths[keep])
    finally:
        close()
        bar.close()
    lengths = np.concatenate(all_lengths) if all_lengths else np.zeros(0, np.int64)
    return shards, lengths.astype(np.int64), text_bytes
