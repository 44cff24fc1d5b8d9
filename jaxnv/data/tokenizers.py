"""Tokenizers behind one small interface: raw UTF-8 bytes, Hugging Face `tokenizers`, SentencePiece.

    tok = load_tokenizer("bytes")          # or PATH/tokenizer.json, DIR, PATH.model, bpe:N
    ids = tok.encode("hello")              # list[int], no special tokens added
    tok.save("out/tokenizer"); same = load_saved("out/tokenizer")
    assert same.fingerprint == tok.fingerprint

`eos_id` is the document separator that batchers put between documents; `encode` never adds it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

META_FILE = "jaxnv_tokenizer.json"  # what `save` writes beside the tokenizer's own file(s)
# Tried in order when a Hugging Face tokenizer names no eos token (tokenizer_config.json).
EOS_CANDIDATES = (
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<|eot_id|>",
    "<|im_end|>",
    "[SEP]",
)
SPECS = (
    "bytes | PATH/tokenizer.json | DIR (holding tokenizer.json or tokenizer.model) | PATH.model"
    " | bpe:VOCAB"
)


class Tokenizer:
    """What every tokenizer offers: `encode`, `encode_batch`, `decode`, `save`, and its identity.

    Subclasses set `kind`, `vocab_size` (ids lie in `[0, vocab_size)`) and `eos_id`, and
    implement `_payload` (the serialized tokenizer, hashed into `fingerprint`).
    """

    kind: str = ""
    vocab_size: int = 0
    eos_id: int = 0

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode_arrays(self, texts: Sequence[str], dtype: np.dtype | str) -> list[np.ndarray]:
        """`encode_batch` as arrays of `dtype` (what the shard writer stores)."""
        return [np.asarray(ids, dtype=dtype) for ids in self.encode_batch(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def _payload(self) -> bytes:
        raise NotImplementedError

    def _files(self) -> dict[str, bytes]:
        """The tokenizer's own files, by name, that `save` writes."""
        return {}

    @property
    def fingerprint(self) -> str:
        """sha256 over kind, eos id and the serialized tokenizer: equal iff the same tokenizer."""
        h = hashlib.sha256(f"{self.kind}\0{self.eos_id}\0".encode())
        h.update(self._payload())
        return h.hexdigest()

    def save(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer's own file(s) and `jaxnv_tokenizer.json` into `directory`, each
        atomically and the latter last: a reader that finds it (another process of the same
        run) finds every file whole."""
        os.makedirs(directory, exist_ok=True)
        meta = {
            "kind": self.kind,
            "eos_id": self.eos_id,
            "vocab_size": self.vocab_size,
            "fingerprint": self.fingerprint,
        }
        files = {**self._files(), META_FILE: json.dumps(meta, indent=1).encode()}
        for name, data in files.items():  # dicts keep order: META_FILE last
            path = os.path.join(directory, name)
            with open(path + ".tmp", "wb") as f:
                f.write(data)
            os.replace(path + ".tmp", path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, eos = 256: needs no training and knows every text."""

    kind = "bytes"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def encode_arrays(self, texts: Sequence[str], dtype: np.dtype | str) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(dtype) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def _payload(self) -> bytes:
        return b"utf-8 bytes, eos 256"


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer`; truncation and padding are switched off so that a
    document is never cut, and `encode` adds no special tokens (no BOS/EOS templates)."""

    kind = "hf"

    def __init__(self, tokenizer, eos_token: str | None = None):
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tok = tokenizer
        names = [eos_token] if eos_token else list(EOS_CANDIDATES)
        found = [t for t in names if tokenizer.token_to_id(t) is not None]
        if not found:  # a tokenizer with no end-of-text token gets one (a new id at the end)
            from tokenizers import AddedToken

            found = [eos_token or "<|endoftext|>"]
            tokenizer.add_special_tokens([AddedToken(found[0], special=True)])
        self.eos_id = int(tokenizer.token_to_id(found[0]))
        # ids can have holes; the largest id + 1 bounds them all
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> HFTokenizer:
        """Load a `tokenizer.json`; the eos token comes from a `tokenizer_config.json` beside it
        when there is one, else the first of `EOS_CANDIDATES` present, else one is added."""
        from tokenizers import Tokenizer as _Tok

        path = os.fspath(path)
        try:
            tok = _Tok.from_file(path)
        except Exception as e:  # the library raises a bare Exception for bad JSON
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(
                f"{path} is not a Hugging Face tokenizer.json ({msg}): give the file that "
                "`tokenizer.save()` or `save_pretrained` writes"
            ) from None
        return cls(tok, _config_eos(os.path.dirname(path), tok))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def _payload(self) -> bytes:
        return self.tok.to_str().encode()

    def _files(self) -> dict[str, bytes]:
        return {"tokenizer.json": self._payload()}


def _config_eos(directory: str, tok) -> str | None:
    """The eos token a `tokenizer_config.json` names, if it is in the vocabulary."""
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            eos = json.load(f).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(eos, dict):  # {"content": "</s>", "special": true, ...}
        eos = eos.get("content")
    return eos if isinstance(eos, str) and tok.token_to_id(eos) is not None else None


def train_bpe(texts_or_files: Iterable[str | os.PathLike], vocab_size: int) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style) with an `<|endoftext|>` special token (id 0).

    Items that are `os.PathLike` (e.g. `pathlib.Path`) are files read whole by the library;
    plain strings are texts. The same texts in the same order give the same tokenizer.
    """
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(
            f"bpe:{vocab_size} is below 257 (256 bytes + <|endoftext|>): give tokenizer=bpe:VOCAB "
            "with VOCAB >= 257 (e.g. bpe:8192)"
        )
    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no unknown tokens
        show_progress=False,
    )
    items = iter(texts_or_files)
    first = next(items, None)
    if first is None:
        raise ValueError("train_bpe got no texts: give the documents (or files) to train on")
    if isinstance(first, os.PathLike):
        tok.train([os.fspath(first)] + [os.fspath(p) for p in items], trainer)
    else:
        tok.train_from_iterator(_chain(first, items), trainer)
    return HFTokenizer(tok, "<|endoftext|>")


def _chain(first, rest):
    yield first
    yield from rest


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model`; `encode` adds no BOS/EOS, `eos_id` is the model's `</s>`."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, source: str = "the model"):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except (RuntimeError, OSError, TypeError) as e:
            raise ValueError(
                f"{source} is not a SentencePiece model ({str(e).splitlines()[0]}): give the "
                ".model file SentencePieceTrainer writes"
            ) from None
        self._proto = model_proto
        self.vocab_size = int(self.sp.get_piece_size())
        self.eos_id = int(self.sp.eos_id())
        if self.eos_id < 0:
            raise ValueError(
                f"{source} has no end-of-sentence piece (eos_id=-1): train it with eos_id >= 0 "
                "(the default), or use tokenizer=bytes / a tokenizer.json"
            )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        with open(path, "rb") as f:
            return cls(f.read(), os.fspath(path))

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def _payload(self) -> bytes:
        return self._proto

    def _files(self) -> dict[str, bytes]:
        return {"tokenizer.model": self._proto}


def load_tokenizer(
    spec: str, files: Sequence[str] = (), *, format: str = "auto", field: str = "text"
) -> Tokenizer:
    """A tokenizer from a spec: `bytes`, `PATH/tokenizer.json`, a directory holding
    `tokenizer.json`, `tokenizer.model` or a saved tokenizer, `PATH.model`, or `bpe:VOCAB`
    (a byte-level BPE trained on the documents of `files`, read as `format`/`field`)."""
    spec = str(spec).strip()
    if spec == "bytes":
        return ByteTokenizer()
    if spec.startswith("bpe:"):
        try:
            vocab = int(spec[4:])
        except ValueError:
            raise ValueError(f"tokenizer={spec!r}: give bpe:VOCAB with an integer VOCAB") from None
        if not files:
            raise ValueError(
                f"tokenizer={spec} trains on the input files, but none were given: pass the "
                "inputs (--input GLOB) or a trained tokenizer (PATH/tokenizer.json)"
            )
        from jaxnv.data.files import read_documents

        return train_bpe(read_documents(files, format, field), vocab)
    if not os.path.exists(spec):
        if spec.endswith((".json", ".model")) or os.sep in spec:
            raise FileNotFoundError(f"tokenizer={spec!r} does not exist: give one of {SPECS}")
        raise ValueError(f"unknown tokenizer={spec!r}: give one of {SPECS}")
    if os.path.isdir(spec):
        for name, loader in (
            (META_FILE, load_saved),
            ("tokenizer.json", HFTokenizer.from_file),
            ("tokenizer.model", SentencePieceTokenizer.from_file),
        ):
            if os.path.isfile(os.path.join(spec, name)):
                return loader(spec if name == META_FILE else os.path.join(spec, name))
        raise FileNotFoundError(
            f"tokenizer={spec!r} is a directory without tokenizer.json or tokenizer.model: "
            f"give one of {SPECS}"
        )
    if spec.endswith(".json"):
        return HFTokenizer.from_file(spec)
    if spec.endswith(".model"):
        return SentencePieceTokenizer.from_file(spec)
    raise ValueError(f"tokenizer={spec!r} is neither .json nor .model: give one of {SPECS}")


def load_saved(directory: str | os.PathLike) -> Tokenizer:
    """Reload what `Tokenizer.save(directory)` wrote, of any kind; the fingerprint is checked."""
    directory = os.fspath(directory)
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(
            f"{directory} holds no saved tokenizer ({META_FILE} is missing): save one with "
            "Tokenizer.save(directory)"
        )
    with open(meta_path) as f:
        meta = json.load(f)
    kind = meta.get("kind")
    if kind == "bytes":
        tok: Tokenizer = ByteTokenizer()
    elif kind == "hf":
        from tokenizers import Tokenizer as _Tok

        hf = _Tok.from_file(os.path.join(directory, "tokenizer.json"))
        tok = HFTokenizer(hf, hf.id_to_token(int(meta["eos_id"])))
    elif kind == "sentencepiece":
        tok = SentencePieceTokenizer.from_file(os.path.join(directory, "tokenizer.model"))
    else:
        raise ValueError(f"{meta_path} names an unknown tokenizer kind {kind!r}: save it again")
    if tok.fingerprint != meta.get("fingerprint"):
        raise ValueError(
            f"the tokenizer in {directory} changed after it was saved (fingerprint differs): "
            "prepare the data again with the tokenizer you mean"
        )
    return tok
