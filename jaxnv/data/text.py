"""`data.name=files`: a language model's data from the user's own files (docs/data.md).

    cfg = DataConfig(name="files", path="corpus/*.jsonl", tokenizer="bpe:4096", packing=True)
    data = files_dataset(cfg, batch_size=32, seed=0)
    data.train      # step-indexed batches (prepared corpora, token files) or a grain stream
    data.eval       # held-out rows as arrays: {"x", "y"} (+ segment_ids, positions, weights)
    data.info["tokenizer"]

Three kinds of `data.path`: a directory written by `jaxnv data prepare` (ArrayRecord shards:
step-indexed windows or packed rows, elastic resume); a flat token file (`format=tokens`,
nanoGPT's `.bin`, memory-mapped); text, JSONL or Parquet files (a glob), tokenized as they are
streamed, with the stream's position saved in each checkpoint.
"""

from __future__ import annotations

import math
import os

import numpy as np

from jaxnv.data.files import detect_format, expand, read_documents
from jaxnv.data.lm import PackedBatches, PreparedCorpus, TokenFileBatches, WindowBatches
from jaxnv.data.packing import first_fit, lm_batch, pack_rows, split_pieces
from jaxnv.data.sources import Dataset
from jaxnv.data.streaming import stream_dataset
from jaxnv.data.tokenizers import Tokenizer, load_saved, load_tokenizer


def files_dataset(
    cfg, batch_size: int, seed: int, *, process_index: int = 0, process_count: int = 1
) -> Dataset:
    """The Dataset of `cfg` (a `DataConfig` with `name=files`): train batches, eval arrays."""
    if not cfg.path:
        raise ValueError(
            "data.name=files needs data.path=: files or a glob (corpus/*.jsonl), a directory "
            "written by `jaxnv data prepare`, or a token file"
        )
    if cfg.seq_len < 1:
        raise ValueError(f"data.seq_len={cfg.seq_len} must be >= 1")
    shard = {"process_index": process_index, "process_count": process_count}
    if os.path.isfile(os.path.join(cfg.path, "manifest.json")):
        return _prepared(cfg, batch_size, seed, shard)
    paths = expand(cfg.path)
    fmt = detect_format(paths) if cfg.format == "auto" else cfg.format
    if fmt == "array_record":
        raise ValueError(
            f"data.path={cfg.path!r}: give the directory `jaxnv data prepare` wrote (it holds "
            "manifest.json beside the shards), not the shards themselves"
        )
    if fmt == "tokens":
        return _token_file(cfg, paths, batch_size, seed, shard)
    return _streamed(cfg, paths, fmt, batch_size, seed, shard)


def _dataset(train, eval_arrays, cfg, tokenizer: Tokenizer, **info) -> Dataset:
    return Dataset(
        train=train,
        eval=eval_arrays,
        in_features=cfg.seq_len,
        out_features=tokenizer.vocab_size,
        task="lm",
        info={"tokenizer": tokenizer, "seq_len": cfg.seq_len, **info},
    )


def _prepared(cfg, batch_size, seed, shard) -> Dataset:
    corpus = PreparedCorpus(cfg.path)
    tokenizer = load_saved(os.path.join(cfg.path, "tokenizer"))
    if cfg.tokenizer:
        given = None if cfg.tokenizer.startswith("bpe:") else load_tokenizer(cfg.tokenizer)
        if given is None or given.fingerprint != tokenizer.fingerprint:
            raise ValueError(
                f"data.tokenizer={cfg.tokenizer!r} is not the tokenizer {cfg.path} was prepared "
                "with: leave data.tokenizer unset (the corpus's own is used) or prepare again"
            )
    if cfg.eval_path:
        raise ValueError(
            "data.eval_path is for files read directly: a prepared corpus holds out "
            "data.eval_fraction of its documents (prepare the eval files as their own corpus "
            "and set eval_fraction=0 to keep them apart)"
        )
    train_ids, eval_ids = corpus.split(cfg.eval_fraction, seed=cfg.seed)
    kind = PackedBatches if cfg.packing else WindowBatches
    train = kind(corpus, train_ids, cfg.seq_len, batch_size, seed, **shard)
    eval_arrays = None
    if len(eval_ids):
        if cfg.num_eval:  # only the documents, in order, whose tokens fill num_eval rows
            ends = np.cumsum(corpus.lengths[eval_ids] + 1)  # + eos
            eval_ids = eval_ids[: int(np.searchsorted(ends, cfg.num_eval * (cfg.seq_len + 1))) + 1]
        docs = corpus.docs(eval_ids)
        eval_arrays = eval_rows(docs, corpus.eos_id, cfg.seq_len, cfg.packing, cfg.num_eval)
    m = corpus.manifest
    return _dataset(
        train, eval_arrays, cfg, tokenizer, documents=m["documents"], tokens=m["tokens"]
    )


