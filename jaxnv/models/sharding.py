"""Params are created unsharded; jaxnv places them later by its sharding plan."""

from __future__ import annotations

import functools

from flax import nnx

# the logical name of a stacked module's leading layer axis (the transformer's blocks); the
# sharding plan splits it over the mesh's pipeline `stage` axis when there is one
LAYER_AXIS = "layers"


def unsharded_init(init):
    """Wrap a model's `__init__` so that its params, which carry logical axis names, are created
    without NNX's eager sharding (which needs a mesh) whatever the caller's setting, and the
    setting is the caller's again afterwards."""

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        with nnx.use_eager_sharding(False):
            init(self, *args, **kwargs)

    return wrapped
