"""A `Run`: everything the loop needs before its first step, built from an experiment's config
(`build`) or, for `fit` (train/fit.py), from any model, loss and batches (`_assemble`).

    run = build(load_experiment("house_prices"), abstract=True)  # shapes and shardings only

The mesh and its sharding plan, the policy and loss scale, the abstract state (and how to make
or restore the real one), the compiled train and eval steps, and the batch feed; a LoRA run
(`lora.rank > 0`) gets adapters and a frozen base sharded like the weights it would train.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import grain
import jax
from flax import nnx

from jaxnv import config as config_lib
from jaxnv.checkpoint.pretrained import pretrained_base, pretrained_params
from jaxnv.core.optim import make_optimizer, make_schedule
from jaxnv.core.precision import Policy, get_policy, make_loss_scale
from jaxnv.core.state import (
    TrainState,
    abstract_model,
    abstract_state,
    init_state,
    path_str,
    split_model,
    stacked_paths,
)
from jaxnv.core.step import (
    EvalStep,
    Step,
    batch_spec_of,
    check_batch_fits,
    make_eval_step,
    make_train_step,
)
from jaxnv.data.pipeline import IndexedBatches, IterableBatches, StepBatches
from jaxnv.data.sources import Dataset
from jaxnv.experiment import Experiment
from jaxnv.models.lora import apply_lora, check_lora
from jaxnv.parallel.mesh import Plan, batch_divisor, make_mesh, make_plan

if TYPE_CHECKING:  # annotations only: the loop imports this module
    from jaxnv.train.loop import TrainResult


def micro_batches_for(batch: int, ways: int, micro: int, max_device_batch: int) -> int:
    """Micro-batches per step: `micro`, or with `max_device_batch` the fewest (at least `micro`)
    that keep each device's share of one at most that many examples.

    The optimizer always sees the whole global `batch`; only the accumulation changes.
    """
    if batch % ways:
        raise config_lib.ConfigError(
            f"train.batch_size={batch} does not split over mesh data*fsdp={ways}: "
            f"use a multiple of {ways}"
        )
    per_device = batch // ways
    if per_device % micro:
        raise config_lib.ConfigError(
            f"train.batch_size={batch} gives {per_device} examples per device, which does not "
            f"split into train.micro_batches={micro}: use a batch of {ways * micro}*n"
        )
    k = micro
    while max_device_batch and per_device // k > max_device_batch or per_device % k:
        k += 1
    return k


@dataclasses.dataclass
class Run:
    """Everything built before the first step. `state` is concrete, or (`abstract=True`) shapes
    and shardings only, which `init()` or a checkpoint restore then fill."""

    cfg: config_lib.Config
    data: Dataset | None
    policy: Policy
    graphdef: Any
    state: TrainState
    batches: StepBatches | IndexedBatches | IterableBatches
    train_step: Step
    eval_step: EvalStep
    plan: Plan  # mesh, state and batch shardings, the per-param table
    init: Callable[[], TrainState] | None = None
    eval_data: Any = None  # arrays, a re-iterable of batches, or None (no evaluation)
    micro_batches: int = 1
    name: str = "custom"
    summarize: Callable[[TrainResult], dict] | None = None
    evaluators: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)  # start-up lines about the model


def model_notes(model) -> list[str]:
    """Start-up lines about choices made for this machine: a transformer's attention kernel and,
    when not XLA's, its matmuls."""
    notes = []
    if hasattr(model, "attention_kernel"):
        notes.append(f"attention: {model.attention_kernel} ({model.attention_reason})")
    if getattr(model, "matmul_kernel", "xla") != "xla":
        notes.append(f"matmul: {model.matmul_kernel} ({model.matmul_reason})")
    return notes


def _global_spec(batches, process_count: int):
    """The global batch's shapes: StepBatches hold the global batch, other feeds this process's
    rows (stacked over processes)."""
    spec = batch_spec_of(batches.sample())
    if getattr(batches, "holds_global", False) or process_count == 1:
        return spec
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((x.shape[0] * process_count, *x.shape[1:]), x.dtype), spec
    )


