"""`model.init_from=hf:DIR`: a run that starts from a local Hugging Face checkpoint.

The model is the jaxnv `Transformer` of DIR's `config.json` (`pretrained_model`); its initial
params are DIR's safetensors, placed onto the run's own shardings (`pretrained_params`), so
fine-tuning starts from them under any mesh and precision policy. A LoRA run (`lora.rank > 0`)
takes them as its frozen base instead (`pretrained_base`), in the policy's compute dtype.
"""

from __future__ import annotations

import json
import os

import jax

from jaxnv.core.precision import Policy
from jaxnv.core.state import path_str, split_model


def hf_dir(init_from: str) -> str | None:
    """The directory of `model.init_from=hf:DIR` (None when empty); one-line errors otherwise."""
    if not init_from:
        return None
    kind, _, path = init_from.partition(":")
    if kind != "hf" or not path:
        raise ValueError(
            f"model.init_from={init_from!r}: give hf:DIR, a local Hugging Face model directory"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"model.init_from={init_from!r}: {path} holds no config.json (a Hugging Face model "
            "directory: config.json, *.safetensors, tokenizer.json)"
        )
    return path


def pretrained_model(cfg, max_seq_len: int, policy: Policy, rngs):
    """The Transformer of the HF config (randomly initialised: `pretrained_params` fills it),
    with the run's `model.remat` and `model.dropout`."""
    from jaxnv.checkpoint.hf_tables import model_kwargs
    from jaxnv.models import Transformer

    path = hf_dir(cfg.init_from)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        kwargs = model_kwargs(json.load(f), max_seq_len)
    kwargs.update(remat=cfg.remat, dropout=cfg.dropout)
    return Transformer(**kwargs, policy=policy, rngs=rngs)


def _mismatch(init_from: str, path: str) -> ValueError:
    return ValueError(
        f"model.init_from={init_from}: the run's model differs from {path}'s config.json "
        "(a custom make_model?): leave the model to the checkpoint's config"
    )


def pretrained_params(init_from: str, params, shardings, *, policy, mesh, rules, max_seq_len):
    """DIR's weights as the run's params: the same tree as `params`, on `shardings`."""
    from jaxnv.checkpoint.hf import load

    path = hf_dir(init_from)
    model = load(path, policy=policy, mesh=mesh, rules=rules, max_seq_len=max_seq_len)
    loaded = split_model(model)[1]
    if jax.tree.structure(loaded) != jax.tree.structure(params):
        raise _mismatch(init_from, path)
    return jax.device_put(loaded, shardings)


def pretrained_base(init_from: str, state, shardings, *, policy, mesh, rules, max_seq_len):
    """DIR's weights as the frozen base of a LoRA train state: `state.model_state` with each
    leaf named in `state.frozen` replaced by DIR's tensor, in the policy's compute dtype, on its
    sharding in `shardings` (a tree like `state.model_state`)."""
    from jaxnv.checkpoint.hf import load

    path = hf_dir(init_from)
    dtype = policy.compute_dtype
    model = load(path, policy=policy, mesh=mesh, rules=rules, max_seq_len=max_seq_len, dtype=dtype)
    leaves = jax.tree_util.tree_leaves_with_path(nnx_params(model))
    loaded = {path_str(p): x for p, x in leaves}
    if set(loaded) != set(state.frozen):
        raise _mismatch(init_from, path)

    def one(p, x, sharding):
        new = loaded.get(path_str(p))
        if new is None:  # not a base weight (e.g. the adapters' dropout stream)
            return x
        if tuple(new.shape) != tuple(x.shape):
            raise _mismatch(init_from, path)
        return jax.device_put(new, sharding)

    return jax.tree_util.tree_map_with_path(one, state.model_state, shardings)


def nnx_params(model):
    """Every `nnx.Param` of `model` as a pure dict (a loaded model has no adapters)."""
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
