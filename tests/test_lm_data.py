"""Language-model batches: prepared corpora and token files, against numpy references.

Streamed batches (text, JSONL, Parquet) are tested in tests/test_streaming.py.
"""

import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from jaxnv.data.lm import (
    PackedBatches,
    PreparedCorpus,
    TokenFileBatches,
    WindowBatches,
    _max_id,
)

EOS = 7


def write_prepared(directory, docs, shards=2, dtype="uint16", eos_id=EOS, vocab=300):
    """A prepared directory in the `jaxnv data prepare` layout, written with the raw writer."""
    directory.mkdir(parents=True, exist_ok=True)
    entries, per = [], -(-len(docs) // shards)
    for s in range(shards):
        part = docs[s * per : (s + 1) * per]
        name = f"shard-{s:05d}.array_record"
        writer = ArrayRecordWriter(str(directory / name), "group_size:1")
        for d in part:
            writer.write(np.asarray(d, dtype=np.dtype(dtype).newbyteorder("<")).tobytes())
        writer.close()
        entries.append({"path": name, "documents": len(part), "tokens": int(sum(map(len, part)))})
    np.save(directory / "lengths.npy", np.array([len(d) for d in docs], dtype=np.int64))
    manifest = {
        "format": "jaxnv-tokens/1",
        "tokenizer": {"kind": "test", "fingerprint": "0", "vocab_size": vocab, "eos_id": eos_id},
        "dtype": dtype,
        "shards": entries,
        "documents": len(docs),
        "tokens": int(sum(map(len, docs))),
        "complete": True,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def random_docs(n=60, seed=0, high=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(10, 300, int(k)).astype(np.int64) for k in rng.integers(1, high, n)]


def raw_docs(directory):
    """Every record of the shards, read with the raw ArrayRecordReader (independent reference)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    out = []
    for shard in manifest["shards"]:
        reader = ArrayRecordReader(str(directory / shard["path"]))
        out += [np.frombuffer(r, dtype="<u2") for r in reader.read_all()]
        reader.close()
    return out


@pytest.fixture
def corpus(tmp_path):
    return PreparedCorpus(write_prepared(tmp_path / "prep", random_docs()))


def test_corpus_reads_documents_and_splits_whole_documents(corpus, tmp_path):
    ref = raw_docs(tmp_path / "prep")
    assert len(corpus) == len(ref)
    assert all(np.array_equal(corpus.doc(i), d) for i, d in enumerate(ref))
    train, held = corpus.split(0.2, seed=3)
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(len(ref)))
    assert 0 < len(held) < len(ref) / 2 and np.array_equal(held, corpus.split(0.2, seed=3)[1])
    assert len(corpus.split(1e-9)[1]) == 1  # a positive fraction holds out at least one document
    assert len(corpus.split(0.0)[1]) == 0


def test_corpus_refuses_a_missing_or_incomplete_preparation(tmp_path):
    with pytest.raises(FileNotFoundError, match="jaxnv data prepare"):
        PreparedCorpus(tmp_path / "nothing")
    d = write_prepared(tmp_path / "p", random_docs(5))
    manifest = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ValueError, match="not complete"):
        PreparedCorpus(d)
    (d / "manifest.json").write_text(json.dumps(manifest))
    shard = d / manifest["shards"][0]["path"]
    shard.write_bytes(shard.read_bytes()[:-20])  # truncated
    with pytest.raises(ValueError, match=shard.name):
        PreparedCorpus(d)


def reference_windows(docs, ids, seq_len):
    """The documents `ids` concatenated with eos after each, cut into windows of seq_len + 1."""
    stream = np.concatenate([np.append(docs[i], EOS) for i in ids])
    n = len(stream) // (seq_len + 1)
    return stream[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def test_window_batches_equal_slices_of_the_concatenation(corpus, tmp_path):
    ref_docs = raw_docs(tmp_path / "prep")
    train, _ = corpus.split(0.1, seed=0)
    T, B, seed = 16, 4, 5
    wb = WindowBatches(corpus, train, seq_len=T, batch_size=B, seed=seed)
    ref = reference_windows(ref_docs, train, T)
    assert wb.num_examples == len(ref)
    perm0 = np.random.default_rng([seed, 0]).permutation(len(ref))  # StepBatches' epoch order
    perm1 = np.random.default_rng([seed, 1]).permutation(len(ref))
    stream = np.concatenate([perm0, perm1])
    for step in (0, 1, len(ref) // B):  # the last one straddles two epochs when B does not divide
        batch = wb[step]
        rows = ref[stream[step * B : (step + 1) * B]]
        np.testing.assert_array_equal(batch["x"], rows[:, :-1])
        np.testing.assert_array_equal(batch["y"], rows[:, 1:])
        assert batch["x"].dtype == np.int32 and batch["x"].shape == (B, T)
        np.testing.assert_array_equal(wb[step]["x"], batch["x"])  # the same step twice
    evals = list(wb.eval_batches(5))
    np.testing.assert_array_equal(np.concatenate([b["x"] for b, _ in evals]), ref[:, :-1])
    assert sum(n for _, n in evals) == len(ref)


def test_window_batches_per_process_and_iterate(corpus):
    ids = np.arange(len(corpus))
    full = WindowBatches(corpus, ids, seq_len=8, batch_size=4, seed=1)
    parts = [
        WindowBatches(corpus, ids, 8, 4, 1, process_index=p, process_count=2) for p in range(2)
    ]
    for step in (0, 3, 57):
        local = [p.local(step) for p in parts]
        for k in ("x", "y"):
            np.testing.assert_array_equal(np.concatenate([b[k] for b in local]), full[step][k])
    got = list(parts[1].iterate(2, 9))
    for step, batch in zip(range(2, 9), got, strict=True):
        np.testing.assert_array_equal(batch["x"], parts[1].local(step)["x"])
    stacked = list(full.iterate(0, 5, put=lambda b: b))  # the stacked chunk path
    for step, batch in enumerate(stacked):
        np.testing.assert_array_equal(np.asarray(batch["y"]), full[step]["y"])
    assert WindowBatches.holds_global is True


def test_window_batches_read_only_the_records_a_batch_needs(corpus):
    reads = []
    source = corpus.source

    class Counting:
        def __getitems__(self, keys):
            reads.extend(keys)
            return source.__getitems__(keys)

    corpus.source = Counting()
    wb = WindowBatches(corpus, np.arange(len(corpus)), seq_len=8, batch_size=2, seed=0)
    wb[0]
    assert 0 < len(reads) <= 2 * (8 // 1 + 2) and len(reads) < len(corpus) // 3


def test_packed_batches_rows_hold_the_documents_pieces(tmp_path):
    docs = random_docs(40, seed=4, high=30)  # some longer than a row: split into pieces
    corpus = PreparedCorpus(write_prepared(tmp_path / "prep", docs))
    ref = [np.append(d, EOS) for d in raw_docs(tmp_path / "prep")]
    T, ids = 12, np.arange(3, 40)
    pb = PackedBatches(corpus, ids, seq_len=T, batch_size=1, seed=2)
    plan = pb.plan(0)
    # the plan covers every piece of every chosen document exactly once
    expected = sorted(
        (int(i), s, min(T + 1, len(ref[i]) - s)) for i in ids for s in range(0, len(ref[i]), T + 1)
    )
    assert sorted(p for row in plan for p in row) == expected
    for step, row in enumerate(plan):  # batch_size 1: step r is row r of epoch 0
        b = pb[step]
        tokens = np.concatenate([b["x"][0, :1], b["y"][0]])  # the row's T + 1 tokens
        at = 0
        for s, (doc, start, n) in enumerate(row, start=1):
            np.testing.assert_array_equal(tokens[at : at + n], ref[doc][start : start + n])
            seg = b["segment_ids"][0, at : at + n]
            assert (seg[: T - at] == s).all()
            np.testing.assert_array_equal(
                b["positions"][0, at : min(at + n, T)], np.arange(min(n, T - at))
            )
            w = b["weights"][0, at : min(at + n, T)]
            assert (w[: n - 1] == 1).all() and (at + n > T or w[n - 1] == 0)
            at += n
        assert (b["segment_ids"][0, at:] == 0).all() and (
            b["weights"][0, max(at - 1, 0) :] == 0
        ).all()
    assert pb.plan(1) != plan  # reshuffled per epoch
    np.testing.assert_array_equal(
        pb[len(plan)]["x"], PackedBatches(corpus, ids, T, 1, 2)[len(plan)]["x"]
    )
    two = [PackedBatches(corpus, ids, T, 4, 2, process_index=p, process_count=2) for p in range(2)]
    four = PackedBatches(corpus, ids, T, 4, 2)
    for step in (0, 5):
        for k in ("x", "segment_ids", "weights"):
            joined = np.concatenate([p.local(step)[k] for p in two])
            np.testing.assert_array_equal(joined, four[step][k])
    evals = list(pb.eval_batches(3))
    assert sum(n for _, n in evals) == len(pb.plan(None))


def test_token_file_windows_equal_slices_of_fromfile(tmp_path):
    path = tmp_path / "train.bin"
    data = np.random.default_rng(0).integers(0, 50000, 5000).astype(np.uint16)
    data.tofile(path)
    ref = np.fromfile(path, dtype=np.uint16)
    tb = TokenFileBatches(path, "uint16", seq_len=32, batch_size=6, seed=9)
    for step in (0, 7):
        offsets = np.random.default_rng([9, step]).integers(0, len(ref) - 32, 6)
        rows = np.stack([ref[o : o + 33] for o in offsets]).astype(np.int32)
        batch = tb[step]
        np.testing.assert_array_equal(batch["x"], rows[:, :-1])
        np.testing.assert_array_equal(batch["y"], rows[:, 1:])
    halves = [
        TokenFileBatches(path, "uint16", 32, 6, 9, process_index=p, process_count=2)
        for p in range(2)
    ]
    np.testing.assert_array_equal(np.concatenate([h.local(3)["x"] for h in halves]), tb[3]["x"])
    with pytest.raises(ValueError, match="uint16 or uint32"):
        TokenFileBatches(path, "int8", 32, 6, 9)
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match="check the dtype"):
        TokenFileBatches(tmp_path / "odd.bin", "uint16", 1, 1, 0)


def test_token_file_ids_are_checked_against_the_tokenizer(tmp_path, monkeypatch):
    import jaxnv.data.lm as lm
    from jaxnv.config import DataConfig
    from jaxnv.data.text import files_dataset

    gpt2 = np.random.default_rng(1).integers(0, 50000, 3001).astype(np.uint16)
    gpt2[1234] = 50256
    gpt2.tofile(tmp_path / "train.bin")
    small = np.arange(600, dtype=np.uint32) % 257  # ids 0..256: the bytes tokenizer's
    small.tofile(tmp_path / "bytes.bin")
    monkeypatch.setattr(lm, "_max_id", lambda p, d, chunk_bytes=64: _max_id(p, d, chunk_bytes))
    assert TokenFileBatches(tmp_path / "train.bin", "uint16", 8, 2, 0).max_id == 50256
    assert TokenFileBatches(tmp_path / "bytes.bin", "uint32", 8, 2, 0).max_id == 256
    cfg = DataConfig(name="files", path=str(tmp_path / "train.bin"), format="tokens", seq_len=8)
    with pytest.raises(
        ValueError, match="data.path ids reach 50256 but data.tokenizer has 257"
    ) as e:
        files_dataset(cfg, batch_size=2, seed=0)
    assert "\n" not in str(e.value)
    ok = DataConfig(
        name="files", path=str(tmp_path / "bytes.bin"), format="tokens", seq_len=8,
        token_dtype="uint32", eval_path=str(tmp_path / "bytes.bin"),
    )  # fmt: skip
    assert files_dataset(ok, batch_size=2, seed=0).out_features == 257


def test_token_file_iteration_keeps_memory_small(tmp_path):
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        f.truncate(2 * 1024**3)  # 2 GB, sparse: costs no disk
    code = textwrap.dedent(f"""
        import numpy as np
        from jaxnv.data.lm import TokenFileBatches
        def rss():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        b = TokenFileBatches({str(path)!r}, "uint16", seq_len=1024, batch_size=32, seed=0)
        before = rss()
        for batch in b.iterate(0, 300):
            assert batch["x"].shape == (32, 1024)
        print(rss() - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grew = int(out.stdout.strip().splitlines()[-1])
    assert grew < 300 * 1024**2, f"resident memory grew by {grew / 2**20:.0f} MB"


def make_texts(n, seed):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "é", "λx", "stream", "pack"]
    return [" ".join(rng.choice(words, int(k))) for k in rng.integers(1, 12, n)]


def write_sources(tmp_path, texts, fmt, files):
    """`texts` spread over `files` JSONL files (tests/test_streaming.py also writes Parquet)."""
    assert fmt == "jsonl"
    paths, parts = [], np.array_split(np.arange(len(texts)), files)
    for f, idx in enumerate(parts):
        chunk = [texts[i] for i in idx]
        p = tmp_path / f"part-{f}.jsonl"
        p.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(chunk)))
        paths.append(str(p))
    return paths


