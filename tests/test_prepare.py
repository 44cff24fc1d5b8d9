"""`prepare`: shards read back with the raw ArrayRecord reader equal the tokenizer's own encode."""

import fcntl
import json
import os
import threading
import time

import numpy as np
import pytest
import tokenizers as hf
from array_record.python.array_record_module import ArrayRecordReader

from jaxnv.data.prepare import main, open_shards, prepare, read_manifest
from jaxnv.data.tokenizers import Tokenizer, load_saved

DOCS = [f"document {i}: " + "naïve text 東京 " * (i % 5) + "end" for i in range(23)]
DOCS[4] = ""  # empty documents are skipped


def _corpus(directory, docs=DOCS, files=3):
    directory.mkdir(parents=True, exist_ok=True)
    for k in range(files):
        with open(directory / f"part-{k}.jsonl", "w") as f:
            for d in docs[k::files]:
                f.write(json.dumps({"text": d}) + "\n")
    # document order = file order, then line order
    return [d for k in range(files) for d in docs[k::files]]


def _records(out_dir, manifest) -> list[np.ndarray]:
    """Every record through the raw array_record reader, decoded with np.frombuffer."""
    out = []
    for shard in manifest["shards"]:
        r = ArrayRecordReader(str(out_dir / shard["path"]))
        out += [np.frombuffer(b, manifest["dtype"]) for b in r.read_all()]
        r.close()
    return out


def _snapshot(directory):
    return {
        p: (os.stat(p).st_mtime_ns, open(p, "rb").read())
        for p in sorted(str(q) for q in directory.rglob("*") if q.is_file())
    }


def test_bytes_shards_equal_utf8_and_lengths_sum(tmp_path):
    docs = _corpus(tmp_path / "in")
    out = tmp_path / "out"
    m = prepare(str(tmp_path / "in"), out, docs_per_shard=5, progress=False)
    want = [list(d.encode()) for d in docs if d]
    got = _records(out, m)
    assert [r.tolist() for r in got] == want
    assert m["format"] == "jaxnv-tokens/1" and m["complete"] and m["dtype"] == "uint16"
    assert m["tokenizer"]["kind"] == "bytes" and m["tokenizer"]["eos_id"] == 256
    assert [s["documents"] for s in m["shards"]] == [5, 5, 5, 5, 2]
    assert [s["path"] for s in m["shards"]][:2] == [
        "shard-00000.array_record",
        "shard-00001.array_record",
    ]
    lengths = np.load(out / "lengths.npy", allow_pickle=False)
    assert lengths.dtype == np.int64 and lengths.tolist() == [len(w) for w in want]
    assert lengths.sum() == m["tokens"] == sum(s["tokens"] for s in m["shards"])
    assert m["documents"] == len(want) == 22
    assert json.loads((out / "manifest.json").read_text()) == m
    assert load_saved(out / "tokenizer").fingerprint == m["tokenizer"]["fingerprint"]
    assert sorted(os.listdir(out)) == sorted(
        [".prepare.lock", "manifest.json", "lengths.npy", "tokenizer"]
        + [s["path"] for s in m["shards"]]
    )  # the temporary directory is gone


def test_bpe_is_trained_on_the_inputs_and_matches_the_library(tmp_path):
    docs = _corpus(tmp_path / "in")
    out = tmp_path / "out"
    m = prepare(str(tmp_path / "in/*.jsonl"), out, tokenizer="bpe:300", progress=False)
    assert m["tokenizer"]["vocab_size"] == 300 and m["tokenizer"]["spec"] == "bpe:300"
    ref = hf.Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    want = [ref.encode(d, add_special_tokens=False).ids for d in docs if d]
    assert [r.tolist() for r in _records(out, m)] == want
    assert ref.token_to_id("<|endoftext|>") == m["tokenizer"]["eos_id"]


