"""What `jaxnv info` reports: backend, devices, the auto precision and why, the attention kernel,
whether model.matmul=mkl can run, the host memory setting (jaxnv/hostmem.py), XLA's GPU overlap
flags (on a GPU), library versions."""

from __future__ import annotations

from importlib import metadata

import jax

from jaxnv import hostmem
from jaxnv.core.precision import Policy
from jaxnv.models import mkl
from jaxnv.models.layers import choose_attention
from jaxnv.parallel.xla_flags import overlap_note

PACKAGES = ("jaxnv", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "grain")


def info_lines() -> list[str]:
    """Human-readable lines describing this machine as jaxnv sees it."""
    devices = jax.devices()
    auto = Policy.auto(devices)
    lines = [
        f"backend: {jax.default_backend()}",
        f"devices: {len(devices)} x {devices[0].device_kind} "
        f"({jax.process_count()} process(es), {jax.local_device_count()} local)",
        f"auto precision: {auto} (loss scale: {auto.default_loss_scale})",
        f"  why: {auto.reason}",
    ]
    kernel, why = choose_attention("auto", auto.compute_dtype, 64)
    lines.append(f"attention (auto, head dim 64, {auto.compute_dtype.name}): {kernel} ({why})")
    lines.append(f"model.matmul=mkl: {mkl.availability()}")
    lines.append(f"host memory: {hostmem.status()}")
    lines += filter(None, [overlap_note(jax.default_backend())])
    for name in PACKAGES:
        try:
            lines.append(f"{name}: {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{name}: not installed")
    return lines
