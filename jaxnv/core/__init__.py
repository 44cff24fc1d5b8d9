"""The functional core: pure functions of pytrees, no I/O.

`precision` (dtype policies, loss scales), `optim` (optax recipes), `losses` (fp32 losses and the
ready-made `loss_fn`s), `state` (`TrainState`, `init_state`) and `step` (the compiled train and
eval steps). Nothing here imports another jaxnv subpackage.
"""

from jaxnv.core.losses import get_loss_fn
from jaxnv.core.optim import OptimizerConfig, make_optimizer, make_schedule
from jaxnv.core.precision import Policy, all_finite, cast_floating, get_policy, make_loss_scale
from jaxnv.core.state import TrainState, init_state
from jaxnv.core.step import make_eval_step, make_train_step

__all__ = [
    "OptimizerConfig",
    "Policy",
    "TrainState",
    "all_finite",
    "cast_floating",
    "get_loss_fn",
    "get_policy",
    "init_state",
    "make_eval_step",
    "make_loss_scale",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
]