def test_rerun_returns_the_manifest_without_rewriting(tmp_path):
    _corpus(tmp_path / "in")
    out = tmp_path / "out"
    m = prepare(str(tmp_path / "in"), out, tokenizer="bpe:280", progress=False)
    before = _snapshot(out)
    assert prepare(str(tmp_path / "in"), out, tokenizer="bpe:280", progress=False) == m
    assert _snapshot(out) == before  # same bytes, same mtimes: nothing redone


def test_another_preparation_is_refused_and_nothing_changes(tmp_path):
    _corpus(tmp_path / "in")
    (tmp_path / "other.txt").write_text("other corpus")
    out = tmp_path / "out"
    prepare(str(tmp_path / "in"), out, progress=False)
    before = _snapshot(out)
    for inputs, tok in [(str(tmp_path / "other.txt"), "bytes"), (str(tmp_path / "in"), "bpe:300")]:
        with pytest.raises(ValueError, match="holds a preparation of other inputs/tokenizer") as e:
            prepare(inputs, out, tokenizer=tok, progress=False)
        assert "\n" not in str(e.value)
    (tmp_path / "in" / "part-0.jsonl").write_text('{"text": "edited"}\n')  # same path, new content
    with pytest.raises(ValueError, match="other inputs"):
        prepare(str(tmp_path / "in"), out, progress=False)
    assert _snapshot(out) == before


