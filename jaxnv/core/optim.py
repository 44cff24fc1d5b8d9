"""Optimizer factory over optax: the config section ``optimizer`` becomes a GradientTransformation.

The result is a plain ``optax.GradientTransformation`` built as an ``optax.named_chain`` so that its
state is addressable by name in checkpoints: ``"clip"`` (when ``clip_norm > 0``), ``"decay"`` (sgd
with ``weight_decay > 0`` only) and ``"optimizer"``. With ``accumulate_steps > 1`` the chain is
wrapped in ``optax.MultiSteps`` (the chain's state is then ``state.inner_opt_state``).

Weight decay is decoupled from the gradient statistics everywhere:

- adamw, lion: the optimizer's own ``weight_decay``, scaled by the learning rate
  (``p -= lr * (update + wd * p)``).
- adam: with ``weight_decay > 0`` the decay is added after the Adam scaling and before the learning
  rate scaling, which is exactly adamw (torch-style coupled L2 is not offered).
- sgd: ``optax.add_decayed_weights`` before sgd, so the decay goes through momentum and is scaled by
  the learning rate (``p -= lr * trace(g + wd * p)``).
- adafactor: optax's ``weight_decay_rate``, applied after the learning rate scaling, so it is NOT
  multiplied by the learning rate (``p -= update + wd * p``).

``decay_mask`` picks the params that decay: ``"auto"`` those with ``ndim >= 2`` (not biases, norm
scales or other vectors), ``"all"`` every param, ``"none"`` none. A param stored stacked over layers
(the transformer's blocks, (L, ...) per param) is judged by one layer's shape: ``make_optimizer``'s
``stacked`` names those params (``jaxnv.core.state.stacked_paths(model)``), and jaxnv's own runs
pass it. An optax optimizer of your own sees the stacked arrays as they are. Adafactor's
parameter scale (the RMS a step is scaled by) is taken over a stacked param as a whole, one
value for all its layers.

Schedules count optimizer updates: with ``accumulate_steps = k`` the learning rate at train step
``s`` is ``make_schedule(cfg, total)(s // k)``. ``warmup_steps`` is a number of updates or a
fraction in (0, 1) of the schedule's length; one that leaves no update to decay over (a run shorter
than its warmup) is clamped to 10 % of the length, and ``make_schedule`` prints one
``jaxnv: warning:`` line to stderr saying so.

>>> tx = make_optimizer(OptimizerConfig(name="adamw", learning_rate=1e-3), total_steps=100)
>>> state = tx.init({"w": jnp.ones((2, 2))})
"""

import dataclasses
import difflib
import functools
import sys
from collections.abc import Collection

import jax
import jax.numpy as jnp
import optax

from jaxnv.core.state import path_str

OPTIMIZERS = ("adamw", "adam", "sgd", "lion", "adafactor")
SCHEDULES = ("constant", "cosine", "linear")
DECAY_MASKS = ("auto", "all", "none")


@dataclasses.dataclass
class OptimizerConfig:
    """The ``optimizer`` config section; see the module docstring for the weight decay rules."""

    name: str = "adamw"  # adamw | adam | sgd | lion | adafactor
    learning_rate: float = 1e-3  # peak learning rate
    schedule: str = "constant"  # constant | cosine | linear (decay after warmup)
    # linear warmup from 0 to learning_rate: a number of steps, or a fraction in (0, 1) of them
    warmup_steps: int | float = 0
    decay_steps: int = 0  # schedule length incl. warmup; 0 = total_steps given to make_optimizer
    end_learning_rate: float = 0.0  # final lr of cosine/linear decay (absolute value)
    weight_decay: float = 0.0  # decoupled weight decay
    decay_mask: str = "auto"  # auto (ndim >= 2) | all | none
    b1: float = 0.9  # adam, adamw, lion
    b2: float = 0.999  # adam, adamw, lion (the Lion paper uses 0.99)
    eps: float = 1e-8  # adam, adamw
    momentum: float = 0.0  # sgd; 0 = plain sgd
    nesterov: bool = False  # sgd, needs momentum > 0
    clip_norm: float = 0.0  # global-norm clipping; 0 = off
    accumulate_steps: int = 1  # > 1: accumulate the mean gradient over k calls, update on the last


