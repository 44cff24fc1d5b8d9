"""XLA's GPU flags for overlapping collectives with compute, as the anchors' GPU recipes set them.

MaxText's and Levanter's GPU recipes set these so that the all-gathers and reduce-scatters of
fsdp and the all-reduces of data parallelism run while the GPU computes: the latency-hiding
scheduler, pipelined (loop-carried) collectives, double-buffered while loops (the scanned
layers), large combine thresholds (fewer, bigger collectives), no combining by dimension, and
cuBLAS rather than Triton GEMMs. XLA reads XLA_FLAGS once, when JAX starts its backend, so
`jaxnv` (the command) adds them before that: with ``JAXNV_XLA_OVERLAP=1``, or unset on a
machine with an NVIDIA driver; ``JAXNV_XLA_OVERLAP=0`` leaves XLA_FLAGS alone. A flag already
in XLA_FLAGS keeps its value. From Python, put ``" ".join(GPU_OVERLAP_FLAGS)`` into XLA_FLAGS
before the first JAX call. On a GPU the start-up report says which of them are set.
"""

from __future__ import annotations

import os

GPU_OVERLAP_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
    "--xla_gpu_enable_all_gather_combine_by_dim=false",
    "--xla_gpu_enable_reduce_scatter_combine_by_dim=false",
    "--xla_gpu_enable_triton_gemm=false",
)


def _name(flag: str) -> str:
    return flag.split("=", 1)[0]


def with_overlap_flags(xla_flags: str) -> str:
    """`xla_flags` plus each of GPU_OVERLAP_FLAGS it does not set already (its values win).

    >>> with_overlap_flags("--xla_gpu_enable_triton_gemm=true").count("triton_gemm")
    1
    """
    have = {_name(f) for f in xla_flags.split()}
    return " ".join([*xla_flags.split(), *(f for f in GPU_OVERLAP_FLAGS if _name(f) not in have)])


def has_nvidia_driver() -> bool:
    """Whether this machine has an NVIDIA driver loaded (without starting JAX)."""
    return os.path.exists("/proc/driver/nvidia/version")


def prepare(environ=os.environ) -> bool:
    """Before JAX starts: add the overlap flags to ``environ["XLA_FLAGS"]`` when
    JAXNV_XLA_OVERLAP is 1, or unset on a machine with an NVIDIA driver. Whether it added them."""
    mode = environ.get("JAXNV_XLA_OVERLAP", "")
    if mode not in ("", "0", "1"):
        raise ValueError(f"JAXNV_XLA_OVERLAP={mode!r}: use 1 (add the flags), 0 or unset")
    if mode == "0" or (mode == "" and not has_nvidia_driver()):
        return False
    environ["XLA_FLAGS"] = with_overlap_flags(environ.get("XLA_FLAGS", ""))
    return True


def overlap_note(backend: str, xla_flags: str | None = None) -> str | None:
    """On a GPU backend, the start-up line saying how many of the overlap flags XLA runs with
    (and their values where the user's differ); None elsewhere."""
    if backend != "gpu":
        return None
    flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    have = {_name(f): f for f in flags.split()}
    on = [f for f in GPU_OVERLAP_FLAGS if have.get(_name(f)) == f]
    other = [have[_name(f)] for f in GPU_OVERLAP_FLAGS if _name(f) in have and have[_name(f)] != f]
    text = f"xla: {len(on)} of {len(GPU_OVERLAP_FLAGS)} collective/compute overlap flags set"
    if other:
        text += f"; yours instead: {' '.join(other)}"
    if not on and not other:
        text += " (JAXNV_XLA_OVERLAP=1 or jaxnv.parallel.xla_flags.GPU_OVERLAP_FLAGS adds them)"
    return text
