"""jaxnv: a JAX functional training framework.

    result = jaxnv.fit(model, loss_fn, batches, steps=1000, optimizer=optax.adamw(1e-3))

Everything that trains is a pure function of pytrees, compiled once:

    graphdef, state = init_state(model_fn, tx, policy, rng)
    train_step = make_train_step(graphdef, loss_fn, tx, policy)
    state, metrics = train_step(state, batch)
"""

__version__ = "0.1.0"  # first: modules below read it

from jaxnv import hostmem  # noqa: F401  (first: JAXNV_MALLOC=keep acts before JAX's threads)
from jaxnv.config import Config, apply_overrides
from jaxnv.core import losses
from jaxnv.core.losses import Weighted, weighted_mean
from jaxnv.core.optim import OptimizerConfig, make_optimizer, make_schedule
from jaxnv.core.precision import (
    DynamicLossScale,
    NoOpLossScale,
    Policy,
    StaticLossScale,
    all_finite,
    get_policy,
    make_loss_scale,
)
from jaxnv.core.state import TrainState, init_state
from jaxnv.core.step import make_eval_step, make_train_step

__all__ = [
    "Callback",
    "Config",
    "EarlyStopping",
    "StepInfo",
    "TrainResult",
    "Weighted",
    "fit",
    "weighted_mean",
    "DynamicLossScale",
    "NoOpLossScale",
    "OptimizerConfig",
    "Policy",
    "StaticLossScale",
    "TrainState",
    "all_finite",
    "apply_overrides",
    "get_policy",
    "init_state",
    "losses",
    "make_eval_step",
    "make_loss_scale",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
]

# The loop's names load on first use: `import jaxnv` (and loading an export) stays light.
_LOOP = ("Callback", "EarlyStopping", "StepInfo", "TrainResult", "fit")


def __getattr__(name):
    if name in _LOOP:
        import jaxnv.train

        return getattr(jaxnv.train, name)
    raise AttributeError(f"module 'jaxnv' has no attribute {name!r}")
