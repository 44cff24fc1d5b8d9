"""Tokenizers against the libraries' own encoders: bytes, Hugging Face, SentencePiece."""

import io
import json
import pathlib

import pytest
import sentencepiece as spm
import tokenizers as hf

from jaxnv.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    load_saved,
    load_tokenizer,
    train_bpe,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x * 2  # doubles\n",
    "Grüße, naïve café — 東京 🙂",
    "the the the quick quick fox fox fox dog",
] * 8
SAMPLE = "Quick foxes: naïve 東京 code(x) 🙂\n"


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(TEXTS, 300)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    """A tiny SentencePiece model trained here (no download)."""
    out = io.BytesIO()
    lines = [t for t in TEXTS for _ in range(4)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        vocab_size=340,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("sp") / "tiny.model"
    path.write_bytes(out.getvalue())
    return str(path)


def test_bytes_are_utf8():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.encode(SAMPLE) == list(SAMPLE.encode("utf-8"))
    assert tok.encode_batch(TEXTS[:3]) == [list(t.encode()) for t in TEXTS[:3]]
    assert [a.tolist() for a in tok.encode_arrays(TEXTS[:3], "<u2")] == tok.encode_batch(TEXTS[:3])
    assert tok.decode(tok.encode(SAMPLE) + [tok.eos_id]) == SAMPLE


def test_train_bpe_is_deterministic_and_matches_the_library(bpe, tmp_path):
    again = train_bpe(TEXTS, 300)
    assert again.tok.get_vocab() == bpe.tok.get_vocab()
    assert again.fingerprint == bpe.fingerprint
    assert bpe.vocab_size == 300 and bpe.eos_id == bpe.tok.token_to_id("<|endoftext|>") == 0
    # the independent reference: the library itself, reading the saved file
    bpe.save(tmp_path)
    ref = hf.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in [SAMPLE, *TEXTS[:4]]:
        ids = bpe.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids
        assert max(ids) < bpe.vocab_size
        assert bpe.decode(ids) == text  # byte-level: every text round-trips
    assert bpe.encode_batch(TEXTS[:4]) == [e.ids for e in ref.encode_batch(TEXTS[:4])]


def test_train_bpe_from_files_equals_from_texts(tmp_path):
    paths = []
    for i, text in enumerate(TEXTS[:4]):
        paths.append(tmp_path / f"{i}.txt")
        paths[-1].write_text(text)
    from_files = load_tokenizer("bpe:280", [str(p) for p in paths])
    from_paths = train_bpe(paths, 280)  # PathLike items: the library reads the files
    assert from_files.encode(SAMPLE) == from_paths.encode(SAMPLE)
    assert from_files.vocab_size == 280


def _word_level(special=("<unk>",)) -> hf.Tokenizer:
    vocab = {w: i for i, w in enumerate([*special, "quick", "fox", "the", "dog"])}
    tok = hf.Tokenizer(hf.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = hf.pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(special))
    return tok


def test_tokenizer_json_eos_templates_and_truncation(tmp_path):
    lib = _word_level(("<unk>", "<s>", "</s>"))
    lib.post_processor = hf.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    lib.enable_truncation(max_length=2)  # a saved setting that must not cut documents
    path = tmp_path / "tokenizer.json"
    lib.save(str(path))
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer) and tok.eos_id == 2  # </s>
    text = "the quick fox the dog"
    ref = hf.Tokenizer.from_file(str(path))
    ref.no_truncation()
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids == [5, 3, 4, 5, 6]
    assert load_tokenizer(str(tmp_path)).fingerprint == tok.fingerprint  # the directory form


def test_eos_from_tokenizer_config_else_added(tmp_path):
    lib = _word_level(("<unk>", "</s>", "<|im_end|>"))
    lib.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<|im_end|>"}})
    )
    assert load_tokenizer(str(tmp_path)).eos_id == lib.token_to_id("<|im_end|>")

    bare = _word_level()
    bare.save(str(tmp_path / "bare.json"))
    tok = load_tokenizer(str(tmp_path / "bare.json"))
    assert tok.eos_id == 5 and tok.vocab_size == 6  # appended after the 5 existing ids
    assert tok.tok.id_to_token(tok.eos_id) == "<|endoftext|>"


