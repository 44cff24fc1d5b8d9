"""Strict test configuration: 8 simulated CPU devices, rank promotion is an error."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAXNV_COMPILATION_CACHE" not in os.environ:
    # never the user's ~/.cache: one fresh cache for the session (and the processes it starts)
    _cache = tempfile.mkdtemp(prefix="jaxnv-test-xla-")
    os.environ["JAXNV_COMPILATION_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# the session opts in to the persistent compilation cache (the CLI does the same for a run;
# library calls such as fit() leave JAX's settings alone)
from jaxnv.train.compilation import enable_compilation_cache  # noqa: E402

enable_compilation_cache()
