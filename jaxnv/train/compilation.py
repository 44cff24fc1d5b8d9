"""JAX's persistent compilation cache, on by default in a user cache directory.

    enable_compilation_cache()            # $JAXNV_COMPILATION_CACHE, else ~/.cache/jaxnv/xla
    enable_compilation_cache("/tmp/xla")  # an explicit directory

A second run of the same experiment then loads its compiled programs from disk instead of
compiling them again (time to the first step: see benchmarks/compile_cache.py). Where the cache
goes, first match wins:

1. the `path` argument;
2. `JAXNV_COMPILATION_CACHE=DIR`, or `JAXNV_COMPILATION_CACHE=off` to leave the cache alone;
3. a directory already set in JAX (`JAX_COMPILATION_CACHE_DIR` or `jax.config`), kept as is;
4. `$XDG_CACHE_HOME/jaxnv/xla`, else `~/.cache/jaxnv/xla`.

The cache is trusted: whoever can write to the directory can make this process run their code.
Keep it private (it is created with mode 0700) and do not share it between users.
"""

from __future__ import annotations

import os

import jax

ENV = "JAXNV_COMPILATION_CACHE"
OFF = ("off", "0", "false", "no", "none")


def default_cache_dir() -> str:
    """`$XDG_CACHE_HOME/jaxnv/xla`, else `~/.cache/jaxnv/xla`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxnv", "xla")


def cache_dir_setting(path: str | None = None) -> str | None:
    """The directory `enable_compilation_cache(path)` would use; None when switched off."""
    if path is None:
        path = os.environ.get(ENV, "").strip()
        if path.lower() in OFF:
            return None
        path = path or jax.config.jax_compilation_cache_dir or default_cache_dir()
    return os.path.abspath(os.path.expanduser(path))


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache; returns its directory (None when off).

    Every compiled program is cached, however small or quick to compile: on a CPU most of a
    run's programs compile in well under JAX's default threshold of one second. Call it before
    the first compilation you want cached; calling it again with the same directory does nothing.
    A directory that cannot be created leaves the cache off and says so in a warning.

    >>> enable_compilation_cache("/tmp/jaxnv-xla")
    '/tmp/jaxnv-xla'
    """
    target = cache_dir_setting(path)
    if target is None:
        return None
    try:
        os.makedirs(target, mode=0o700, exist_ok=True)
    except OSError as e:
        import warnings

        warnings.warn(
            f"jaxnv: no compilation cache, {target!r} cannot be created ({e.strerror}): set "
            f"{ENV}=DIR to a writable directory, or {ENV}=off",
            stacklevel=2,
        )
        return None
    if jax.config.jax_compilation_cache_dir != target:
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()  # JAX opens its cache once: let it open the new one
        jax.config.update("jax_compilation_cache_dir", target)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size floor
    return target