def _assemble(cfg, model, loss_fn, batches, tx, learning_rate_fn, policy, loss_scale, devices,
              abstract, **extra) -> Run:  # fmt: skip
    """The Run of a model (factory or module), loss, batches and optimizer on `cfg`'s mesh. `tx`
    is an optax optimizer, or a function of the model's stacked param paths that makes one."""
    t = cfg.train
    rng = jax.random.PRNGKey(t.seed)
    mesh = make_mesh(cfg.mesh, devices)
    ways = batch_divisor(mesh)
    if ways % jax.process_count():
        raise config_lib.ConfigError(
            f"mesh data*fsdp={ways} does not split over {jax.process_count()} processes: each "
            "process feeds its own rows, so make data*fsdp a multiple of the process count"
        )
    spec = _global_spec(batches, jax.process_count())
    batch = jax.tree.leaves(spec)[0].shape[0]
    micro = micro_batches_for(batch, ways, t.micro_batches, t.max_device_batch)
    model = with_lora(model, cfg.lora, policy, t.seed)  # lora.rank > 0: adapters, base frozen
    shapes = abstract_model(model)
    if getattr(shapes, "matmul_kernel", "xla") == "mkl" and mesh.size > 1:
        raise config_lib.ConfigError(
            f"model.matmul=mkl runs on one device, not a mesh of {mesh.size}: run on one device "
            "(unset JAXNV_CPU_DEVICES) or use model.matmul=xla"
        )
    if not hasattr(tx, "update"):  # jaxnv's own: decay by layer shapes
        tx = tx(stacked_paths(shapes))
    template = abstract_state(model, tx, policy, rng, loss_scale=loss_scale)
    plan = _make_plan(shapes, template, mesh, cfg.mesh.rules)
    graphdef = split_model(shapes)[0]

    def init() -> TrainState:  # each device creates only its own shards
        state = init_state(model, tx, policy, rng, loss_scale=loss_scale, out_shardings=plan.state)
        state = state[1]
        init_from = getattr(cfg.model, "init_from", "")
        if not init_from:
            return state
        kw = dict(policy=policy, mesh=mesh, rules=cfg.mesh.rules, max_seq_len=shapes.max_seq_len)
        if state.frozen:  # LoRA: the pretrained weights are the frozen base
            model_state = pretrained_base(init_from, state, plan.state.model_state, **kw)
            return state.replace(model_state=model_state)
        # the weights of a pretrained checkpoint, on the run's own shardings
        params = pretrained_params(init_from, state.params, plan.state.params, **kw)
        return state.replace(params=params)

    placed = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), template, plan.state
    )
    check_batch_fits(graphdef, loss_fn, policy, placed, spec)  # one line, before compiling
    train_step = make_train_step(
        graphdef,
        loss_fn,
        tx,
        policy,
        learning_rate_fn=learning_rate_fn,
        micro_batches=micro,
        batch_spec=spec,
        state_sharding=plan.state,
        batch_sharding=plan.batch,
    )
    eval_step = make_eval_step(graphdef, loss_fn, policy)
    state = placed if abstract else init()
    if abstract and template.frozen:  # LoRA: checkpoints hold no base; a restore takes run.state's
        made = [init()]  # made once: the fresh start uses it too
        state = placed.replace(model_state=made[0].model_state)
        init = functools.partial(lambda make: made.pop() if made else make(), init)
    return Run(
        cfg, extra.pop("data", None), policy, graphdef, state, batches, train_step, eval_step,
        plan, init=init, micro_batches=micro, notes=model_notes(shapes), **extra,
    )  # fmt: skip


def with_lora(model, lora: config_lib.LoRAConfig, policy: Policy, seed: int):
    """`model` (a factory or a module) with LoRA adapters in the policy's param dtype when
    `lora.rank > 0` (a module is copied: the caller's keeps none); else `model` itself."""
    check_lora(lora)
    if not lora.rank:
        return model
    kw = dict(dtype=policy.param_dtype)
    if isinstance(model, nnx.Module):  # new modules over the same (never written) variables
        return apply_lora(nnx.merge(*nnx.split(model)), lora, rngs=nnx.Rngs(seed), **kw)
    return lambda rngs: apply_lora(model(rngs), lora, rngs=rngs, **kw)


def _make_plan(shapes, template: TrainState, mesh, rules) -> Plan:
    """`make_plan`, with a LoRA run's frozen base (in `model_state`) sharded by its weights'
    logical names like the params it would be in a full fine-tune."""
    if not template.frozen:
        return make_plan(shapes, template, mesh, rules)
    every = nnx.to_pure_dict(nnx.state(shapes, nnx.Param))  # adapters and base
    plan = make_plan(shapes, template.replace(params=every), mesh, rules)
    flat = {path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(plan.state.params)}
    params = jax.tree_util.tree_map_with_path(lambda p, _: flat[path_str(p)], template.params)
    return dataclasses.replace(plan, state=plan.state.replace(params=params))


def _train_batches(data: Dataset, t: config_lib.TrainConfig):
    """The training feed of a Dataset: arrays are shuffled and batched per step; a Dataset of
    files carries its own step-indexed batches or a grain stream (jaxnv.data.text)."""
    if isinstance(data.train, Mapping):
        return StepBatches(
            data.train,
            t.batch_size,
            t.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    if isinstance(data.train, grain.IterDataset):
        return IterableBatches(data.train)
    return data.train  # step-indexed batches (holds_global): the StepBatches contract


def build(exp: Experiment, devices=None, *, abstract: bool = False) -> Run:
    """Data, policy, optimizer, initial state and compiled steps for an experiment.

    The mesh spans `devices` (default: all devices of all processes). With `abstract=True` the
    state is only shapes and shardings (`jax.ShapeDtypeStruct`s): nothing is allocated, which is
    what a dry run and a restore need.
    """
    cfg = config_lib.validate(exp.config)
    t = cfg.train
    data = exp.make_data(cfg)
    policy = get_policy(cfg.precision.policy)
    p = cfg.precision
    loss_scale = make_loss_scale(
        p.loss_scale, policy, init_scale=p.init_scale, period=p.growth_interval
    )
    updates = t.steps // cfg.optimizer.accumulate_steps  # MultiSteps updates once every k steps
    return _assemble(
        cfg,
        lambda rngs: exp.make_model(cfg, data, policy, rngs),
        exp.resolved_loss_fn(),
        _train_batches(data, t),
        lambda stacked: make_optimizer(cfg.optimizer, updates, stacked=stacked),
        make_schedule(cfg.optimizer, updates),
        policy,
        loss_scale,
        devices,
        abstract,
        data=data,
        eval_data=data.eval,
        name=exp.name,
        summarize=exp.summarize,
    )
