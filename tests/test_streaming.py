"""Streamed language-model batches (text, JSONL, Parquet) against numpy references."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxnv.data.streaming import stream_dataset


class ByteTok:
    """The tokenizer contract at its simplest: UTF-8 bytes, eos 256."""

    eos_id, vocab_size = 256, 257

    def encode(self, text):
        return list(text.encode())


def make_texts(n, seed):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "é", "λx", "stream", "pack"]
    return [" ".join(rng.choice(words, int(k))) for k in rng.integers(1, 12, n)]


def write_sources(tmp_path, texts, fmt, files):
    """`texts` spread over `files` files of `fmt`; returns the paths and the texts in file order."""
    paths, parts = [], np.array_split(np.arange(len(texts)), files)
    for f, idx in enumerate(parts):
        chunk = [texts[i] for i in idx]
        if fmt == "jsonl":
            p = tmp_path / f"part-{f}.jsonl"
            p.write_text(
                "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(chunk))
            )
        else:
            p = tmp_path / f"part-{f}.parquet"
            pq.write_table(
                pa.table({"id": list(range(len(chunk))), "text": chunk}), p, row_group_size=5
            )
        paths.append(str(p))
    return paths


def read_back(paths, fmt):
    """The documents of `paths` read by the libraries themselves (json, pyarrow)."""
    if fmt == "jsonl":
        return [json.loads(line)["text"] for p in paths for line in open(p)]
    return [t for p in paths for t in pq.read_table(p).column("text").to_pylist()]


def take(it, n):
    return [next(it) for _ in range(n)]


def test_stream_windows_equal_the_tokenized_concatenation(tmp_path):
    paths = write_sources(tmp_path, make_texts(40, 0), "jsonl", 3)
    docs = read_back(paths, "jsonl")
    stream = np.concatenate([list(t.encode()) + [256] for t in docs])
    T, B = 10, 2
    n = len(stream) // (T + 1) // B * B
    ref = stream[: n * (T + 1)].reshape(n, T + 1)
    ds = stream_dataset(paths, "jsonl", "text", ByteTok(), T, B, shuffle_files=False, num_epochs=1)
    got = list(ds)
    assert got[0]["x"].dtype == np.int32 and got[0]["x"].shape == (B, T)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in got]), ref[:, :-1])
    np.testing.assert_array_equal(np.concatenate([b["y"] for b in got]), ref[:, 1:])


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("packing", [False, True])
def test_stream_resume_from_saved_state_is_exact(tmp_path, fmt, packing):
    paths = write_sources(tmp_path, make_texts(30, 1), fmt, 2)
    ds = stream_dataset(
        paths, fmt, "text", ByteTok(), seq_len=16, batch_size=4, packing=packing, seed=3
    )
    it = iter(ds)
    take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # the checkpoint stores it as JSON
    after = take(it, 25)  # crosses epochs: the files are reshuffled each epoch
    fresh = iter(ds)
    fresh.set_state(state)
    again = take(fresh, 25)
    for a, b in zip(after, again, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    if packing:
        assert set(after[0]) == {"x", "y", "segment_ids", "positions", "weights"}


def segments(batches):
    """The token runs of every segment of packed batches (visible in x, plus y's last)."""
    out = []
    for b in batches:
        for x, y, seg, w in zip(b["x"], b["y"], b["segment_ids"], b["weights"], strict=True):
            for s in np.unique(seg[seg > 0]):
                where = np.flatnonzero(seg == s)
                run = list(x[where]) + ([y[where[-1]]] if w[where[-1]] else [])
                out.append(tuple(int(t) for t in run))
    return sorted(out)


@pytest.mark.parametrize("files", [1, 4])
def test_stream_processes_read_disjoint_documents(tmp_path, files):
    texts = [f"document number {i} " * (i % 3 + 1) for i in range(24)]
    paths = write_sources(tmp_path, texts, "parquet", files)
    kw = {"packing": True, "seed": 0, "num_epochs": 1, "shuffle_files": False}
    one = list(stream_dataset(paths, "parquet", "text", ByteTok(), 64, 1, **kw))
    two = [
        list(
            stream_dataset(
                paths, "parquet", "text", ByteTok(), 64, 2, process_index=p, process_count=2, **kw
            )
        )
        for p in range(2)
    ]
    assert segments(two[0] + two[1]) == segments(one)
    assert len(segments(one)) == 24  # each document once (all fit in a row)
    assert not set(segments(two[0])) & set(segments(two[1]))
    assert all(b["x"].shape == (1, 64) for b in two[0])


def test_stream_errors_are_one_line(tmp_path):
    paths = write_sources(tmp_path, make_texts(4, 2), "parquet", 1)
    with pytest.raises(ValueError, match="set data.field"):
        next(iter(stream_dataset(paths, "parquet", "body", ByteTok(), 8, 1)))
    with pytest.raises(ValueError, match="cannot be streamed"):
        stream_dataset(paths, "csv", "text", ByteTok(), 8, 1)
    numbers = tmp_path / "n.jsonl"
    numbers.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="not text"):
        next(iter(stream_dataset([str(numbers)], "jsonl", "text", ByteTok(), 8, 1)))
    with pytest.raises(FileNotFoundError, match="check data.path"):
        stream_dataset([str(tmp_path / "none.jsonl")], "jsonl", "text", ByteTok(), 8, 1)


