"""Hugging Face checkpoints in and out: `config.json` + safetensors (+ `tokenizer.json`).

    model = load("path/to/hf_dir", mesh=mesh)       # an nnx Transformer, params on their shardings
    logits = model(tokens)                          # (B, T) int32 -> (B, T, vocab_size)
    save(model, "out_dir")                          # transformers.AutoModelForCausalLM loads it

Import builds the model abstractly (`nnx.eval_shape`), computes each param's sharding from its
logical names with the training plan (`make_plan`), then reads one safetensors file at a time and
places each tensor straight onto its sharding: host memory peaks near one file, not the model.
Only `safetensors` (numpy) and `tokenizers` are used; PyTorch pickles are refused, never opened.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxnv.checkpoint import hf_tables as tables
from jaxnv.core.precision import Policy, get_policy
from jaxnv.core.state import TrainState, abstract_model
from jaxnv.models.sharding import LAYER_AXIS
from jaxnv.models.transformer import Transformer
from jaxnv.parallel.mesh import MeshConfig, logical_axes, make_mesh, make_plan, path_names

INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_SOURCE = "_jaxnv_source"  # where an imported model came from (for its tokenizer on export)


def _config(path: Path) -> dict:
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory: pass a Hugging Face model directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no config.json: pass a Hugging Face model directory (config.json + "
            "*.safetensors)"
        )
    return json.loads((path / "config.json").read_text())


def weight_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of an HF directory and, when sharded, the index's name -> file map."""
    if (path / INDEX).is_file():
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (path / f).is_file():
                raise FileNotFoundError(
                    f"shard {f} named in {path / INDEX} is missing: download the whole checkpoint"
                )
        return [path / f for f in files], weight_map
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files, None
    pickles = sorted(p.name for p in (*path.glob("*.bin"), *path.glob("*.pt"), *path.glob("*.pth")))
    if pickles:
        raise ValueError(
            f"{path} holds only PyTorch pickle weights ({', '.join(pickles[:3])}), which jaxnv "
            "never unpickles: convert them to safetensors (model.save_pretrained(dir, "
            "safe_serialization=True))"
        )
    raise FileNotFoundError(f"{path} has no *.safetensors weights: download the model's weights")


def load_tokenizer(path: str | os.PathLike, vocab_size: int | None = None):
    """The `tokenizers.Tokenizer` of an HF directory's tokenizer.json (or of that file), checked
    to fit a model of `vocab_size` (None: not checked); None when the directory has none."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        return None
    tokenizer = Tokenizer.from_file(str(file))
    if vocab_size is not None and tokenizer.get_vocab_size() > vocab_size:
        raise ValueError(
            f"{file} has {tokenizer.get_vocab_size()} tokens but the model's vocabulary is "
            f"{vocab_size}: use the tokenizer that was saved with this model"
        )
    return tokenizer


def _tensors(file: Path):
    """(name, read) for each tensor of a safetensors file; `read()` returns it as numpy.

    Each read maps the file only while it copies that tensor out: mapped pages count as resident
    memory, so a file held open while all its tensors are read would add its whole size on top.
    """
    with safe_open(file, framework="np") as f:
        names = list(f.keys())

    def read(name):
        with safe_open(file, framework="np") as f:
            return f.get_tensor(name)

    for name in names:
        yield name, lambda name=name: read(name)


def _checked(entry: tables.Entry, arrays, where: dict[str, str]) -> None:
    for name, want, x in zip(entry.names, entry.shapes, arrays, strict=True):
        if len(want) != x.ndim or any(
            w is not None and w != s for w, s in zip(want, x.shape, strict=True)
        ):
            raise ValueError(
                f"tensor {name} in {where[name]} has shape {tuple(x.shape)} but config.json "
                f"implies {tuple(want)}: the weights do not match their config.json"
            )


def _builder(kwargs: dict, policy: Policy):
    return lambda rngs: Transformer(**kwargs, policy=policy, rngs=rngs)


def _shardings(abstract, mesh, rules) -> dict[tuple[str, ...], jax.sharding.Sharding]:
    """Each param's sharding, from the same plan a training run makes."""
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    template = TrainState(step=None, params=params, opt_state=None, model_state=None,
                          loss_scale=None, rng=None)  # fmt: skip
    plan = make_plan(abstract, template, mesh, rules)
    leaves = jax.tree_util.tree_leaves_with_path(plan.state.params)
    return {path_names(p): s for p, s in leaves}