def decay_mask_fn(params, stacked: Collection[str] = ()):
    """True where weight decay applies: leaves with ``ndim >= 2``, not counting the leading layer
    axis of those whose path (``"blocks/norm1/scale"``) is in ``stacked``.

    >>> decay_mask_fn({"w": jnp.ones((3, 2)), "b": jnp.ones(2)})
    {'b': False, 'w': True}
    >>> decay_mask_fn({"blocks": {"scale": jnp.ones((4, 2))}}, stacked={"blocks/scale"})
    {'blocks': {'scale': False}}
    """
    stacked = frozenset(stacked)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.ndim(x) - (path_str(p) in stacked) >= 2, params
    )


def _choice(field, value, options):
    """Raise a one-line error with a did-you-mean unless ``value`` is one of ``options``."""
    if value in options:
        return
    close = difflib.get_close_matches(str(value), options, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown {field} {value!r}: use one of {', '.join(options)}{hint}")


def _decay_steps(cfg, total_steps):
    return cfg.decay_steps if cfg.decay_steps > 0 else total_steps


def _validate(cfg, total_steps):
    """Fail early, with one line naming the fix, on a config that cannot be what was meant."""
    _choice("optimizer", cfg.name, OPTIMIZERS)
    _choice("schedule", cfg.schedule, SCHEDULES)
    _choice("decay_mask", cfg.decay_mask, DECAY_MASKS)
    for field in ("learning_rate", "end_learning_rate", "weight_decay", "clip_norm", "eps"):
        if getattr(cfg, field) < 0:
            raise ValueError(
                f"optimizer.{field}={getattr(cfg, field)} is negative; use a value >= 0"
            )
    for field in ("warmup_steps", "decay_steps"):
        if getattr(cfg, field) < 0:
            raise ValueError(f"optimizer.{field}={getattr(cfg, field)} is negative; use 0 or more")
    warmup = cfg.warmup_steps
    if isinstance(warmup, float) and not warmup.is_integer() and not 0.0 < warmup < 1.0:
        raise ValueError(
            f"optimizer.warmup_steps={warmup} is neither a whole number of steps nor a fraction "
            "in (0, 1) of them: use e.g. 50 or 0.05"
        )
    for field in ("b1", "b2"):
        if not 0.0 <= getattr(cfg, field) < 1.0:
            raise ValueError(f"optimizer.{field}={getattr(cfg, field)} must lie in [0, 1)")
    if cfg.momentum != 0.0 and cfg.name != "sgd":
        raise ValueError(
            f"optimizer.momentum applies only to sgd, not {cfg.name!r}; set optimizer.momentum=0 "
            "(use optimizer.b1 for adam-style momentum)"
        )
    if not 0.0 <= cfg.momentum < 1.0:
        raise ValueError(f"optimizer.momentum={cfg.momentum} must lie in [0, 1)")
    if cfg.nesterov and cfg.name != "sgd":
        raise ValueError(f"optimizer.nesterov applies only to sgd, not {cfg.name!r}")
    if cfg.nesterov and cfg.momentum == 0.0:
        raise ValueError("optimizer.nesterov needs momentum; set optimizer.momentum (e.g. 0.9)")
    if cfg.accumulate_steps < 1:
        raise ValueError(
            f"optimizer.accumulate_steps={cfg.accumulate_steps} must be >= 1 (1 = no accumulation)"
        )
    steps = _decay_steps(cfg, total_steps)
    if cfg.schedule != "constant" and steps <= 0:
        raise ValueError(
            f"schedule {cfg.schedule!r} needs a length; set optimizer.decay_steps or pass "
            "total_steps > 0"
        )
    if _is_fraction(warmup) and steps <= 0:
        raise ValueError(
            f"optimizer.warmup_steps={warmup} is a fraction of a schedule length that is unknown; "
            "set optimizer.decay_steps or pass total_steps > 0"
        )


def _is_fraction(warmup) -> bool:
    return isinstance(warmup, float) and 0.0 < warmup < 1.0


CLAMPED_WARMUP = 0.1  # the share of the steps a warmup that does not fit is clamped to


def resolve_warmup(cfg: OptimizerConfig, total_steps: int) -> tuple[int, str | None]:
    """The warmup in optimizer updates, and a one-line note when it had to be clamped.

    A fraction in (0, 1) is that share of the schedule's length (rounded down). A warmup that
    leaves no update to decay over (``>= `` the length; ``>`` for the constant schedule) is
    clamped to 10 % of the length (rounded down).

    >>> resolve_warmup(OptimizerConfig(schedule="cosine", warmup_steps=0.05), 200)
    (10, None)
    >>> resolve_warmup(OptimizerConfig(schedule="cosine", warmup_steps=50), 20)[0]
    2
    """
    _validate(cfg, total_steps)
    steps = _decay_steps(cfg, total_steps)
    if _is_fraction(cfg.warmup_steps):
        return int(cfg.warmup_steps * steps), None
    warmup = int(cfg.warmup_steps)
    too_long = warmup >= steps if cfg.schedule != "constant" else warmup > steps
    if steps <= 0 or not too_long:
        return warmup, None
    clamped = int(CLAMPED_WARMUP * steps)
    return clamped, (
        f"optimizer.warmup_steps={cfg.warmup_steps} does not fit a schedule of {steps} steps: "
        f"warming up over {clamped} steps ({CLAMPED_WARMUP:.0%} of them) instead"
    )


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the optimizer update count.

    Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then constant, or a cosine or
    linear decay to ``end_learning_rate`` at ``decay_steps`` (``total_steps`` when 0) updates.
    A warmup too long for the schedule is clamped (see ``resolve_warmup``) and this prints one
    line to stderr saying so (``make_optimizer`` clamps the same way, silently).

    >>> round(float(make_schedule(OptimizerConfig(schedule="linear"), total_steps=10)(5)), 8)
    0.0005
    """
    return _schedule(cfg, total_steps, warn=True)


def _schedule(cfg: OptimizerConfig, total_steps: int, warn: bool) -> optax.Schedule:
    warmup, note = resolve_warmup(cfg, total_steps)
    if note and warn:
        print(f"jaxnv: warning: {note}", file=sys.stderr, flush=True)
    peak, end = float(cfg.learning_rate), float(cfg.end_learning_rate)
    length = _decay_steps(cfg, total_steps) - warmup
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, end, length)
    else:  # end + (peak - end) * 0.5 * (1 + cos(pi * t / length))
        alpha = end / peak if peak > 0 else 0.0
        after = optax.cosine_decay_schedule(peak, length, alpha=alpha)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(
    cfg: OptimizerConfig, total_steps: int, *, stacked: Collection[str] = ()
) -> optax.GradientTransformation:
    """The optimizer described by ``cfg``; ``total_steps`` (optimizer updates) sizes the schedule;
    ``stacked``: the paths of params stacked over layers (see the module docstring).

    >>> tx = make_optimizer(OptimizerConfig(name="sgd", momentum=0.9, clip_norm=1.0), 100)
    >>> params = {"w": jnp.ones((2, 2))}
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> list(state)
    ['clip', 'optimizer']
    """
    _validate(cfg, total_steps)
    lr = _schedule(cfg, total_steps, warn=False)  # a clamped warmup is reported by make_schedule
    wd = 0.0 if cfg.decay_mask == "none" else float(cfg.weight_decay)
    mask = functools.partial(decay_mask_fn, stacked=stacked) if cfg.decay_mask == "auto" else None

    chain = []
    if cfg.clip_norm > 0:
        chain.append(("clip", optax.clip_by_global_norm(cfg.clip_norm)))
    if cfg.name == "adamw" or (cfg.name == "adam" and wd > 0):
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd, mask=mask)
    elif cfg.name == "adam":
        opt = optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    elif cfg.name == "lion":
        opt = optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=wd, mask=mask)
    elif cfg.name == "adafactor":
        # b1/b2/eps do not carry over: adafactor's decay_rate and eps (1e-30) mean other things.
        opt = optax.adafactor(lr, weight_decay_rate=wd or None, weight_decay_mask=mask)
    else:  # sgd
        if wd > 0:
            chain.append(("decay", optax.add_decayed_weights(wd, mask)))
        opt = optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
    chain.append(("optimizer", opt))

    tx = optax.named_chain(*chain)
    if cfg.accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accumulate_steps).gradient_transformation()
    return tx
