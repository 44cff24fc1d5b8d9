"""How the `jaxnv` command reports an exception: one line for bad input, the user's own frames
for an exception out of their code, and the whole traceback for a bug in jaxnv."""

from __future__ import annotations

import functools
import os
import signal
import sys
import traceback

# Who raised an exception decides how it is shown. jaxnv raises ValueError & co. for bad input
# (configuration, paths, data shapes, CLI use) with one-line messages that name the fix: those stay
# one line. An exception out of the user's own code (an experiment file or a module it imports:
# config(), make_model, loss_fn, make_data, summarize) is shown as a traceback of the user's frames
# only, as JAX filters its own, then one `jaxnv: error:` line. The owner is the innermost frame that
# is not a library's (JAX, Flax, optax, orbax, NumPy, the standard library...): jaxnv or the user.

INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError)
_HIDDEN_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax")
_JAX_NOTE = "--------------------\nFor simplicity, JAX has removed its internal frames"
_TB_HEADER = (
    "Traceback (most recent call last; jaxnv's and JAX's frames hidden, --traceback shows them):"
)
_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@functools.cache
def _places() -> dict[str, tuple[str, ...]]:
    """Folders by what their frames are: jaxnv's own, hidden libraries, other libraries."""
    import importlib.util
    import runpy
    import site
    import sysconfig

    jaxnv_dir = os.path.dirname(os.path.realpath(__file__))
    hidden = [os.path.dirname(os.path.realpath(importlib.util.__file__)), runpy.__file__]
    for name in _HIDDEN_LIBRARIES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        hidden += (spec and spec.submodule_search_locations) or ()
    paths = sysconfig.get_paths()
    libraries = [paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths]
    libraries += [*site.getsitepackages(), site.getusersitepackages()]
    real = lambda dirs: tuple(os.path.realpath(d) for d in dirs if d)  # noqa: E731
    return {
        "experiments": real([os.path.join(jaxnv_dir, "experiments")]),  # shipped: user-like code
        "jaxnv": real([jaxnv_dir]),
        "hidden": real(hidden),
        "library": real(libraries),
    }


@functools.lru_cache(maxsize=1024)
def frame_kind(filename: str) -> str:
    """What a frame's file is: `user`, `jaxnv`, `hidden` (JAX, Flax, optax, orbax, importlib,
    runpy: never shown) or `library` (the rest of what is installed, the standard library: shown,
    never the owner)."""
    if filename.startswith("<"):  # <frozen importlib._bootstrap>, <frozen runpy>, <string>
        return "hidden" if "importlib" in filename or "runpy" in filename else "library"
    path = os.path.realpath(filename)
    places = _places()
    for kind in ("experiments", "jaxnv", "hidden", "library"):
        if any(_under(path, d) for d in places[kind]):
            return "user" if kind == "experiments" else kind
    return "user"


def _frames(err: BaseException) -> list[traceback.FrameSummary]:
    frames = traceback.extract_tb(err.__traceback__)
    if isinstance(err, SyntaxError) and err.filename:  # where the source is, not who compiled it
        frames.append(traceback.FrameSummary(err.filename, err.lineno or 0, "<module>"))
    return frames


def raised_in_user_code(err: BaseException) -> bool:
    """Whether the innermost frame of `err` that is not a library's is the user's (not jaxnv's)."""
    for frame in reversed(_frames(err)):
        kind = frame_kind(frame.filename)
        if kind in ("user", "jaxnv"):
            return kind == "user"
    return False


def _chain(err: BaseException) -> list[tuple[BaseException, str]]:
    """`(exception, how the next one follows from it)`, the first cause first, as Python prints
    them; JAX's UnfilteredStackTrace (a copy with all frames) is left out."""
    out: list[tuple[BaseException, str]] = []
    e, how = err, ""
    while e is not None and all(e is not x for x, _ in out):
        if type(e).__name__ != "UnfilteredStackTrace":
            out.append((e, how))
        if e.__cause__ is not None:
            e, how = e.__cause__, how if type(e).__name__ == "UnfilteredStackTrace" else "cause"
        elif not e.__suppress_context__ and e.__context__ is not None:
            e, how = e.__context__, "context"
        else:
            e = None
    return out[::-1]


