"""Tokenize a corpus once into ArrayRecord shards that batchers read at random.

    manifest = prepare("corpus/*.jsonl", "data/corpus", tokenizer="bpe:8192", num_workers=4)
    manifest, source = open_shards("data/corpus")    # source[i]: document i's token bytes
    ids = np.frombuffer(source[0], token_dtype(manifest))

`out_dir` holds `manifest.json` (written last: a preparation is complete iff it is there; until
then `.prepare-started` marks a run under way, the only kind whose leftovers are cleaned),
`tokenizer/` (`load_saved` reloads it), `shard-NNNNN.array_record` (one record per non-empty
document, in input order: its ids as little-endian `dtype` bytes, no eos appended) and
`lengths.npy` (int64 token count of every record, in global order).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from jaxnv.data.encode import SHARD_PATTERN, WRITER_OPTIONS, encode_all, write_shards  # noqa: F401
from jaxnv.data.files import FORMATS, detect_format, expand, read_documents
from jaxnv.data.tokenizers import Tokenizer, load_tokenizer, train_bpe

MANIFEST = "manifest.json"
LOCK_FILE = ".prepare.lock"  # kept: removing it would race with a waiting process
STARTED = ".prepare-started"  # written first, removed with the manifest: a run is under way
FORMAT_TAG = "jaxnv-tokens/1"


def token_dtype(manifest_or_vocab: dict | int) -> np.dtype:
    """Little-endian uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if isinstance(manifest_or_vocab, dict):
        return np.dtype(manifest_or_vocab["dtype"]).newbyteorder("<")
    return np.dtype("<u2" if manifest_or_vocab <= 65536 else "<u4")


