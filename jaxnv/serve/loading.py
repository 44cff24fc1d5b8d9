"""A language model and its tokenizer from a training workdir or a Hugging Face directory, for
`jaxnv generate` (and serving).

    lm = load_lm("runs/code_lm")            # or a local Hugging Face model directory
    ids = lm.tokenizer.encode("def f(")
    out = lm.complete(["def f(", "import "], max_new_tokens=20, temperature=0.0)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from jaxnv.data.tokenizers import Tokenizer, load_saved


@dataclasses.dataclass
class LanguageModel:
    """A model's graph and weights with the tokenizer its ids come from."""

    graphdef: Any
    params: Any
    model_state: Any
    tokenizer: Tokenizer
    source: str  # what it was loaded from (workdir and step, or the Hugging Face directory)
    max_seq_len: int

    @property
    def name(self) -> str:
        """A short name: the directory's base name (what `jaxnv serve` calls the model)."""
        path = self.source.split(" (step ")[0].rstrip("/\\")
        return os.path.basename(path) or "jaxnv"

    def complete(self, prompts: list[str], max_new_tokens: int, *, stop: tuple[str, ...] = (),
                 **sampling) -> list[str]:  # fmt: skip
        """The continuation of each text prompt (up to the first stop id or `stop` string)."""
        from jaxnv.models import generate

        rows = [self.tokenizer.encode(p) for p in prompts]
        if any(not r for r in rows):
            raise ValueError("a prompt encodes to no tokens: give a non-empty prompt")
        longest = max(len(r) for r in rows)
        room = self.max_seq_len - longest
        if room < 1:
            raise ValueError(
                f"the prompt is {longest} tokens, the model's context {self.max_seq_len}: "
                "shorten the prompt"
            )
        new = generate(
            self.graphdef,
            self.params,
            rows,
            min(int(max_new_tokens), room),
            model_state=self.model_state,
            stop_ids=(self.tokenizer.eos_id,),
            **sampling,
        )
        texts = []
        for ids in new:
            ids = [int(i) for i in np.asarray(ids) if int(i) != self.tokenizer.eos_id]
            text = self.tokenizer.decode(ids)
            cuts = [text.find(s) for s in stop if s and s in text]
            texts.append(text[: min(cuts)] if cuts else text)
        return texts


def load_lm(path: str, *, step: int | str | None = None, experiment: str | None = None):
    """The model at `path`: a workdir written by `jaxnv train` (its newest checkpoint, or `step`)
    or a local Hugging Face model directory (config.json, safetensors, tokenizer.json)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a directory: give a workdir or a model directory")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return _from_workdir(path, step, experiment)
    if os.path.isfile(os.path.join(path, "config.json")):
        return _from_hf(path)
    raise FileNotFoundError(
        f"{path!r} holds neither checkpoints/ (a jaxnv workdir) nor config.json (a Hugging Face "
        "model): train first, or give a model directory"
    )


def _from_hf(path: str) -> LanguageModel:
    from flax import nnx

    from jaxnv.data.tokenizers import HFTokenizer
    from jaxnv.hf import load

    model = load(path)  # refuses a tokenizer larger than the model's vocabulary
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"{path} has no tokenizer.json, so its ids have no text: save the model with its "
            "tokenizer (jaxnv.hf.save(model, dir, tokenizer=...))"
        )
    tokenizer = HFTokenizer.from_file(file)  # with the eos token its config names
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return LanguageModel(graphdef, params, rest, tokenizer, path, model.max_seq_len)


def _from_workdir(workdir: str, step, experiment: str | None) -> LanguageModel:
    import jax
    from flax import nnx

    from jaxnv import config as config_lib
    from jaxnv.checkpoint.manager import Checkpointer
    from jaxnv.data.sources import Dataset
    from jaxnv.experiment import Experiment, load_experiment
    from jaxnv.parallel.mesh import MeshConfig
    from jaxnv.train.loop import build

    tok_dir = os.path.join(workdir, "tokenizer")
    if not os.path.isdir(tok_dir):
        raise FileNotFoundError(
            f"{workdir} has no tokenizer/: it was not trained on text files (data.name=files), "
            "so its ids have no text to decode"
        )
    tokenizer = load_saved(tok_dir)
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        cfg = config_lib.from_dict(json.load(f))
    # the weights are what matters here: one replica on this machine's devices
    cfg = dataclasses.replace(cfg, mesh=MeshConfig())
    exp = load_experiment(experiment) if experiment else Experiment(config=cfg, name="workdir")
    exp.config = cfg
    seq = cfg.data.seq_len
    rows = np.zeros((cfg.train.batch_size, seq), np.int32)

    def make_data(_cfg) -> Dataset:  # shapes only: the training files need not be here
        info = {"tokenizer": tokenizer, "seq_len": seq}
        return Dataset({"x": rows, "y": rows}, None, seq, tokenizer.vocab_size, "lm", info)

    exp.make_data = make_data
    exp.summarize = None
    run = build(exp, abstract=True)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        state, _ = ckpt.restore(run.state, step=step)
    finally:
        ckpt.close()
    max_len = nnx.merge(run.graphdef, state.params, state.model_state).max_seq_len
    done = int(jax.device_get(state.step))
    return LanguageModel(
        run.graphdef,
        state.params,
        state.model_state,
        tokenizer,
        f"{workdir} (step {done})",
        int(max_len),
    )
