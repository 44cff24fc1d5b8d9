"""`fit`: jaxnv's loop for any Flax NNX model and any data, from Python.

result = fit(model, loss_fn, batches, steps=1000, optimizer=optax.adamw(1e-3), workdir="runs/a")
model = result.model  # trained, in eval mode
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

import jax
import numpy as np
import optax
from flax import nnx

from jaxnv import config as config_lib
from jaxnv.core.optim import OptimizerConfig, make_optimizer, make_schedule
from jaxnv.core.precision import Policy, get_policy, make_loss_scale
from jaxnv.data.pipeline import IndexedBatches, IterableBatches, StepBatches
from jaxnv.data.sources import Dataset
from jaxnv.parallel.mesh import MeshConfig
from jaxnv.parallel.pipeline import attach_pipeline
from jaxnv.train.callbacks import Callback
from jaxnv.train.loop import TrainResult, _assemble, _train


def _as_batches(data, batch_size, seed, on_resume):
    """The training feed for `data`: arrays and Datasets are shuffled and batched per step;
    random-access sources of batches are indexed by step; anything else is iterated."""
    if isinstance(data, Dataset):
        data = data.train
    if getattr(data, "holds_global", False):  # step-indexed batches (jaxnv.data.text)
        return data
    if isinstance(data, Mapping):
        if batch_size is None:
            raise ValueError("fit: arrays need batch_size=N (the global batch) to be batched")
        return StepBatches(
            {k: np.asarray(v) for k, v in data.items()},
            batch_size,
            seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, str):
        return IndexedBatches(data)
    if isinstance(data, Iterable):
        return IterableBatches(data, on_resume)
    raise TypeError(
        f"fit: train_data of type {type(data).__name__} is not data: pass an iterable of batches "
        "(dicts of arrays), a jaxnv Dataset, a dict of arrays with batch_size, or a grain dataset"
    )


def _pipelined(model, cfg):
    """The model (or factory) with the pipeline of `mesh.stage` attached."""
    if isinstance(model, nnx.Module):
        return attach_pipeline(model, cfg)
    return lambda rngs: attach_pipeline(model(rngs), cfg)


def _check_eval_data(data):
    if data is None or isinstance(data, Dataset | Mapping) or callable(data):
        return data
    if iter(data) is data:
        raise ValueError(
            "fit: eval_data is a one-shot iterator, which cannot be evaluated twice: pass a list "
            "of batches, a grain MapDataset, or a function that returns a fresh iterable"
        )
    return data


def fit(
    model: nnx.Module | Callable[[nnx.Rngs], nnx.Module],
    loss_fn: Callable,
    train_data,
    *,
    steps: int,
    optimizer: optax.GradientTransformation | OptimizerConfig | None = None,
    eval_data=None,
    batch_size: int | None = None,
    workdir: str | None = None,
    precision: str | Policy | None = None,
    mesh: MeshConfig | Mapping[str, int] | None = None,
    rules: str | Mapping[str, str | None] | None = None,
    devices=None,
    callbacks: Iterable[Callback] = (),
    evaluators: Mapping[str, Callable] | None = None,
    seed: int = 0,
    micro_batches: int = 1,
    log_every: int = 10,
    eval_every: int = 0,
    eval_batch_size: int = 256,
    checkpoint_every: int = 0,
    keep: int = 3,
    keep_best: int = 0,
    best_metric: str = "loss",
    best_mode: str = "min",
    on_resume: str = "refuse",
    on_nonfinite: str = "skip",
    progress: bool = True,
    tensorboard: bool = True,
    mfu: bool = True,
    lora: config_lib.LoRAConfig | None = None,
    name: str = "fit",
) -> TrainResult:
    """Train any Flax NNX model on any data; the same loop as `jaxnv train`.

    `model` is a module (its current weights are the start) or a factory `rngs -> Module`.
    `loss_fn(model, batch, rng)` returns a loss, `(loss, aux)`, or a `losses.Weighted` (with or
    without aux) for an exact mean over tokens. `train_data` is an iterable or iterator of batches
    (pytrees of numpy or jax arrays), a list or grain `MapDataset` of batches (indexed by step:
    exact resume), a grain `IterDataset`, or a jaxnv `Dataset` / dict of arrays (shuffled per epoch,
    `batch_size` rows a step). `eval_data` likewise, re-iterable (or a function returning an
    iterable); a `Dataset` evaluates on its eval split by default. `optimizer` is an optax
    transformation or an `OptimizerConfig` (default: adamw with jaxnv's defaults).

    With a `workdir`, the run writes `config.json`, `metrics.jsonl`, TensorBoard and orbax
    checkpoints, and running `fit` again on it resumes. A grain `IterDataset`'s position is saved
    with each checkpoint; any other iterable's cannot be: `on_resume="skip"` fast-forwards a fresh
    pass over it, `"refuse"` (default) stops with an error.
    `evaluators` map a name to `fn(model, eval_data) -> dict` of extra eval metrics (the model in
    eval mode). The result's `.model` is the trained module in eval mode.
    `lora=LoRAConfig(rank=8, targets=("wqkv", "wo"))` trains low-rank adapters on those
    projections of a jaxnv Transformer and keeps every other weight frozen (docs/finetuning.md);
    `jaxnv.models.lora.merge(result.model)` folds them in.
    """
    mesh_cfg = mesh if isinstance(mesh, MeshConfig) else MeshConfig(**dict(mesh or {}))
    if rules is not None:
        mesh_cfg = dataclasses.replace(mesh_cfg, rules=rules)
    policy = get_policy(precision or "fp32")
    opt_cfg = optimizer if isinstance(optimizer, OptimizerConfig) else OptimizerConfig()
    cfg = config_lib.Config(
        optimizer=opt_cfg,
        precision=config_lib.PrecisionConfig(policy=str(policy)),
        train=config_lib.TrainConfig(
            steps=steps,
            batch_size=batch_size or 0,
            seed=seed,
            eval_every=eval_every,
            eval_batch_size=eval_batch_size,
            micro_batches=micro_batches,
            on_nonfinite=on_nonfinite,
            best_metric=best_metric,
            best_mode=best_mode,
        ),
        mesh=mesh_cfg,
        checkpoint=config_lib.CheckpointConfig(
            every=checkpoint_every, keep=keep, keep_best=keep_best
        ),  # fmt: skip
        logging=config_lib.LoggingConfig(
            log_every=log_every, tensorboard=tensorboard, progress=progress, mfu=mfu
        ),
        lora=lora or config_lib.LoRAConfig(),
    )
    if isinstance(optimizer, optax.GradientTransformation):
        tx, lr_fn = optimizer, None
    else:
        updates = steps // opt_cfg.accumulate_steps
        lr_fn = make_schedule(opt_cfg, updates)
        tx = lambda stacked: make_optimizer(opt_cfg, updates, stacked=stacked)  # noqa: E731
    batches = _as_batches(train_data, batch_size, seed, on_resume)
    if mesh_cfg.stage > 1:  # the transformer's blocks split over the stage axis
        model = _pipelined(model, cfg)
    if eval_data is None and isinstance(train_data, Dataset):
        eval_data = train_data.eval
    loss_scale = make_loss_scale("auto", policy)
    run = _assemble(
        cfg,
        model,
        loss_fn,
        batches,
        tx,
        lr_fn,
        policy,
        loss_scale,
        devices,
        True,
        data=train_data if isinstance(train_data, Dataset) else None,
        eval_data=_check_eval_data(eval_data),
        name=name,
        evaluators=dict(evaluators or {}),
    )
    run.cfg.train.batch_size = jax.tree.leaves(run.train_step.batch_spec)[0].shape[0]
    return _train(run, workdir, list(callbacks))