def input_fingerprint(paths: Sequence[str], format: str, field: str) -> str:
    """sha256 over the inputs' absolute paths, sizes and mtimes, and how they are read."""
    stats = [(os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    blob = json.dumps({"files": stats, "format": format, "field": field})
    return hashlib.sha256(blob.encode()).hexdigest()


def prepare(
    inputs: str | Sequence[str],
    out_dir: str | os.PathLike,
    *,
    tokenizer: str | Tokenizer = "bytes",
    format: str = "auto",
    field: str = "text",
    num_workers: int = 0,
    docs_per_shard: int = 65536,
    progress: bool = True,
) -> dict:
    """Tokenize the documents of `inputs` into `out_dir`; return the manifest.

    `num_workers` > 0 encodes in that many spawned worker processes, each loading the tokenizer
    that `Tokenizer.save` wrote (so a custom `Tokenizer` subclass needs `num_workers=0`); 0
    encodes in this process, where the library's own batch encode still uses threads.
    Preparing the same inputs with the same tokenizer again returns the existing manifest;
    another preparation in `out_dir` is refused; a run interrupted before its manifest is redone
    from scratch. With `tokenizer="bpe:VOCAB"` the BPE is trained on the inputs first.
    """
    out_dir = os.fspath(out_dir)
    paths = expand(inputs)
    if format == "auto":
        format = detect_format(paths)
    elif format not in FORMATS:
        raise ValueError(
            f"data.format={format!r} is unknown: give one of auto, {', '.join(FORMATS)}"
        )
    if format == "tokens":
        raise ValueError("data.format=tokens is already tokenized: train on it, prepare only text")
    if docs_per_shard < 1 or num_workers < 0:
        raise ValueError("docs_per_shard must be >= 1 and num_workers >= 0")
    inside = [p for p in paths if _is_inside(p, out_dir)]
    if inside:
        raise ValueError(f"input {inside[0]} lies inside --out {out_dir}: write elsewhere")
    in_fp = input_fingerprint(paths, format, field)
    spec = tokenizer.strip() if isinstance(tokenizer, str) else None
    training = spec is not None and spec.startswith("bpe:")
    tok = None if training else _tokenizer(tokenizer)
    with _locked(out_dir, progress):  # one preparation at a time (e.g. every host of a job)
        existing = _existing_manifest(out_dir)
        if existing is not None:
            old = existing.get("tokenizer", {})
            same_tok = (
                old.get("spec") == spec if training else old.get("fingerprint") == tok.fingerprint
            )
            if existing.get("input_fingerprint") == in_fp and same_tok:
                if progress:
                    print(f"{out_dir} already holds this preparation: {_summary(existing)}")
                return existing
            raise ValueError(
                f"{out_dir} holds a preparation of other inputs/tokenizer: use a new --out or "
                "delete it"
            )
        _start(out_dir)
        if training:
            if progress:
                print(f"training {spec} on {len(paths)} files ...", file=sys.stderr)
            docs = (d for d in read_documents(paths, format, field) if d)
            tok = train_bpe(docs, _bpe_vocab(spec))
        if num_workers and tok.kind not in ("bytes", "hf", "sentencepiece"):
            raise ValueError(
                f"workers reload the tokenizer from disk, which a {type(tok).__name__} cannot "
                "do: give num_workers=0"
            )
        _clean_interrupted(out_dir)
        start = time.perf_counter()
        manifest = _tokenize_into(
            out_dir, paths, format, field, tok, num_workers, docs_per_shard, progress
        )
        manifest["tokenizer"]["spec"] = spec
        manifest["input_fingerprint"] = in_fp
        _write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)  # last: now complete
        os.remove(os.path.join(out_dir, STARTED))
    if progress:
        rate = manifest["text_bytes"] / 1e6 / max(time.perf_counter() - start, 1e-9)
        print(f"{_summary(manifest)}, {rate:.2f} MB/s -> {out_dir}")
    return manifest


def _tokenize_into(out_dir, paths, format, field, tok, num_workers, docs_per_shard, progress):
    """Write shards, lengths.npy and tokenizer/ into `out_dir` (through a temporary directory
    inside it); return the manifest, less its fingerprints."""
    tmp = tempfile.mkdtemp(prefix=".prepare-", dir=out_dir)
    try:
        tok_dir = os.path.join(tmp, "tokenizer")
        tok.save(tok_dir)
        dtype = token_dtype(tok.vocab_size)
        docs = read_documents(paths, format, field)
        encoded = encode_all(tok, tok_dir, docs, dtype, num_workers)
        shards, lengths, text_bytes = write_shards(
            encoded, tmp, docs_per_shard, dtype.itemsize, progress
        )
        np.save(os.path.join(tmp, "lengths.npy"), lengths)
        for name in [s["path"] for s in shards] + ["lengths.npy", "tokenizer"]:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "format": FORMAT_TAG,
        "tokenizer": {
            "kind": tok.kind,
            "fingerprint": tok.fingerprint,
            "vocab_size": int(tok.vocab_size),
            "eos_id": int(tok.eos_id),
            "spec": None,
        },
        "dtype": dtype.name,
        "inputs": [{"path": os.path.abspath(p), "bytes": os.path.getsize(p)} for p in paths],
        "input_fingerprint": None,
        "data_format": format,
        "field": field,
        "shards": shards,
        "documents": int(len(lengths)),
        "tokens": int(lengths.sum()),
        "text_bytes": text_bytes,
        "complete": True,
    }