def load(path, *, policy=None, mesh=None, rules="fsdp", dtype=None, max_seq_len=None):
    """The jaxnv `Transformer` of a Hugging Face directory (config.json + safetensors).

    Params are stored in `dtype` (default: the policy's param dtype, float32) and placed on
    `mesh` (default: the first device) by the sharding `rules` (a preset name or dict). Logits
    (B, T, vocab_size) equal the HF model's. `max_seq_len` (default: the config's context)
    bounds the sequences the model takes.
    """
    path = Path(path)
    config = _config(path)
    arch = tables.architecture(config)
    kwargs = tables.model_kwargs(config, max_seq_len)
    files, weight_map = weight_files(path)
    load_tokenizer(path, kwargs["vocab_size"])  # refuse a tokenizer larger than the vocabulary
    policy = get_policy(policy)
    if dtype is not None:
        policy = Policy(dtype, policy.compute_dtype, policy.output_dtype)
    if mesh is None:
        mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    abstract = abstract_model(_builder(kwargs, policy))
    shardings = _shardings(abstract, mesh, rules)
    names = logical_axes(abstract)
    params = {
        path_names(p): jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings[path_names(p)])
        for p, x in jax.tree_util.tree_leaves_with_path(
            nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
        )
    }
    # the tables name each layer's params ("blocks", "i", ...); the model stacks them
    L = kwargs["num_layers"]
    targets = _per_layer(params, _layer_target, L)
    stacked_names = {p: n for p, n in names.items() if n[:1] == (LAYER_AXIS,)}
    names.update(_per_layer(stacked_names, lambda n, i: n[1:], L))
    stacks: dict[tuple[str, ...], jax.Array] = {}

    table = tables.tensor_table(arch, kwargs)
    by_name = {name: entry for entry in table for name in entry.names}
    pending: dict[str, np.ndarray] = {}  # HF tensors of params whose other parts are still unread
    where: dict[str, str] = {}
    placed: dict[tuple[str, ...], jax.Array] = {}
    for file in files:
        for raw, tensor in _tensors(file):
            name = tables.canonical_name(arch, raw)
            if name is None or (name == "lm_head.weight" and kwargs["tie_embeddings"]):
                continue  # a buffer, or the tied head (the embedding itself)
            if name not in by_name:
                raise ValueError(
                    f"tensor {raw} in {file.name} is not part of a {tables.ARCHITECTURES[arch]} "
                    "model: the weights do not match their config.json"
                )
            where[name], pending[name] = file.name, tensor()
            entry = by_name[name]
            if all(n in pending for n in entry.names):
                arrays = [pending.pop(n) for n in entry.names]
                want = targets[entry.path]
                logical = names.get(entry.path) or (None,) * len(want.shape)
                placed[entry.path] = _place(entry, arrays, where, want, logical)
                del arrays  # before the next file is read
                if _is_layer(entry.path):  # into its stack at once: one layer's copy at a time
                    stacked = (entry.path[0], *entry.path[2:])
                    full = params[stacked]
                    if stacked not in stacks:  # zeros made on the host shard by shard
                        stacks[stacked] = jax.make_array_from_callback(
                            full.shape, full.sharding,
                            lambda index, full=full: np.zeros(_shard_shape(index, full.shape),
                                                              full.dtype))  # fmt: skip
                    i = np.int32(entry.path[1])  # traced: one compilation for all layers
                    with jax.set_mesh(full.sharding.mesh):  # not a caller's mesh in context
                        stacks[stacked] = _insert(full.sharding)(stacks[stacked],
                                                                 placed[entry.path], i)  # fmt: skip
                    placed[entry.path] = None  # its stack holds it now
    missing = [n for e in table if e.path not in placed for n in e.names if n not in where]
    if missing:
        raise ValueError(
            f"{len(missing)} tensors are missing from {path} (first: {', '.join(missing[:3])}): "
            "the weights do not match their config.json, or shards are missing"
        )
    placed.update(stacks)
    state = nnx.state(abstract, nnx.Param)
    pure = jax.tree_util.tree_map_with_path(
        lambda p, _: placed[path_names(p)], nnx.to_pure_dict(state)
    )
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(abstract, state)
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(abstract))):
        raise NotImplementedError("the model has non-param state that jaxnv.hf does not fill")
    abstract.hf_config = json.dumps({**config, _SOURCE: str(path.resolve())})
    return abstract


