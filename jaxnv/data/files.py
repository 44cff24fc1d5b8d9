"""Documents out of files: globs expanded, the format told from extensions, text streamed.

    paths = expand("corpus/**/*.jsonl")              # sorted, de-duplicated
    fmt = detect_format(paths)                       # text|jsonl|parquet|array_record|tokens
    for doc in read_documents(paths, fmt, field="text"): ...

Formats: `text` is one document per file; `jsonl` one JSON object a line (its `field`);
`parquet` the `field` column, read a batch of rows at a time; `array_record` one UTF-8 document a
record; `tokens` (`.bin`) already holds token ids, so there is no text to read.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator, Sequence

FORMATS = ("text", "jsonl", "parquet", "array_record", "tokens")
TEXT_EXTENSIONS = frozenset(
    ".txt .text .md .rst .tex .py .pyi .c .h .cc .cpp .hpp .cu .rs .go .java .js .ts .html "
    ".css .xml .yaml .yml .toml .ini .cfg .sh .csv .tsv .sql .rb .lua .jl .scala .kt".split()
)
_EXTENSIONS = {
    **dict.fromkeys(TEXT_EXTENSIONS, "text"),
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".array_record": "array_record",
    ".bin": "tokens",
}
PARQUET_BATCH_ROWS = 1024  # rows in memory at a time, whatever the row-group size


def expand(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Files named by paths, globs (`**` recursive) and directories (walked, hidden names skipped),
    sorted and de-duplicated. A pattern that matches nothing or a missing path is an error."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: set[str] = set()
    for p in map(os.fspath, paths):
        if glob.has_magic(p):
            matches = glob.glob(p, recursive=True)
            if not matches:
                raise FileNotFoundError(
                    f"no file matches {p!r}: check the pattern (quote it so that the shell "
                    "leaves it to jaxnv)"
                )
        elif os.path.exists(p):
            matches = [p]
        else:
            raise FileNotFoundError(f"input {p!r} does not exist: give a file, directory or glob")
        for m in matches:
            if os.path.isdir(m):
                walked = _walk(m)
                if not walked and not glob.has_magic(p):
                    raise FileNotFoundError(f"input directory {m!r} holds no files")
                found.update(walked)
            else:
                found.add(os.path.normpath(m))
    if not found:
        raise FileNotFoundError(f"inputs {list(map(os.fspath, paths))} name no files")
    return sorted(found)


def _walk(directory: str) -> list[str]:
    out = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [os.path.normpath(os.path.join(root, n)) for n in names if not n.startswith(".")]
    return out


def _extension(path: str) -> str:
    base = path[:-3] if path.endswith(".gz") else path
    return os.path.splitext(base)[1].lower()


def detect_format(paths: Sequence[str]) -> str:
    """The one format of `paths` told from their extensions; unknown or mixed is an error."""
    by_format: dict[str, str] = {}
    for p in paths:
        fmt = _EXTENSIONS.get(_extension(p))
        if fmt is None:
            raise ValueError(
                f"cannot tell the format of {p!r} from its extension: set "
                f"data.format= (--format) to one of {', '.join(FORMATS)}"
            )
        by_format.setdefault(fmt, p)
    if len(by_format) > 1:
        mixed = ", ".join(f"{fmt} ({p})" for fmt, p in sorted(by_format.items()))
        raise ValueError(
            f"inputs mix formats: {mixed}: give files of one format, or set data.format= "
            "(--format) to read them all as one"
        )
    if not by_format:
        raise ValueError("no input files: give --input GLOB")
    return next(iter(by_format))


def read_documents(
    paths: str | Sequence[str], format: str = "auto", field: str = "text"
) -> Iterator[str]:
    """Each document of `paths` in order (paths expanded first), as a `str`.

    Empty documents are yielded too (callers decide); a parquet null is yielded as "".
    """
    paths = expand(paths)
    format = detect_format(paths) if format == "auto" else format
    for path in paths:
        yield from _read_file(path, format, field)


def _read_file(path: str, format: str, field: str) -> Iterator[str]:
    if format == "text":
        yield _read_text(path)
    elif format == "jsonl":
        yield from _read_jsonl(path, field)
    elif format == "parquet":
        yield from _read_parquet(path, field)
    elif format == "array_record":
        yield from _read_array_record(path)
    elif format == "tokens":
        raise ValueError(
            f"{path} holds token ids (data.format=tokens), not text: read it as tokens, "
            "or give text, jsonl or parquet files to tokenize"
        )
    else:
        raise ValueError(
            f"data.format={format!r} is unknown: give one of auto, {', '.join(FORMATS)}"
        )


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_text(path: str) -> str:
    try:
        with _open_text(path) as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {e.start}): convert it (iconv -t utf-8) or leave it "
            "out of the inputs"
        ) from None


def _read_jsonl(path: str, field: str) -> Iterator[str]:
    with _open_text(path) as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[":  # a .json file holding one array of records
            records = enumerate(_load_json(f, path), start=1)
            where = "record"
        else:
            records = ((n, _parse_line(line, path, n)) for n, line in enumerate(f, start=1))
            where = "line"
        for n, record in records:
            if record is None:  # a blank line
                continue
            if not isinstance(record, dict) or field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"{path} {where} {n} has no field {field!r} (it has {keys}): set "
                    "data.field= (--field) to the text's key"
                )
            text = record[field]
            if text is None:
                text = ""
            if not isinstance(text, str):
                raise ValueError(
                    f"{path} {where} {n}: field {field!r} is a {type(text).__name__}, not text: "
                    "set data.field= (--field) to a string field"
                )
            yield text


def _parse_line(line: str, path: str, n: int):
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} line {n} is not valid JSON ({e.msg} at column {e.colno}): fix or drop that "
            "line (JSON Lines: one object a line)"
        ) from None


def _load_json(f, path: str) -> list:
    try:
        return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def _read_parquet(path: str, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid (a ValueError) and OSError subclasses
        raise ValueError(f"{path} is not a parquet file ({str(e).splitlines()[0]})") from None
    with pf:
        columns = pf.schema_arrow.names
        if field not in columns:
            raise ValueError(
                f"{path} has no column {field!r} (it has {columns}): set data.field= (--field) "
                "to the text column"
            )
        # iter_batches reads one row group at a time and slices it: never the whole file
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
            for text in batch.column(0).to_pylist():
                if text is not None and not isinstance(text, str):
                    raise ValueError(
                        f"{path}: column {field!r} holds {type(text).__name__}, not text: set "
                        "data.field= (--field) to a string column"
                    )
                yield text or ""


def _read_array_record(path: str) -> Iterator[str]:
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(path, "readahead_buffer_size:16M")
        ok = reader.ok()
    except RuntimeError:
        ok = False
    if not ok:  # a truncated file opens but is not ok(); don't close it (that raises)
        raise ValueError(f"{path} is not a readable ArrayRecord file (truncated or corrupt)")
    try:
        n, step = reader.num_records(), 1024
        for start in range(0, n, step):
            for i, record in enumerate(reader.read(start, min(start + step, n)), start=start):
                try:
                    yield record.decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError(
                        f"{path} record {i} is not UTF-8 text: data.format=array_record reads "
                        "text records"
                    ) from None
    finally:
        reader.close()
