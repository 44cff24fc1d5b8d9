"""Pure packing helpers: split documents into pieces, plan first-fit rows from lengths alone,
and build packed language-model rows.

    doc, start, length = split_pieces(lengths + 1, seq_len + 1)   # +1: the eos after each doc
    order, bounds = first_fit(length, capacity=seq_len + 1)
    rows = pack_rows([[piece, ...], ...], capacity=seq_len + 1)  # tokens, segment_ids, positions
    batch = lm_batch(**rows)  # x, y, segment_ids, positions, weights

A row holds `capacity = seq_len + 1` tokens so that `x = row[:-1]` and `y = row[1:]` are both
`seq_len` long. Segment ids number the documents of a row 1, 2, ... (0 = padding); positions
restart at 0 at each segment.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def split_pieces(lengths: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut documents of `lengths` into pieces of at most `max_len` tokens.

    Returns `(doc, start, length)`, one entry a piece, in document order: piece `i` is tokens
    `[start[i], start[i] + length[i])` of document `doc[i]`. Empty documents give no piece.
    """
    if max_len < 1:
        raise ValueError(f"max_len={max_len}: pieces need at least one token")
    lengths = np.asarray(lengths, dtype=np.int64)
    count = -(-lengths // max_len)  # ceil; 0 for an empty document
    doc = np.repeat(np.arange(len(lengths), dtype=np.int64), count)
    first = np.cumsum(count) - count  # index of each document's first piece
    k = np.arange(len(doc), dtype=np.int64) - np.repeat(first, count)  # piece number in its doc
    start = k * max_len
    return doc, start, np.minimum(lengths[doc] - start, max_len)


def first_fit(lengths: np.ndarray, capacity: int, open_rows: int = 64) -> tuple:
    """First-fit packing plan of items of `lengths` (in the given order) into rows of `capacity`.

    Each item goes to the first of `open_rows` open rows with room for it; when none has room the
    fullest open row is closed (emitted) and the item starts a new row in its place; at the end
    the open rows are emitted in slot order. Bounding the open rows keeps the plan close to the
    item order (no epoch-long drift) and its cost O(items x open_rows) in numpy.

    Returns `(order, bounds)`: row `r` holds items `order[bounds[r]:bounds[r + 1]]`, in the order
    they were added.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"items must hold 1..{capacity} tokens: split them first (split_pieces)")
    free = np.full(open_rows, capacity, dtype=np.int64)
    rows: list[list[int]] = [[] for _ in range(open_rows)]
    done: list[list[int]] = []
    for item, n in enumerate(lengths.tolist()):
        fits = free >= n
        slot = int(fits.argmax())
        if not fits[slot]:  # no open row has room: emit the fullest, reuse its slot
            slot = int(free.argmin())
            done.append(rows[slot])
            rows[slot], free[slot] = [], capacity
        rows[slot].append(item)
        free[slot] -= n
    done += [r for r in rows if r]
    sizes = np.array([len(r) for r in done], dtype=np.int64)
    order = np.fromiter((i for r in done for i in r), dtype=np.int64, count=int(sizes.sum()))
    return order, np.concatenate([[0], np.cumsum(sizes)])


def pack_rows(rows: Sequence[Sequence[np.ndarray]], capacity: int, pad_id: int = 0) -> dict:
    """Rows of token pieces -> `tokens`, `segment_ids`, `positions`, each (R, capacity) int32.

    Row `r` is its pieces concatenated, then `pad_id` (segment 0, position 0) up to `capacity`.
    """
    shape = (len(rows), capacity)
    tokens = np.full(shape, pad_id, dtype=np.int32)
    segment_ids = np.zeros(shape, dtype=np.int32)
    positions = np.zeros(shape, dtype=np.int32)
    for r, pieces in enumerate(rows):
        at = 0
        for s, piece in enumerate(pieces, start=1):
            n = len(piece)
            if at + n > capacity:
                raise ValueError(f"row {r} holds more than {capacity} tokens")
            tokens[r, at : at + n] = piece
            segment_ids[r, at : at + n] = s
            positions[r, at : at + n] = np.arange(n)
            at += n
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


def lm_batch(tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray) -> dict:
    """Packed rows (R, T + 1) -> the model's inputs and targets, each (R, T).

    `weights` is 1 where the target is the next token of the same segment, 0 on padding and on a
    segment's last token (whose next token belongs to another document or piece).
    """
    seg_x, seg_y = segment_ids[..., :-1], segment_ids[..., 1:]
    return {
        "x": tokens[..., :-1].astype(np.int32),
        "y": tokens[..., 1:].astype(np.int32),
        "segment_ids": seg_x.astype(np.int32),
        "positions": positions[..., :-1].astype(np.int32),
        "weights": ((seg_x == seg_y) & (seg_x != 0)).astype(np.float32),
    }