def _token_file(cfg, paths, batch_size, seed, shard) -> Dataset:
    if len(paths) != 1:
        raise ValueError(f"data.path matches {len(paths)} token files: give exactly one")
    tokenizer = load_tokenizer(cfg.tokenizer or "bytes")
    train = TokenFileBatches(paths[0], cfg.token_dtype, cfg.seq_len, batch_size, seed, **shard)
    _check_ids("data.path", train, tokenizer)
    eval_arrays = None
    if cfg.eval_path:
        held = TokenFileBatches(cfg.eval_path, cfg.token_dtype, cfg.seq_len, 1, seed)
        _check_ids("data.eval_path", held, tokenizer)
        limit = cfg.num_eval or None
        rows = [b for b, _ in held.eval_batches(limit or held.num_tokens, max_batches=1)]
        eval_arrays = rows[0] if rows else None
    return _dataset(train, eval_arrays, cfg, tokenizer, tokens=train.num_tokens)


def _check_ids(key: str, tokens: TokenFileBatches, tokenizer: Tokenizer) -> None:
    if tokens.max_id >= tokenizer.vocab_size:  # e.g. a GPT-2 .bin read with the bytes tokenizer
        raise ValueError(
            f"{key} ids reach {tokens.max_id} but data.tokenizer has {tokenizer.vocab_size} ids: "
            "set data.tokenizer= the file's tokenizer"
        )


def _streamed(cfg, paths, fmt, batch_size, seed, shard) -> Dataset:
    if cfg.eval_path:
        train_paths, eval_paths = paths, expand(cfg.eval_path)
    elif cfg.eval_fraction > 0:
        if len(paths) < 2:
            raise ValueError(
                f"data.path={cfg.path!r} is one file, which a stream cannot split into train and "
                "eval: give data.eval_path=FILES, set data.eval_fraction=0, or prepare it "
                "(`jaxnv data prepare`) to hold out documents"
            )
        held = max(1, math.ceil(cfg.eval_fraction * len(paths)))
        train_paths, eval_paths = paths[:-held], paths[-held:]  # the last files in sorted order
    else:
        train_paths, eval_paths = paths, []
    tokenizer = load_tokenizer(cfg.tokenizer or "bytes", train_paths, format=fmt, field=cfg.field)
    train = stream_dataset(
        train_paths, fmt, cfg.field, tokenizer, cfg.seq_len, batch_size,
        packing=cfg.packing, seed=seed, **shard,
    )  # fmt: skip
    eval_arrays = None
    if eval_paths:
        docs = _held_out(read_documents(eval_paths, fmt, cfg.field), tokenizer, cfg)
        eval_arrays = eval_rows(docs, tokenizer.eos_id, cfg.seq_len, cfg.packing, cfg.num_eval)
    return _dataset(train, eval_arrays, cfg, tokenizer, files=len(train_paths))


def _held_out(texts, tokenizer: Tokenizer, cfg) -> list[np.ndarray]:
    """The held-out documents' ids, read only as far as `num_eval` rows need (all when 0)."""
    want = cfg.num_eval * (cfg.seq_len + 1) if cfg.num_eval else None
    docs, total = [], 0
    for text in texts:
        if not text:
            continue
        docs.append(np.asarray(tokenizer.encode(text), np.int64))
        total += len(docs[-1]) + 1
        if want is not None and total >= want:
            break
    return docs


def eval_rows(docs, eos_id: int, seq_len: int, packing: bool, limit: int = 0) -> dict | None:
    """Held-out documents as fixed evaluation rows (at most `limit` rows; 0: all): windows of
    the documents joined by eos, or the documents packed in order (as in training)."""
    span = seq_len + 1
    with_eos = [np.append(np.asarray(d, np.int64), eos_id) for d in docs]
    if not with_eos:
        return None
    if packing:
        lengths = np.array([len(d) for d in with_eos], np.int64)
        doc, start, length = split_pieces(lengths, span)
        order, bounds = first_fit(length, span)
        pieces = [with_eos[d][s : s + n] for d, s, n in zip(doc, start, length, strict=True)]
        ends = zip(bounds[:-1], bounds[1:], strict=True)
        rows = [[pieces[i] for i in order[a:b]] for a, b in ends]
        rows = rows[:limit] if limit else rows
        return lm_batch(**pack_rows(rows, span))
    stream = np.concatenate(with_eos)
    n = len(stream) // span
    if limit:
        n = min(n, limit)
    if n < 1:
        raise ValueError(
            f"the held-out documents hold {len(stream)} tokens, fewer than one window of "
            f"data.seq_len + 1 = {span}: hold out more (data.eval_fraction) or lower data.seq_len"
        )
    w = stream[: n * span].reshape(n, span).astype(np.int32)
    return {"x": w[:, :-1], "y": w[:, 1:]}