def _place(entry, arrays, where, want, names) -> jax.Array:
    """Our param from its HF tensors, checked and put straight onto its sharding (`want`, a
    ShapeDtypeStruct with one), zero-padded along its "vocab" axes (logical `names`)."""
    _checked(entry, arrays, where)
    value = entry.to_ours(*arrays)  # often a view: transposes and reshapes copy nothing
    pad = [w - v for w, v in zip(want.shape, value.shape, strict=False)]
    if value.ndim != len(want.shape) or any(p and (p < 0 or n != "vocab") for p, n in
                                            zip(pad, names, strict=True)):  # fmt: skip
        raise ValueError(
            f"tensor {entry.names[0]} maps to {'/'.join(entry.path)} of shape {value.shape}, "
            f"but the model has {want.shape}: the weights do not match their config.json"
        )

    def piece(index):  # one device's slice, padded and cast: no full-size copy is ever made
        if not any(pad):
            return np.asarray(value[index], want.dtype)
        bounds = [s.indices(n)[:2] for s, n in zip(index, want.shape, strict=True)]
        out = np.zeros([b - a for a, b in bounds], want.dtype)
        have = [(a, max(a, min(b, n))) for (a, b), n in zip(bounds, value.shape, strict=True)]
        out[tuple(slice(0, b - a) for a, b in have)] = value[tuple(slice(a, b) for a, b in have)]
        return out

    return jax.make_array_from_callback(want.shape, want.sharding, piece)


def _is_layer(path: tuple[str, ...]) -> bool:
    """Whether `path` names one layer's param, ("blocks", "i", ...), as the tables do."""
    return len(path) > 2 and path[0] == "blocks" and path[1].isdigit()


def _per_layer(tree: dict, layer_of, num_layers: int) -> dict:
    """`tree` (paths -> values) with each stacked ("blocks", ...) entry x replaced by one entry
    ("blocks", "i", ...) a layer, holding `layer_of(x, i)`."""
    out = {}
    for path, x in tree.items():
        if path[0] != "blocks":
            out[path] = x
            continue
        for i in range(num_layers):
            out[(path[0], str(i), *path[1:])] = layer_of(x, i)
    return out


def _layer_target(want: jax.ShapeDtypeStruct, i: int) -> jax.ShapeDtypeStruct:
    """One layer of a stacked param: its shape and sharding without the layer axis."""
    spec = jax.sharding.PartitionSpec(*tuple(want.sharding.spec)[1:])
    sharding = jax.sharding.NamedSharding(want.sharding.mesh, spec)
    return jax.ShapeDtypeStruct(want.shape[1:], want.dtype, sharding=sharding)


def _shard_shape(index, shape) -> tuple[int, ...]:
    return tuple(len(range(*s.indices(n))) for s, n in zip(index, shape, strict=True))


@functools.cache
def _insert(sharding):
    """stack, layer, i -> the stack with layer i replaced, in place (the stack is donated)."""

    def insert(stack, layer, i):
        return jax.lax.dynamic_update_index_in_dim(stack, layer.astype(stack.dtype), i, 0)

    return jax.jit(insert, out_shardings=sharding, donate_argnums=0)