def read_back(paths, fmt):
    """The documents of `paths` read by the json library itself."""
    assert fmt == "jsonl"
    return [json.loads(line)["text"] for p in paths for line in open(p)]


def test_prepare_output_reads_back_as_windows(tmp_path):
    from jaxnv.data.prepare import prepare
    from jaxnv.data.tokenizers import ByteTokenizer

    paths = write_sources(tmp_path, make_texts(25, 6), "jsonl", 2)
    prepare(paths, tmp_path / "prep", tokenizer="bytes", progress=False)
    corpus = PreparedCorpus(tmp_path / "prep")
    tok = ByteTokenizer()
    docs = [np.array(tok.encode(t)) for t in read_back(paths, "jsonl")]
    assert corpus.eos_id == tok.eos_id and len(corpus) == len(docs)
    stream = np.concatenate([np.append(d, tok.eos_id) for d in docs])
    wb = WindowBatches(corpus, np.arange(len(corpus)), seq_len=9, batch_size=3, seed=0)
    got = np.concatenate([b["x"] for b, _ in wb.eval_batches(4)])
    n = len(stream) // 10
    np.testing.assert_array_equal(got, stream[: n * 10].reshape(n, 10)[:, :-1])


@pytest.mark.parametrize("packing", [False, True])
def test_prepared_eval_reads_only_the_documents_num_eval_rows_need(tmp_path, monkeypatch, packing):
    from jaxnv.config import DataConfig
    from jaxnv.data.prepare import prepare
    from jaxnv.data.text import eval_rows, files_dataset

    paths = write_sources(tmp_path, make_texts(200, 9), "jsonl", 2)
    prepare(paths, tmp_path / "prep", tokenizer="bytes", progress=False)
    corpus = PreparedCorpus(tmp_path / "prep")
    _, held = corpus.split(0.5, seed=0)
    docs = corpus.docs(held)
    read = []
    real_docs = PreparedCorpus.docs
    monkeypatch.setattr(
        PreparedCorpus, "docs", lambda self, ids: read.append(len(ids)) or real_docs(self, ids)
    )
    cfg = DataConfig(
        name="files", path=str(tmp_path / "prep"), seq_len=16, eval_fraction=0.5, num_eval=3,
        packing=packing,
    )  # fmt: skip
    got = files_dataset(cfg, batch_size=2, seed=0).eval
    lengths = np.array([len(d) + 1 for d in docs])
    need = int(np.searchsorted(np.cumsum(lengths), 3 * 17)) + 1  # docs filling 3 rows of 17
    assert read == [need] and need < len(held) // 4
    want = eval_rows(docs[:need], corpus.eos_id, 16, packing, 3)
    assert got.keys() == want.keys() and len(got["x"]) == 3
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    if not packing:  # windows: the first rows of all the held-out documents
        np.testing.assert_array_equal(got["x"], eval_rows(docs, corpus.eos_id, 16, False, 3)["x"])


def tokens_per_second(batches, steps: int) -> float:
    """Benchmark helper: tokens/s of `iterate` over `steps` steps (prefetching as in training)."""
    start = time.perf_counter()
    n = sum(int(b["x"].size) for b in batches.iterate(0, steps))
    return n / (time.perf_counter() - start)


def test_benchmark_helper_runs(corpus):
    wb = WindowBatches(corpus, np.arange(len(corpus)), seq_len=16, batch_size=4, seed=0)
    assert tokens_per_second(wb, 5) > 0


if __name__ == "__main__":  # python tests/test_lm_data.py DIR: tokens/s over a few-MB corpus
    import pathlib
    import tempfile

    directory = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
    docs = random_docs(4000, seed=0, high=1500)  # ~3 M tokens, ~6 MB
    c = PreparedCorpus(write_prepared(directory / "bench", docs, shards=4))
    ids = np.arange(len(c))
    for cls in (WindowBatches, PackedBatches):
        b = cls(c, ids, seq_len=1024, batch_size=32, seed=0)
        b[0]  # plan / warm caches
        print(f"{cls.__name__}: {tokens_per_second(b, 100) / 1e6:.2f} M tokens/s")
