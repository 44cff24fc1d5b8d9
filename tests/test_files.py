"""File readers against independent readers: `open().read()`, the `json` module, pyarrow."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from jaxnv.data.files import detect_format, expand, read_documents

DOCS = ["first doc", "", "naïve 東京 🙂\nsecond line", "x" * 5000, "last"]


def _write_jsonl(path, docs, field="text"):
    with open(path, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, field: d}) + "\n")
            if i == 1:
                f.write("\n")  # blank lines are skipped


def test_expand_globs_directories_sorted_unique(tmp_path):
    for rel in ["b/2.txt", "b/1.txt", "a.txt", "b/c/3.txt", "b/.hidden.txt", ".git/x.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    want = sorted(str(tmp_path / r) for r in ["a.txt", "b/1.txt", "b/2.txt", "b/c/3.txt"])
    assert expand(str(tmp_path)) == want
    assert expand([str(tmp_path / "**/*.txt"), str(tmp_path / "a.txt")]) == want
    assert expand(str(tmp_path / "b" / "*.txt")) == want[1:3]
    with pytest.raises(FileNotFoundError, match="no file matches") as e:
        expand(str(tmp_path / "*.parquet"))
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        expand(str(tmp_path / "nope.txt"))


def test_detect_format():
    assert detect_format(["a.txt", "b.py", "c.md"]) == "text"
    assert detect_format(["a.jsonl", "b.json", "c.jsonl.gz"]) == "jsonl"
    assert detect_format(["a.parquet"]) == "parquet"
    assert detect_format(["a.array_record"]) == "array_record"
    assert detect_format(["a.bin"]) == "tokens"
    with pytest.raises(ValueError, match="data.format=") as e:
        detect_format(["a.txt", "b.jsonl"])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="data.format="):
        detect_format(["a.weird"])


def test_text_is_one_document_per_file(tmp_path):
    paths = []
    for i, d in enumerate(DOCS):
        paths.append(tmp_path / f"{i}.txt")
        paths[-1].write_text(d, encoding="utf-8")
    with gzip.open(tmp_path / "9.txt.gz", "wt", encoding="utf-8") as f:
        f.write("zipped")
    want = [open(p, encoding="utf-8").read() for p in paths] + ["zipped"]
    assert list(read_documents(str(tmp_path / "*"), "auto")) == want
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(ValueError, match="bad.txt is not UTF-8"):
        list(read_documents(str(tmp_path / "bad.txt")))


def test_jsonl_matches_json_module(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", DOCS[:3])
    _write_jsonl(tmp_path / "b.jsonl", DOCS[3:], field="content")
    with open(tmp_path / "b.jsonl") as f:
        want = [json.loads(line)["content"] for line in f if line.strip()]
    assert list(read_documents(str(tmp_path / "b.jsonl"), "jsonl", "content")) == want
    (tmp_path / "c.json").write_text(json.dumps([{"text": d} for d in DOCS]))  # one array
    assert list(read_documents(str(tmp_path / "c.json"))) == DOCS
    with pytest.raises(
        ValueError, match=r"b.jsonl line 1 has no field 'text' \(it has \['content'"
    ):
        list(read_documents([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]))
    with open(tmp_path / "a.jsonl", "a") as f:
        f.write('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(ValueError, match="a.jsonl line 6 is not valid JSON") as e:
        list(read_documents(str(tmp_path / "a.jsonl")))
    assert "\n" not in str(e.value)


def test_parquet_matches_pyarrow_row_group_by_row_group(tmp_path, monkeypatch):
    path = str(tmp_path / "d.parquet")
    docs = [f"doc {i} " * (i % 7) for i in range(3000)] + [None]
    pq.write_table(pa.table({"id": range(len(docs)), "body": docs}), path, row_group_size=700)
    assert pq.ParquetFile(path).num_row_groups == 5
    want = [d or "" for d in pq.read_table(path).column("body").to_pylist()]
    # never the whole file at once: the reader must not go through read_table/read
    monkeypatch.setattr(pq, "read_table", None)
    monkeypatch.setattr(pq.ParquetFile, "read", None)
    assert list(read_documents(path, "auto", "body")) == want
    with pytest.raises(ValueError, match=r"no column 'text' \(it has \['id', 'body'\]\)") as e:
        next(read_documents(path))
    assert "\n" not in str(e.value)


def test_array_record_text(tmp_path):
    w = ArrayRecordWriter(str(tmp_path / "t.array_record"), "group_size:1")
    for d in DOCS:
        w.write(d.encode())
    w.close()
    assert list(read_documents(str(tmp_path / "t.array_record"))) == DOCS
    data = (tmp_path / "t.array_record").read_bytes()
    (tmp_path / "t.array_record").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        list(read_documents(str(tmp_path / "t.array_record")))
    (tmp_path / "x.bin").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="holds token ids"):
        list(read_documents(str(tmp_path / "x.bin")))