def _message(err: BaseException) -> str:
    text = str(err)
    notes = [n for n in getattr(err, "__notes__", ()) if not str(n).startswith(_JAX_NOTE)]
    return "\n".join([text, *map(str, notes)]).strip()


def user_origin(err: BaseException) -> BaseException | None:
    """The exception out of user code that `err` is, or that `err` was raised from or while
    handling (jaxnv turns some into a one-line message `from None`, e.g. a shape error of a model
    into "the model cannot take this batch"); None when user code raised none of them."""
    seen: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and all(e is not x for x in seen):
        seen.append(e)
        if raised_in_user_code(e):
            return e
        e = e.__cause__ or e.__context__
    return None


def format_user_error(err: BaseException, origin: BaseException | None = None) -> str:
    """The user's frames of `origin` (default `err`) and of the exceptions it came from, as
    Python prints them but without jaxnv's and the libraries' internals, then one line
    `jaxnv: error: Type: message` for `err`."""
    origin = origin or err
    out = []
    for e, how in _chain(origin):
        shown = [f for f in traceback.extract_tb(e.__traceback__) if frame_kind(f.filename) in
                 ("user", "library")]  # fmt: skip
        if shown:
            out += [_TB_HEADER + "\n", *traceback.format_list(shown)]
        if isinstance(e, SyntaxError):  # the file, line, source and caret
            out += traceback.format_exception_only(type(e), e)[:-1]
        if e is origin:
            break
        out += traceback.format_exception_only(type(e), e)
        out.append(_CAUSE if how == "cause" else _CONTEXT)
    out.append(_error_line(err, _message(err)))
    return "".join(out)


def _error_line(err: BaseException, msg: str) -> str:
    return f"jaxnv: error: {type(err).__name__}{': ' + msg if msg else ''}\n"


def _print_whole(err: BaseException, origin: BaseException | None) -> None:
    """`--traceback`: every frame, and the user's exception that jaxnv turned into `err`."""
    if origin is not None and origin is not err and not _in_chain(origin, err):
        traceback.print_exception(origin)
        print(_CONTEXT, end="", file=sys.stderr)
    traceback.print_exception(err)


def _in_chain(inner: BaseException, err: BaseException) -> bool:
    return any(e is inner for e, _ in _chain(err))


def report_error(err: BaseException, *, command: str, full: bool, joined: bool) -> int | None:
    """Print `err` the way its kind asks and return the exit status; None: raise it as is (an
    unexpected error inside jaxnv, whose whole traceback is the report)."""
    preemption = sys.modules.get("jaxnv.checkpoint.preemption")
    if preemption is not None and isinstance(err, preemption.Preempted):  # a clean stop
        print(f"jaxnv: {err}", file=sys.stderr)
        return preemption.EXIT_PREEMPTED
    origin = None if isinstance(err, KeyboardInterrupt) else user_origin(err)
    if full:
        _print_whole(err, origin)
    if isinstance(err, KeyboardInterrupt):  # Ctrl-C outside the loop, or a second one in it
        how = str(err) or "Ctrl-C"
        then = ": run the same command again to resume" if command == "train" else ""
        print(f"jaxnv: interrupted ({how}){then}", file=sys.stderr)
        return 128 + (signal.SIGTERM if "SIGTERM" in how else signal.SIGINT)
    nonfinite = sys.modules.get("jaxnv.train.nonfinite")
    if nonfinite is not None and isinstance(err, nonfinite.NonFiniteError):
        print(f"jaxnv: error: {err}", file=sys.stderr)
        return 3
    if origin is not None:
        if full:
            sys.stderr.write(_error_line(err, str(err).partition("\n")[0]))
        else:
            sys.stderr.write(format_user_error(err, origin))
        return 1
    if isinstance(err, INPUT_ERRORS):
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"jaxnv: error: {msg}", file=sys.stderr)
        return 2
    if full or joined:  # joined: see main, never wait for peers after a failure
        if not full:
            traceback.print_exception(err)
        return 1
    return None
