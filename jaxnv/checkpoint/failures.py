"""What a failed restore says: the innermost cause, and whether the files look corrupt, or the
failure (memory, devices, shardings, the store) says nothing against them."""

from __future__ import annotations

import json
import re


def _chain(err: BaseException | None) -> list[BaseException]:
    """`err` and the exceptions it was raised from or during, outermost first."""
    out: list[BaseException] = []
    while err is not None and all(e is not err for e in out):
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


def innermost(err: BaseException) -> BaseException:
    """The innermost exception with a message: orbax wraps tensorstore's precise one
    ("OUT_OF_RANGE: Error reading ... ") in a generic one that prints a repr."""
    with_text = [e for e in _chain(err) if str(e).strip()]
    return with_text[-1] if with_text else err


def root_cause(err: BaseException) -> str:
    """The first line of `innermost(err)`, or its type's name."""
    best = innermost(err)
    text = str(best).strip()
    return text.splitlines()[0][:300] if text else type(best).__name__


# What a restore failure says about the files on disk. A failure that names memory, devices,
# shardings, permissions or an unreachable store says nothing against the data (the checkpoint may
# be perfectly good), so it is never reported as corruption, even when a read was under way; only a
# failure that names none of them and does name missing, short or undecodable data is.
# tensorstore prefixes its messages with an absl status code ("OUT_OF_RANGE: Error reading ...").
_MEMORY = re.compile(r"RESOURCE_EXHAUSTED|out of memory|\bOOM\b|failed to allocate", re.I)
_NOT_DATA = re.compile(
    r"\b(PERMISSION_DENIED|UNAUTHENTICATED|UNAVAILABLE|DEADLINE_EXCEEDED|CANCELLED|ABORTED|"
    r"INTERNAL|UNIMPLEMENTED)\b|(?i:\b(shardings?|mesh|devices?|topology)\b)",
)
_NOT_DATA_TYPES = (PermissionError, ConnectionError, TimeoutError)
_DATA = re.compile(
    r"\b(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND)\b|error (reading|opening|decoding)|not enough data|"
    r"checksum|corrupt|truncat|unexpected end|was not found in the checkpoint",
    re.I,
)
_DATA_TYPES = (FileNotFoundError, EOFError, UnicodeDecodeError, json.JSONDecodeError)


def failure_kind(err: BaseException, metadata_missing: bool = False) -> str:
    """What a restore failure (with its causes) points at: "memory", "corrupt" data or "other"."""
    chain = _chain(err)
    # first lines only: orbax follows them with a whole TensorStore spec (its codecs, paths...)
    lines = [f"{type(e).__name__}: {str(e).strip().partition(chr(10))[0]}" for e in chain]
    if any(isinstance(e, MemoryError) for e in chain) or any(map(_MEMORY.search, lines)):
        return "memory"
    if metadata_missing:  # every save writes the tree's metadata: the step is incomplete
        return "corrupt"
    if any(isinstance(e, _NOT_DATA_TYPES) for e in chain) or any(map(_NOT_DATA.search, lines)):
        return "other"
    if any(isinstance(e, _DATA_TYPES) for e in chain):
        return "corrupt"
    return "corrupt" if any(map(_DATA.search, lines)) else "other"
