"""Host memory for XLA:CPU, opt-in: `JAXNV_MALLOC=keep` has the step's buffers reuse freed memory.

XLA:CPU allocates each execution's temporary buffer with malloc and frees it when the step ends;
for a 4 x 128 transformer step that is about 100 MB. glibc serves a block that large with a fresh
`mmap` and returns it with `munmap`, so every step faults in every page again: 25,000-40,000
page faults and 50-75 ms of kernel time a step on the 2-core reference machine.

With `JAXNV_MALLOC=keep`, `import jaxnv` does two things, once, before JAX's CPU backend starts:
- asks glibc (`mallopt`) to serve large blocks from its heap instead of `mmap`, and to keep up
  to 2 GiB of freed memory at the heap's top for reuse;
- has JAX run each single-device CPU computation on the thread that calls it
  (`jax_cpu_enable_async_dispatch=False`). JAX's own dispatch threads allocate from arenas of
  their own, where glibc maps a block over 64 MB afresh whatever it is asked; the calling
  thread of a Python program allocates from glibc's main heap.

The process then holds on to its peak host memory, and a call returns only when its result is
computed. It is not the default: steps of about a millisecond lose the overlap of Python with
the computation (a 2-64-64-1 MLP's loop ran half as many steps a second), while a
transformer's step is faster, and so, a little, is a dispatch-bound 10-5-1 MLP's.

It applies on Linux with glibc when JAX runs on the CPU: `JAX_PLATFORMS` names only cpu, or it
is unset and no GPU or TPU plugin is installed. It is not applied when JAX's backend has already
started (import jaxnv before running JAX) or when `JAX_CPU_ENABLE_ASYNC_DISPATCH` is set (JAX's
dispatch is then left as that says).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
KEEP = 2**31 - 1  # trim the heap only when its free top exceeds 2 GiB
DISPATCH_ENV = "JAX_CPU_ENABLE_ASYNC_DISPATCH"
# the modules JAX's GPU and TPU backends come in (jax_plugins: the older namespace package)
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                       "jax_rocm7_plugin", "libtpu", "jax_plugins")  # fmt: skip

_status = "not applied"


def _accelerator_plugin() -> str | None:
    return next((m for m in ACCELERATOR_PLUGINS if importlib.util.find_spec(m)), None)


def _backend_started() -> bool:
    """Whether JAX has created its backends in this process (too late to change dispatch)."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # no public query of this

    started = getattr(xla_bridge, "backends_are_initialized", None)  # absent: assume not
    return bool(started and started())


def _why_not() -> str | None:
    """Why the setting does not apply to this process, or None when it does."""
    asked = os.environ.get("JAXNV_MALLOC", "")
    if not asked:
        return "JAXNV_MALLOC=keep not set"
    if asked != "keep":
        return f"JAXNV_MALLOC={asked!r}: only 'keep' changes it"
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms and any(p != "cpu" for p in platforms):
        return f"JAX_PLATFORMS={','.join(platforms)}"
    if not platforms and (plugin := _accelerator_plugin()):
        return f"an accelerator plugin is installed ({plugin})"
    if DISPATCH_ENV in os.environ:
        return f"{DISPATCH_ENV} is set: JAX's dispatch left as it says"
    if _backend_started():
        return "JAX's backend had already started: import jaxnv before running JAX"
    return None


def keep_freed_memory() -> str:
    """Apply the setting where it applies (see the module docstring); one line saying what was
    done, also given by `status()`."""
    global _status
    if _status != "not applied":
        return _status
    why_not = _why_not()
    if why_not:
        _status = f"glibc's and JAX's defaults ({why_not})"
        return _status
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        _status = "glibc's and JAX's defaults (no glibc mallopt here)"
        return _status
    if not all(
        mallopt(opt, value) == 1 for opt, value in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP))
    ):
        _status = "glibc's and JAX's defaults (mallopt refused)"
        return _status
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    _status = (
        "freed memory kept for reuse (JAXNV_MALLOC=keep: no mmap, "
        "CPU computations run on the calling thread)"
    )
    return _status


def status() -> str:
    """What `keep_freed_memory` did, for `jaxnv info` and the start-up report."""
    return _status


def note() -> str | None:
    """The training loop's start-up line when `JAXNV_MALLOC` is set (applied or why not)."""
    return f"host memory: {_status}" if os.environ.get("JAXNV_MALLOC") else None


keep_freed_memory()  # on import: `import jaxnv` runs this before JAX's backend starts