def test_stream_text_files_are_one_document_each_and_gzip_jsonl_reads(tmp_path):
    texts = make_texts(6, 5)
    for i, t in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(t)
    paths = [str(tmp_path / f"doc{i}.txt") for i in range(6)]
    kw = {"packing": True, "num_epochs": 1, "shuffle_files": False}
    got = segments(list(stream_dataset(paths, "text", "text", ByteTok(), 128, 1, **kw)))
    assert got == sorted(tuple(list(t.encode()) + [256]) for t in texts)
    gz = tmp_path / "docs.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    it = iter(stream_dataset([str(gz)], "jsonl", "text", ByteTok(), 24, 1, **kw))
    next(it)
    state = it.get_state()
    rest = [b["x"] for b in it]
    fresh = iter(stream_dataset([str(gz)], "jsonl", "text", ByteTok(), 24, 1, **kw))
    fresh.set_state(state)
    assert len(rest) > 1 and all(
        np.array_equal(a, b["x"]) for a, b in zip(rest, fresh, strict=True)
    )


def test_stream_reads_a_json_array_like_the_file_readers(tmp_path):
    from jaxnv.data.files import read_documents

    texts = make_texts(12, 7)
    path = tmp_path / "docs.json"
    path.write_text("\n " + json.dumps([{"text": t, "id": i} for i, t in enumerate(texts)]))
    assert list(read_documents(str(path))) == texts
    kw = {"packing": True, "num_epochs": 1, "shuffle_files": False}
    got = segments(list(stream_dataset([str(path)], "jsonl", "text", ByteTok(), 128, 1, **kw)))
    assert got == sorted(tuple(list(t.encode()) + [256]) for t in texts)
    it = iter(stream_dataset([str(path)], "jsonl", "text", ByteTok(), 8, 1, **kw))
    take(it, 3)
    state = it.get_state()  # its offset is a record index
    rest = [b["x"] for b in it]
    fresh = iter(stream_dataset([str(path)], "jsonl", "text", ByteTok(), 8, 1, **kw))
    fresh.set_state(state)
    again = [b["x"] for b in fresh]
    assert len(rest) > 1 and len(again) == len(rest)
    assert all(np.array_equal(a, b) for a, b in zip(rest, again, strict=True))
    path.write_text(json.dumps([{"text": "fine"}, {"body": "no text"}]))
    with pytest.raises(ValueError, match="record 2: not a JSON object with a 'text'") as e:
        list(stream_dataset([str(path)], "jsonl", "text", ByteTok(), 4, 1, **kw))
    assert "\n" not in str(e.value)


def test_stream_reads_parquet_in_bounded_batches_and_resumes_mid_group(tmp_path, monkeypatch):
    import jaxnv.data.streaming as streaming

    texts = make_texts(90, 8)
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=40)  # groups of 40, 40, 10
    monkeypatch.setattr(streaming, "PARQUET_BATCH_ROWS", 7)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", None)  # never a whole row group
    monkeypatch.setattr(pq.ParquetFile, "read", None)
    seen = []
    iter_batches = pq.ParquetFile.iter_batches

    def recording(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            seen.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", recording)
    kw = {"packing": True, "num_epochs": 1, "shuffle_files": False}
    ds = stream_dataset([str(path)], "parquet", "text", ByteTok(), 128, 1, **kw)
    assert segments(list(ds)) == sorted(tuple(list(t.encode()) + [256]) for t in texts)
    assert seen and max(seen) <= 7
    whole = [b["x"] for b in stream_dataset([str(path)], "parquet", "text", ByteTok(), 8, 2, **kw)]
    for cut in (5, 90, 130, 150):  # resumes at rows 3, 48, 72, 81: inside batches and groups
        it = iter(stream_dataset([str(path)], "parquet", "text", ByteTok(), 8, 2, **kw))
        take(it, cut)
        state = json.loads(json.dumps(it.get_state()))
        assert state["parent"]["offset"] in (3, 48, 72, 81)
        fresh = iter(stream_dataset([str(path)], "parquet", "text", ByteTok(), 8, 2, **kw))
        fresh.set_state(state)
        rest = [b["x"] for b in fresh]
        assert len(rest) == len(whole) - cut
        assert all(np.array_equal(a, b) for a, b in zip(whole[cut:], rest, strict=True))
