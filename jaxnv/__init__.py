"""jaxnv: a JAX functional training framework.

Everything that trains is a pure function of pytrees, compiled once:

    graphdef, state = init_state(model_fn, tx, policy, rng)
    train_step = make_train_step(graphdef, loss_fn, tx, policy)
    state, metrics = train_step(state, batch)
"""

from jaxnv.config import Config, apply_overrides
from jaxnv.core import losses
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

__version__ = "0.1.0"

__all__ = [
    "Config",
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
