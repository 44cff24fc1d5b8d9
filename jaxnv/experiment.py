"""Experiments: a config plus, where needed, their own model, loss or data.

An experiment file (`experiments/NAME.py`) defines `config() -> Config` and may define
`make_model(cfg, data, policy, rngs)`, `loss_fn(model, batch, rng)`, `make_data(cfg)` and
`summarize(result) -> dict`. Whatever it leaves out comes from the config's registries.

A name is looked up in `./experiments`, then in the installed `jaxnv.experiments` package (the
repository's `experiments/`, shipped by `pip install`); a path to a `.py` file is loaded as is.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flax import nnx

from jaxnv.config import Config
from jaxnv.core.losses import get_loss_fn
from jaxnv.core.precision import Policy
from jaxnv.data.builtin import make_dataset
from jaxnv.data.sources import Dataset
from jaxnv.models import build_model
from jaxnv.parallel.pipeline import attach_pipeline  # mesh.stage > 1: split the blocks


def default_make_model(cfg: Config, data: Dataset, policy: Policy, rngs: nnx.Rngs) -> nnx.Module:
    """The registry model `cfg.model.name` sized for `data` (or, with `model.init_from=hf:DIR`,
    the transformer of DIR's config.json; the loop loads its weights)."""
    tokenizer = data.info.get("tokenizer")
    if getattr(cfg.model, "init_from", ""):
        from jaxnv.checkpoint.pretrained import pretrained_model

        model = pretrained_model(cfg.model, cfg.model.max_seq_len or data.in_features, policy, rngs)
        if tokenizer is not None and model.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} ids but {cfg.model.init_from}'s "
                f"vocabulary {model.vocab_size}: use the checkpoint's own tokenizer (leave "
                "data.tokenizer unset)"
            )
        return attach_pipeline(model, cfg)
    vocab = getattr(cfg.model, "vocab_size", 0)
    if tokenizer is not None and vocab and vocab < tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size={vocab} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size} ids): leave model.vocab_size=0 (from the data) or raise it"
        )
    model = build_model(cfg.model, data.in_features, data.out_features, policy, rngs)
    return attach_pipeline(model, cfg)


def default_make_data(cfg: Config) -> Dataset:
    """The data set `cfg.data.name`: a built-in one, arrays from a file, or the user's own text
    files (`files`: batched by the data itself, as the global batch of `train.batch_size`)."""
    if cfg.data.name == "files":
        import dataclasses as dc

        import jax

        from jaxnv.checkpoint.pretrained import hf_dir

        pretrained = hf_dir(getattr(cfg.model, "init_from", ""))
        if pretrained and not cfg.data.tokenizer:  # the checkpoint's own tokenizer.json
            cfg = dc.replace(cfg, data=dc.replace(cfg.data, tokenizer=pretrained))

        from jaxnv.data.text import files_dataset

        return files_dataset(
            cfg.data,
            cfg.train.batch_size,
            cfg.train.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    return make_dataset(cfg.data)


@dataclasses.dataclass
class Experiment:
    """What `train` needs: a config and the functions that build model, loss and data."""

    config: Config
    name: str = "custom"
    make_model: Callable[..., nnx.Module] = default_make_model
    loss_fn: Callable | None = None  # None: `get_loss_fn(config.train.loss)`
    make_data: Callable[[Config], Dataset] = lambda cfg: default_make_data(cfg)
    summarize: Callable[[Any], dict] | None = None

    def resolved_loss_fn(self) -> Callable:
        return self.loss_fn or get_loss_fn(self.config.train.loss)


def _installed_dirs() -> list[Path]:
    """The directories of the `jaxnv.experiments` package (installed from `experiments/`)."""
    # found, not imported: its files are loaded one by one as experiments
    spec = importlib.util.find_spec("jaxnv.experiments")
    if spec is None:  # an editable install from before the mapping, or a bare source tree
        return []
    return [Path(p) for p in spec.submodule_search_locations or []]


def experiment_dirs() -> list[Path]:
    """Where experiment names are looked up, in order.

    `./experiments` (the user's own, so a name there shadows a shipped one), then the package
    `jaxnv.experiments` that `pip install` ships (the repository's `experiments/`), then the
    `experiments/` of the source checkout this module runs from, if it runs from one.
    """
    dirs = [Path.cwd() / "experiments", *_installed_dirs()]
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file():
        dirs.append(checkout / "experiments")
    return list(dict.fromkeys(d.resolve() for d in dirs if d.is_dir()))


def available_experiments() -> list[str]:
    """Names of the experiments that `load_experiment` can find."""
    names = {
        p.stem for d in experiment_dirs() for p in d.glob("*.py") if not p.stem.startswith("_")
    }
    return sorted(names)


def _find(name: str) -> Path:
    if name.endswith(".py") or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"experiment file {name!r} does not exist: check the path")
        return path
    for d in experiment_dirs():
        if (d / f"{name}.py").is_file():
            return d / f"{name}.py"
    names = available_experiments()
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(names)}"
    raise ValueError(f"unknown experiment {name!r}: {hint} (or pass a path to a .py file)")


def load_experiment(name: str) -> Experiment:
    """The experiment `name` (found in `experiment_dirs()`), or the `.py` file at path `name`."""
    path = _find(name)
    mod_name = f"jaxnv_experiment_{path.stem}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    if not hasattr(module, "config"):
        raise ValueError(f"experiment {path} defines no config() function: add one")
    exp = Experiment(config=module.config(), name=path.stem)
    for field in ("make_model", "loss_fn", "make_data", "summarize"):
        if hasattr(module, field):
            setattr(exp, field, getattr(module, field))
    return exp
