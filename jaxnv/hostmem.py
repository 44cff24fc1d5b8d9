"""Host memory for XLA:CPU, opt-in: `JAXNV_MALLOC=keep` has the step's buffers reuse freed memory.

XLA:CPU allocates each execution's temporary buffer with malloc and frees it when the step ends;
for a 4 x 128 transformer step that is about 100 MB. glibc serves a block that large with a fresh
`mmap` and returns it with `munmap`, so every step faults in every page again: 25,000-40,000
page faults and 50-75 ms of kernel time a step on the 2-core reference machine. With
`JAXNV_MALLOC=keep`, jaxnv asks glibc (`mallopt`), once, when it is imported and before JAX's
threads start, to serve large blocks from its heap, keep freed memory for reuse and use one arena
(a thread's own arena would `mmap` such a block anyway). The process then holds on to its peak
host memory. It is not the default: with one arena, a dispatch-bound step (a 10-5-1 MLP) takes
about 1.5x as long, its threads queueing for the arena's lock.

It applies on Linux with glibc when JAX runs on the CPU: `JAX_PLATFORMS` names only cpu, or it
is unset and no GPU or TPU plugin is installed. Importing jaxnv after JAX has run a computation
leaves JAX's threads on their own arenas, whose large blocks still come from `mmap`: set it in
the environment and import jaxnv first.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's <malloc.h>
KEEP = 2**31 - 1  # trim the heap only when its free top exceeds 2 GiB
# the modules JAX's GPU and TPU backends come in (jax_plugins: the older namespace package)
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                       "jax_rocm7_plugin", "libtpu", "jax_plugins")  # fmt: skip

_status = "not applied"


def _accelerator_plugin() -> str | None:
    return next((m for m in ACCELERATOR_PLUGINS if importlib.util.find_spec(m)), None)


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
    return None


def keep_freed_memory() -> str:
    """Apply the setting where it applies (see the module docstring); one line saying what was
    done, also given by `status()`."""
    global _status
    if _status != "not applied":
        return _status
    why_not = _why_not()
    if why_not:
        _status = f"glibc's defaults ({why_not})"
        return _status
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        _status = "glibc's defaults (no glibc mallopt here)"
        return _status
    done = all(mallopt(opt, value) == 1 for opt, value in
               ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP)))  # fmt: skip
    _status = (
        "freed memory kept for reuse (JAXNV_MALLOC=keep: one arena, no mmap)"
        if done
        else "glibc's defaults (mallopt refused)"
    )
    return _status


def status() -> str:
    """What `keep_freed_memory` did, for `jaxnv info` and the start-up report."""
    return _status


keep_freed_memory()  # on import: `import jaxnv` runs this before JAX's threads start