def _param_tree(model) -> dict[tuple[str, ...], jax.Array]:
    """The model's params by path, a stacked param as one entry a layer (as the tables name
    them)."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tree = {path_names(p): x for p, x in jax.tree_util.tree_leaves_with_path(pure)}
    return _per_layer(tree, lambda x, i: x[i], model.num_layers)


def export_kwargs(model: Transformer) -> dict:
    """The `Transformer` arguments of a built model (structure read from its params)."""
    params = _param_tree(model)
    D, K, G2, H = params[("blocks", "0", "attn", "wqkv")].shape
    gated = ("blocks", "0", "mlp", "w_gate_up") in params
    kw = dict(
        vocab_size=model.vocab_size, num_layers=model.num_layers, num_heads=K * (G2 - 2),
        embed_dim=D, mlp_dim=params[("blocks", "0", "mlp", "w_down")].shape[0],
        max_seq_len=model.max_seq_len, tie_embeddings=("head",) not in params, num_kv_heads=K,
        head_dim=H, position="learned" if ("pos_embedding",) in params else "rope",
        norm="layer" if ("final_norm", "bias") in params else "rms",
        mlp="gated" if gated else "plain",
        qkv_bias=("blocks", "0", "attn", "bqkv") in params,
        out_bias=("blocks", "0", "attn", "bo") in params,
        mlp_bias=("blocks", "0", "mlp", "b_up") in params,
        vocab_multiple=model.vocab_multiple,
    )  # fmt: skip
    for key in ("activation", "rope_theta", "norm_eps"):
        kw[key] = getattr(model, key)
    scaling = getattr(model, "rope_scaling", None)  # kept as sorted (key, value) pairs
    kw["rope_scaling"] = None if scaling is None else dict(scaling)
    return kw


def _export_architecture(kw: dict, base: dict | None) -> str:
    """The HF architecture that represents a model exactly; a one-line error if none does."""
    arch = base.get("model_type") if base else None
    if arch is None:
        learned = kw["position"] == "learned"
        arch = "gpt2" if learned else "qwen2" if kw["qkv_bias"] and not kw["out_bias"] else "llama"
    gpt2 = dict(position="learned", norm="layer", mlp="plain", activation="gelu_tanh",
                tie_embeddings=True, num_kv_heads=kw["num_heads"], qkv_bias=True, out_bias=True,
                mlp_bias=True, rope_scaling=None)  # fmt: skip
    llama = dict(position="rope", norm="rms", mlp="gated", activation="silu", mlp_bias=False)
    want = gpt2 if arch == "gpt2" else llama
    if arch == "gpt2" and kw["head_dim"] * kw["num_heads"] != kw["embed_dim"]:
        want = {**want, "head_dim": kw["embed_dim"] // kw["num_heads"]}
    if arch == "qwen2":
        want = {**want, "qkv_bias": True, "out_bias": False}
    if arch in ("mistral", "llama"):
        want = {**want, "qkv_bias": kw["out_bias"] if arch == "llama" else False, "out_bias":
                kw["qkv_bias"] if arch == "llama" else False}  # fmt: skip
    wrong = [f"{k}={kw[k]!r}" for k, v in want.items() if kw[k] != v]
    if wrong:
        raise ValueError(
            f"this model has {', '.join(wrong)}, which a {tables.ARCHITECTURES[arch]} checkpoint "
            f"cannot hold: {tables.supported()} in their own layouts"
        )
    return arch


def _tokenizer_files(tokenizer, base: dict | None, vocab_size: int, out: Path) -> None:
    """Write the tokenizer (a tokenizers.Tokenizer, a tokenizer.json, an HF directory, or None:
    the imported model's own) into `out`, checked against the vocabulary."""
    if tokenizer is None and base and base.get(_SOURCE):
        tokenizer = (
            Path(base[_SOURCE]) if (Path(base[_SOURCE]) / "tokenizer.json").is_file() else None
        )
    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, os.PathLike)):
        source = Path(tokenizer)
        if load_tokenizer(source, vocab_size) is None:
            raise FileNotFoundError(
                f"{source} has no tokenizer.json: pass a tokenizer.json or its directory"
            )
        if source.is_dir():
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copyfile(source / name, out / name)
        else:
            shutil.copyfile(source, out / "tokenizer.json")
        return
    if tokenizer.get_vocab_size() > vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocabulary "
            f"is {vocab_size}: pass the model's own tokenizer"
        )
    tokenizer.save(str(out / "tokenizer.json"))


def save(model, path, *, tokenizer=None, dtype=None, max_shard_bytes: int = 4 << 30) -> Path:
    """Write `model` as a Hugging Face directory `path` (config.json, safetensors, tokenizer)
    that `transformers.AutoModelForCausalLM.from_pretrained(path)` loads with the same logits.

    The architecture is the imported one, else inferred (GPT-2, Qwen2 or Llama). Weights are
    written in `dtype` (default: the params' own) in shards of at most `max_shard_bytes`, with
    an index when there are several. `path` must not exist or be empty: nothing is overwritten.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} already exists and is not empty: choose a new directory")
    dtype = None if dtype is None else jnp.dtype(dtype)
    base = json.loads(model.hf_config) if getattr(model, "hf_config", None) else None
    kw = export_kwargs(model)
    arch = _export_architecture(kw, base)
    params = _param_tree(model)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for entry in tables.tensor_table(arch, kw):
        value = np.asarray(jax.device_get(params[entry.path]))  # one param on the host at a time
        value = value.astype(dtype or value.dtype, copy=False)
        for name, x in zip(entry.names, entry.to_hf(value), strict=True):
            if size and size + x.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = np.ascontiguousarray(x)
            size += x.nbytes
    config = tables.hf_config(kw, arch, base)
    config["torch_dtype"] = config["dtype"] = np.dtype(dtype or value.dtype).name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        names = ["model.safetensors"] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
        ]  # fmt: skip
        for name, shard in zip(names, shards, strict=True):
            save_file(shard, tmp / name, metadata={"format": "pt"})
        if len(shards) > 1:
            total = sum(x.nbytes for s in shards for x in s.values())
            weight_map = {n: f for f, s in zip(names, shards, strict=True) for n in s}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX).write_text(json.dumps(index, indent=2))
        _tokenizer_files(tokenizer, base, kw["vocab_size"], tmp)
        if path.exists():
            path.rmdir()  # empty, checked above
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