def test_a_second_prepare_waits_for_the_lock(tmp_path):
    _corpus(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    results = []
    with open(out / ".prepare.lock", "w") as held:  # another process is preparing
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = threading.Thread(
            target=lambda: results.append(prepare(str(tmp_path / "in"), out, progress=False))
        )
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive() and not (out / "manifest.json").exists()
    waiter.join(timeout=60)
    assert results and results[0]["complete"] and (out / "manifest.json").exists()


def test_interrupted_run_is_redone_cleanly(tmp_path):
    docs = _corpus(tmp_path / "in")
    out = tmp_path / "out"
    (out / ".prepare-dead" / "tokenizer").mkdir(parents=True)
    (out / ".prepare-started").write_text("")  # the mark the interrupted run wrote first
    (out / "shard-00007.array_record").write_bytes(b"stale")  # left by a run that died
    (out / "notes.txt").write_text("the user's own file")
    m = prepare(str(tmp_path / "in"), out, docs_per_shard=100, progress=False)
    assert sorted(os.listdir(out)) == [
        ".prepare.lock",
        "lengths.npy",
        "manifest.json",
        "notes.txt",
        "shard-00000.array_record",
        "tokenizer",
    ]
    assert [r.tolist() for r in _records(out, m)] == [list(d.encode()) for d in docs if d]


def test_files_prepare_did_not_write_are_never_deleted(tmp_path):
    docs = _corpus(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "lengths.npy").write_bytes(b"the user's own lengths")
    (out / "shard-00000.array_record").write_bytes(b"the user's own shard")
    before = _snapshot(out)
    with pytest.raises(ValueError, match="already holds files jaxnv did not write") as e:
        prepare(str(tmp_path / "in"), out, progress=False)
    assert "\n" not in str(e.value) and "lengths.npy" in str(e.value)
    assert {p: v for p, v in _snapshot(out).items() if not p.endswith(".prepare.lock")} == before
    assert not (out / ".prepare-started").exists()
    # an empty --out (or one holding only the lock) is prepared, and the mark goes with the run
    m = prepare(str(tmp_path / "in"), tmp_path / "fresh", progress=False)
    assert not (tmp_path / "fresh" / ".prepare-started").exists()
    assert [r.tolist() for r in _records(tmp_path / "fresh", m)] == [
        list(d.encode()) for d in docs if d
    ]


def test_workers_write_the_same_shards(tmp_path):
    _corpus(tmp_path / "in", [d * 40 for d in DOCS] * 20, files=4)
    # a trained tokenizer, so that the workers reload a real one from disk
    m0 = prepare(
        str(tmp_path / "in"),
        tmp_path / "w0",
        tokenizer="bpe:300",
        docs_per_shard=64,
        progress=False,
    )
    tok_dir = str(tmp_path / "w0" / "tokenizer")
    m2 = prepare(
        str(tmp_path / "in"),
        tmp_path / "w2",
        tokenizer=tok_dir,
        num_workers=2,
        docs_per_shard=64,
        progress=False,
    )
    assert m2["tokenizer"]["fingerprint"] == m0["tokenizer"]["fingerprint"]
    assert m2["shards"] == m0["shards"] and len(m0["shards"]) > 2
    for s in m0["shards"]:
        assert (tmp_path / "w0" / s["path"]).read_bytes() == (
            tmp_path / "w2" / s["path"]
        ).read_bytes()


class _Chars(Tokenizer):
    """Unicode code points as ids: a vocabulary over 65536, so shards hold uint32."""

    kind, vocab_size, eos_id = "chars", 0x110000, 0

    def encode_batch(self, texts):
        return [[ord(c) for c in t] for t in texts]

    def decode(self, ids):
        return "".join(map(chr, ids))

    def _payload(self):
        return b"code points"


def test_large_vocabularies_use_little_endian_uint32(tmp_path):
    (tmp_path / "a.txt").write_text("emoji 🙂 and 東京")
    out = tmp_path / "out"
    m = prepare(str(tmp_path / "a.txt"), out, tokenizer=_Chars(), progress=False)
    assert m["dtype"] == "uint32"
    r = ArrayRecordReader(str(out / "shard-00000.array_record"))
    raw = r.read_all()[0]
    r.close()
    assert np.frombuffer(raw, "<u4").tolist() == [ord(c) for c in "emoji 🙂 and 東京"]
    with pytest.raises(ValueError, match="num_workers=0"):
        prepare(str(tmp_path / "a.txt"), tmp_path / "o2", tokenizer=_Chars(), num_workers=2)


def test_open_shards_and_its_errors(tmp_path):
    docs = _corpus(tmp_path / "in")
    out = tmp_path / "out"
    m = prepare(str(tmp_path / "in"), out, docs_per_shard=8, progress=False)
    manifest, source = open_shards(out)
    assert manifest == m and len(source) == m["documents"]
    want = [d for d in docs if d]
    assert [
        bytes(np.frombuffer(source[i], m["dtype"]).astype(np.uint8)).decode()
        for i in range(len(source))
    ] == want

    shard = out / m["shards"][1]["path"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"shard .*shard-00001.array_record is truncated") as e:
        open_shards(out)
    assert "\n" not in str(e.value)
    shard.write_bytes(b"")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        open_shards(out)

    m_path = out / "manifest.json"
    m_path.write_text(json.dumps({**m, "complete": False}))
    with pytest.raises(ValueError, match="not complete"):
        read_manifest(out)
    m_path.unlink()
    with pytest.raises(FileNotFoundError, match="holds no manifest.json"):
        open_shards(out)


def test_bad_inputs_fail_in_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file matches") as e:
        prepare(str(tmp_path / "*.jsonl"), tmp_path / "out", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    _corpus(tmp_path / "in", ["", ""], files=1)
    m = prepare(str(tmp_path / "in"), tmp_path / "out", progress=False)
    assert m["documents"] == 0 and m["shards"] == []
    with pytest.raises(ValueError, match="holds no documents"):
        open_shards(tmp_path / "out")
    with pytest.raises(ValueError, match="lies inside --out"):
        prepare(str(tmp_path / "in"), tmp_path, progress=False)


def test_main_prints_a_summary(tmp_path, capsys):
    docs = _corpus(tmp_path / "in")
    m = main(
        ["--input", str(tmp_path / "in/*.jsonl"), "--out", str(tmp_path / "out"), "--field", "text"]
    )
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert m["tokens"] == sum(len(d.encode()) for d in docs)
    assert f"{m['documents']} documents, {m['tokens']:,} tokens" in line and "MB/s" in line