@contextlib.contextmanager
def _locked(out_dir: str, progress: bool):
    """Hold an exclusive lock on `out_dir/.prepare.lock` (released when the process dies)."""
    os.makedirs(out_dir, exist_ok=True)
    fd = os.open(os.path.join(out_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"waiting for another `prepare` into {out_dir} ...", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without locks: go on unlocked
        yield
    finally:
        os.close(fd)


def _summary(m: dict) -> str:
    return (
        f"{m['documents']:,} documents, {m['tokens']:,} tokens ({m['dtype']}) in "
        f"{len(m['shards'])} shards from {len(m['inputs'])} files ({m['text_bytes'] / 1e6:.1f} MB)"
    )


def _tokenizer(tokenizer: str | Tokenizer) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if not isinstance(tokenizer, str):
        raise TypeError(f"tokenizer= takes a spec string or a Tokenizer, not {type(tokenizer)}")
    return load_tokenizer(tokenizer)


def _bpe_vocab(spec: str) -> int:
    try:
        return int(spec.strip()[4:])
    except ValueError:
        raise ValueError(f"tokenizer={spec!r}: give bpe:VOCAB with an integer VOCAB") from None


def _is_inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path.startswith(directory.rstrip(os.sep) + os.sep)


def _existing_manifest(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_TAG:
        raise ValueError(
            f"{path} is not a jaxnv preparation manifest: use a new --out or delete it"
        )
    return manifest


def _start(out_dir: str) -> None:
    """Mark `out_dir` as being prepared. Without the mark of an interrupted run, `out_dir` must
    hold nothing else: prepare never cleans (deletes) files it did not write."""
    marker = os.path.join(out_dir, STARTED)
    if not os.path.exists(marker):
        others = sorted(set(os.listdir(out_dir)) - {LOCK_FILE})
        if others:
            raise ValueError(
                f"--out {out_dir} already holds files jaxnv did not write ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}): give a new or empty --out"
            )
        with open(marker, "w") as f:
            f.write("a `jaxnv data prepare` started here; it is complete when manifest.json is\n")


def _clean_interrupted(out_dir: str) -> None:
    """Remove what an interrupted run (its STARTED mark, no manifest) left: only names `prepare`
    itself writes."""
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if name.startswith(".prepare-") and os.path.isdir(path):
            shutil.rmtree(path)
        elif name.startswith("shard-") and name.endswith(".array_record") or name == "lengths.npy":
            os.remove(path)
        elif name == "tokenizer":
            if not os.path.isfile(os.path.join(path, "jaxnv_tokenizer.json")):
                raise ValueError(
                    f"{path} exists and was not written by jaxnv: use a new --out or move it"
                )
            shutil.rmtree(path)


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- reading ----


def read_manifest(out_dir: str | os.PathLike) -> dict:
    """The manifest of a complete preparation in `out_dir` (one-line errors otherwise)."""
    path = os.path.join(os.fspath(out_dir), MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{out_dir} holds no {MANIFEST}: run `jaxnv data prepare --input GLOB --out {out_dir}`"
        )
    manifest = _existing_manifest(os.fspath(out_dir))
    if not manifest.get("complete"):
        raise ValueError(f"{path} is not complete: run `jaxnv data prepare` into a new --out")
    return manifest


def _count_records(reader_cls, path: str) -> int:
    """Records in an ArrayRecord file, or -1 if it is truncated or corrupt."""
    # a truncated file opens but is not ok() (0 records), and its close() raises
    try:
        reader = reader_cls(path)
    except (RuntimeError, OSError, ValueError):
        return -1
    n = reader.num_records() if reader.ok() else -1
    try:
        reader.close()
    except RuntimeError:
        n = -1
    return n


def open_shards(out_dir: str | os.PathLike):
    """(manifest, `grain.sources.ArrayRecordDataSource` over every record of every shard)."""
    from array_record.python.array_record_module import ArrayRecordReader
    from grain.sources import ArrayRecordDataSource

    out_dir = os.fspath(out_dir)
    manifest = read_manifest(out_dir)
    if not manifest["shards"] or not manifest["documents"]:
        raise ValueError(f"{out_dir} holds no documents: prepare non-empty inputs")
    ranges = []
    for shard in manifest["shards"]:
        path = os.path.join(out_dir, shard["path"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard {path} is missing: prepare {out_dir} again")
        n = _count_records(ArrayRecordReader, path)
        if n != shard["documents"]:
            raise ValueError(
                f"shard {path} is truncated or corrupt ({max(n, 0)} of {shard['documents']} "
                f"records readable): prepare {out_dir} again"
            )
        ranges.append(f"{path}[0:{n}]")  # the known count: grain need not reopen the file
    return manifest, ArrayRecordDataSource(ranges)


def main(argv: Sequence[str] | None = None) -> dict:
    """`jaxnv data prepare --input GLOB --out DIR [--tokenizer SPEC] [--format F] ...`."""
    p = argparse.ArgumentParser(prog="jaxnv data prepare", description=prepare.__doc__)
    p.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
    p.add_argument("--out", required=True, help="directory for the shards and manifest")
    p.add_argument(
        "--tokenizer", default="bytes", help="bytes | tokenizer.json | DIR | .model | bpe:N"
    )
    p.add_argument("--format", default="auto", choices=("auto",) + FORMATS)
    p.add_argument("--field", default="text", help="the text field (jsonl) or column (parquet)")
    p.add_argument("--workers", type=int, default=0, help="encoding processes (0: this one)")
    p.add_argument("--docs-per-shard", type=int, default=65536)
    a = p.parse_args(argv)
    return prepare(
        a.input,
        a.out,
        tokenizer=a.tokenizer,
        format=a.format,
        field=a.field,
        num_workers=a.workers,
        docs_per_shard=a.docs_per_shard,
    )
