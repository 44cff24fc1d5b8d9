"""Params are created unsharded; jaxnv places them later by its sharding plan."""

from __future__ import annotations

import functools

from flax import nnx

from jaxnv.core.state import LAYER_AXIS  # noqa: F401  (the stacked blocks' leading axis name)


def unsharded_init(init):
    """Wrap a model's `__init__` so that its params, which carry logical axis names, are created
    without NNX's eager sharding (which needs a mesh) whatever the caller's setting, and the
    setting is the caller's again afterwards."""

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        with nnx.use_eager_sharding(False):
            init(self, *args, **kwargs)

    return wrapped