def test_sentencepiece_matches_the_library(sp_model):
    tok = load_tokenizer(sp_model)
    ref = spm.SentencePieceProcessor(model_file=sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.eos_id) == (ref.get_piece_size(), ref.eos_id())
    for text in [SAMPLE, *TEXTS[:4]]:
        assert tok.encode(text) == ref.encode(text)
    assert tok.encode_batch(TEXTS[:4]) == ref.encode(TEXTS[:4])
    assert tok.decode(tok.encode(TEXTS[0])) == ref.decode(ref.encode(TEXTS[0]))


@pytest.mark.parametrize("kind", ["bytes", "hf", "sentencepiece"])
def test_save_and_load_saved_round_trip(kind, bpe, sp_model, tmp_path):
    tok = {"bytes": ByteTokenizer(), "hf": bpe, "sentencepiece": load_tokenizer(sp_model)}[kind]
    tok.save(tmp_path / "tok")
    back = load_saved(tmp_path / "tok")
    assert type(back) is type(tok)
    assert (back.fingerprint, back.eos_id, back.vocab_size) == (
        tok.fingerprint,
        tok.eos_id,
        tok.vocab_size,
    )
    assert back.encode_batch([SAMPLE, *TEXTS[:3]]) == tok.encode_batch([SAMPLE, *TEXTS[:3]])
    assert load_tokenizer(str(tmp_path / "tok")).fingerprint == tok.fingerprint


def test_save_writes_each_file_whole_and_the_meta_last(bpe, tmp_path, monkeypatch):
    """Another process of the same run may read the directory while one saves it (seen in CI:
    an empty jaxnv_tokenizer.json): each file appears whole, the one readers look for last."""
    import os

    appeared, replace = [], os.replace

    def recording_replace(src, dst):
        appeared.append((os.path.basename(dst), os.path.getsize(src)))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    bpe.save(tmp_path / "tok")
    names = [name for name, _ in appeared]
    assert names == ["tokenizer.json", "jaxnv_tokenizer.json"]
    assert all(size > 0 for _, size in appeared)
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == sorted(names)  # no .tmp left


def test_fingerprints_differ_and_edits_are_caught(bpe, tmp_path):
    other = train_bpe(TEXTS, 290)
    assert len({ByteTokenizer().fingerprint, bpe.fingerprint, other.fingerprint}) == 3
    bpe.save(tmp_path)
    other.save(tmp_path / "o")
    (tmp_path / "tokenizer.json").write_bytes((tmp_path / "o" / "tokenizer.json").read_bytes())
    with pytest.raises(ValueError, match="changed after it was saved"):
        load_saved(tmp_path)


@pytest.mark.parametrize(
    ("spec", "files", "error", "match"),
    [
        ("gpt7", (), ValueError, "unknown tokenizer='gpt7'.*bpe:VOCAB"),
        ("nowhere/tokenizer.json", (), FileNotFoundError, "does not exist"),
        ("missing.model", (), FileNotFoundError, "does not exist"),
        ("bpe:512", (), ValueError, "none were given"),
        ("bpe:lots", ("x.txt",), ValueError, "integer VOCAB"),
        ("bpe:100", ("x.txt",), ValueError, "VOCAB >= 257"),
    ],
)
def test_bad_specs_fail_in_one_line(spec, files, error, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pathlib.Path("x.txt").write_text("some text")
    with pytest.raises(error, match=match) as e:
        load_tokenizer(spec, files)
    assert "\n" not in str(e.value)


def test_bad_files_fail_in_one_line(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "bad.model").write_bytes(b"\x00garbage")
    (tmp_path / "empty").mkdir()
    for path, match in [("bad.json", "not a Hugging Face"), ("bad.model", "not a SentencePiece")]:
        with pytest.raises(ValueError, match=match) as e:
            load_tokenizer(str(tmp_path / path))
        assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="without tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no saved tokenizer"):
        load_saved(tmp_path / "empty")
