"""Packing helpers against plain Python references: every token once, in order, per document."""

import numpy as np
import pytest

from jaxnv.data.packing import first_fit, lm_batch, pack_rows, split_pieces


def _reference_pieces(docs, max_len):
    return [
        (d, doc[i : i + max_len]) for d, doc in enumerate(docs) for i in range(0, len(doc), max_len)
    ]


def test_split_pieces_matches_python_slicing():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 40, 50)
    lengths[3] = 0  # an empty document gives no piece
    docs = [list(range(1000 * d, 1000 * d + n)) for d, n in enumerate(lengths)]
    doc, start, length = split_pieces(lengths, 7)
    got = [(int(d), docs[d][s : s + n]) for d, s, n in zip(doc, start, length, strict=True)]
    assert got == _reference_pieces(docs, 7)
    assert length.max() <= 7 and length.min() >= 1


def test_first_fit_places_every_item_once_and_respects_capacity():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 17, 500)
    order, bounds = first_fit(lengths, 16, open_rows=8)
    assert sorted(order.tolist()) == list(range(500))  # each item exactly once
    rows = [order[bounds[r] : bounds[r + 1]] for r in range(len(bounds) - 1)]
    assert all(len(r) and lengths[r].sum() <= 16 for r in rows)
    # within a row, items keep their input order (first-fit appends)
    assert all(np.all(np.diff(r) > 0) for r in rows)
    # efficient: within 15% of the volume bound (lengths up to a full row are hard to pair)
    assert len(rows) <= 1.15 * np.ceil(lengths.sum() / 16)


def test_first_fit_equals_plain_python_first_fit_with_unbounded_rows():
    rng = np.random.default_rng(2)
    lengths = rng.integers(1, 10, 60).tolist()
    free, rows = [], []  # textbook first-fit: never closes a row
    for i, n in enumerate(lengths):
        slot = next((j for j, f in enumerate(free) if f >= n), None)
        if slot is None:
            free.append(10)
            rows.append([])
            slot = len(rows) - 1
        rows[slot].append(i)
        free[slot] -= n
    order, bounds = first_fit(lengths, 10, open_rows=len(lengths))
    got = [order[bounds[r] : bounds[r + 1]].tolist() for r in range(len(bounds) - 1)]
    assert got == rows


def test_first_fit_refuses_items_longer_than_a_row():
    with pytest.raises(ValueError, match="split_pieces"):
        first_fit(np.array([3, 12]), 10)


def test_pack_rows_and_lm_batch_against_a_python_reference():
    rng = np.random.default_rng(3)
    capacity = 12
    docs = [rng.integers(1, 100, n).astype(np.int32) for n in rng.integers(1, 30, 40)]
    pieces = [p for _, p in _reference_pieces(docs, capacity)]
    order, bounds = first_fit([len(p) for p in pieces], capacity)
    rows = [[pieces[i] for i in order[bounds[r] : bounds[r + 1]]] for r in range(len(bounds) - 1)]
    packed = pack_rows(rows, capacity)
    batch = lm_batch(**packed)
    seen = []
    for r, row in enumerate(rows):
        at = 0
        for s, piece in enumerate(row, start=1):
            n = len(piece)
            assert packed["tokens"][r, at : at + n].tolist() == piece.tolist()  # in order
            assert (packed["segment_ids"][r, at : at + n] == s).all()
            assert packed["positions"][r, at : at + n].tolist() == list(range(n))
            for t in range(at, at + n - 1):  # inside the piece: next token of the same document
                assert (
                    batch["weights"][r, t] == 1.0 and batch["y"][r, t] == packed["tokens"][r, t + 1]
                )
            if at + n - 1 < capacity - 1:  # the piece's last token predicts nothing
                assert batch["weights"][r, at + n - 1] == 0.0
            seen.append(piece.tolist())
            at += n
        assert (packed["segment_ids"][r, at:] == 0).all()  # padding
        assert (batch["weights"][r, at - 1 :] == 0).all()
    assert sorted(seen) == sorted(p.tolist() for p in pieces)  # every token exactly once
    assert batch["x"].shape == (len(rows), capacity - 1) and batch["x"].dtype == np.int32
    assert batch["weights"].dtype == np.float32
    assert (batch["x"] == packed["tokens"][:, :-1]).all() and (
        batch["y"] == packed["tokens"][:, 1:]
    ).all()
