"""Hugging Face architectures as jaxnv `Transformer` settings and per-architecture tensor tables.

    kwargs = model_kwargs(json.load(open("config.json")))      # Transformer(**kwargs, ...)
    for entry in tensor_table(arch, kwargs): ...               # HF names -> our path, both ways

One table per architecture (GPT-2; Llama, with Mistral and Qwen2 as Llama variants): each entry
names our param path, the Hugging Face tensors it is made of with their shapes, and the two
layout transforms. HF `nn.Linear` weights are (out, in); GPT-2's `Conv1D` weights are (in, out).
Our attention param `wqkv` is (D, K, G + 2, H): per kv head k, its G query heads (query head
n = k * G + g, the HF `repeat_kv` order), then key head k, then value head k. Tables give the
embedding and head with the checkpoint's vocabulary; the loader zero-pads them to the model's.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

ARCHITECTURES = {"gpt2": "GPT-2", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
_CLASSES = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_ACTIVATIONS = {"silu": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# Tensors that are buffers or duplicates, not weights: skipped on import.
_IGNORED = {
    "gpt2": re.compile(r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias$|lm_head\.weight$"),
    "llama": re.compile(r".*rotary_emb\.inv_freq$"),
}


def supported() -> str:
    names = ", ".join(f"{v} ({k})" for k, v in ARCHITECTURES.items())
    return f"jaxnv.hf supports {names}"


def architecture(config: dict) -> str:
    """The `model_type` of an HF config dict; a one-line error for anything unsupported."""
    arch = config.get("model_type")
    if arch is None:
        arch = next((_CLASSES.get(c) for c in config.get("architectures") or []), None)
    if arch not in ARCHITECTURES:
        found = arch or (config.get("architectures") or ["<none>"])[0]
        raise ValueError(f"unsupported architecture {found!r} in config.json: {supported()}")
    return arch


def _need(config: dict, key: str):
    if config.get(key) is None:
        raise ValueError(f"config.json has no {key!r}: it is not a complete Hugging Face config")
    return config[key]


def _activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise ValueError(
            f"activation {name!r} in config.json is not supported: jaxnv.hf maps "
            f"{', '.join(_ACTIVATIONS)}"
        )
    return _ACTIVATIONS[name]


def _rope(config: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from `rope_parameters` (transformers >= 5) or `rope_theta` and
    `rope_scaling` (older configs)."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or params
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(
            f"rope_type {kind!r} in config.json is not supported: jaxnv.hf reads default and "
            "llama3 rotary embeddings"
        )
    return theta, {"rope_type": "llama3", **{k: scaling[k] for k in _ROPE_KEYS}}


def model_kwargs(config: dict, max_seq_len: int | None = None) -> dict:
    """`Transformer` constructor arguments (vocab_size included) for an HF config dict.

    `max_seq_len` (default: the config's context length) bounds the sequences the model takes;
    a sliding attention window shorter than it is refused.
    """
    arch = architecture(config)
    vocab = int(_need(config, "vocab_size"))
    if arch == "gpt2":
        for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if config.get(key):
                raise ValueError(f"GPT-2 with {key}=true is not supported by jaxnv.hf")
        if config.get("scale_attn_weights") is False:
            raise ValueError("GPT-2 with scale_attn_weights=false is not supported by jaxnv.hf")
        D, N, n_pos = _need(config, "n_embd"), _need(config, "n_head"), _need(config, "n_positions")
        if max_seq_len is not None and max_seq_len > n_pos:
            raise ValueError(
                f"max_seq_len={max_seq_len} exceeds GPT-2's n_positions={n_pos} (learned "
                f"positions): pass max_seq_len <= {n_pos}"
            )
        return dict(
            vocab_size=vocab, num_layers=_need(config, "n_layer"), num_heads=N, embed_dim=D,
            mlp_dim=config.get("n_inner") or 4 * D, max_seq_len=max_seq_len or n_pos,
            activation=_activation(config.get("activation_function", "gelu_new")),
            tie_embeddings=True, num_kv_heads=N, head_dim=D // N, position="learned",
            norm="layer", norm_eps=float(config.get("layer_norm_epsilon", 1e-5)), mlp="plain",
            qkv_bias=True, out_bias=True, mlp_bias=True,
        )  # fmt: skip
    D, N = _need(config, "hidden_size"), _need(config, "num_attention_heads")
    context = int(_need(config, "max_position_embeddings"))
    max_seq_len = max_seq_len or context
    window = config.get("sliding_window")
    if arch == "qwen2" and not config.get("use_sliding_window"):
        window = None
    if window is not None and window < max_seq_len:
        raise ValueError(
            f"{ARCHITECTURES[arch]} sliding_window={window} is shorter than the context "
            f"{max_seq_len}, and jaxnv attends over the whole context: pass "
            f"max_seq_len={window} (or less) to load it"
        )
    if config.get("mlp_bias"):
        raise ValueError("Llama with mlp_bias=true is not supported by jaxnv.hf")
    theta, scaling = _rope(config)
    bias = bool(config.get("attention_bias", False))
    return dict(
        vocab_size=vocab, num_layers=_need(config, "num_hidden_layers"), num_heads=N,
        embed_dim=D, mlp_dim=_need(config, "intermediate_size"), max_seq_len=max_seq_len,
        activation=_activation(config.get("hidden_act", "silu")),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        num_kv_heads=config.get("num_key_value_heads") or N,
        head_dim=config.get("head_dim") or D // N, position="rope", rope_theta=theta,
        rope_scaling=scaling, norm="rms", norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        mlp="gated", qkv_bias=arch == "qwen2" or bias, out_bias=bias, mlp_bias=False,
    )  # fmt: skip


def hf_config(kw: dict, arch: str, base: dict | None = None) -> dict:
    """The HF config dict of a model with `Transformer` arguments `kw` as architecture `arch`;
    `base` (an imported model's config) supplies the rest (token ids, ...)."""
    out = {k: v for k, v in (base or {}).items() if not k.startswith("_")}
    cls = next(c for c, a in _CLASSES.items() if a == arch)
    out.update(architectures=[cls], model_type=arch, vocab_size=kw["vocab_size"])
    inverse = {"silu": "silu", "gelu_tanh": "gelu_new"}
    if arch == "gpt2":
        out.update(
            n_layer=kw["num_layers"], n_head=kw["num_heads"], n_embd=kw["embed_dim"],
            n_inner=kw["mlp_dim"], n_positions=kw["max_seq_len"],
            activation_function=inverse[kw["activation"]], layer_norm_epsilon=kw["norm_eps"],
            tie_word_embeddings=True,
        )  # fmt: skip
        return out
    rope = {"rope_type": "default", "rope_theta": kw["rope_theta"]}
    rope.update(kw["rope_scaling"] or {})
    # a window, if any, was >= max_seq_len: say "none" (transformers' Mistral default is 4096)
    out.update(sliding_window=None, use_sliding_window=False)
    out.update(
        hidden_size=kw["embed_dim"], intermediate_size=kw["mlp_dim"],
        num_hidden_layers=kw["num_layers"], num_attention_heads=kw["num_heads"],
        num_key_value_heads=kw["num_kv_heads"], head_dim=kw["head_dim"],
        max_position_embeddings=kw["max_seq_len"], hidden_act=inverse[kw["activation"]],
        rms_norm_eps=kw["norm_eps"], tie_word_embeddings=kw["tie_embeddings"],
        rope_parameters=rope, rope_theta=kw["rope_theta"], rope_scaling=kw["rope_scaling"],
    )  # fmt: skip
    if arch == "llama":
        out.update(attention_bias=kw["qkv_bias"], mlp_bias=False)
    return out


@dataclasses.dataclass(frozen=True)
class Entry:
    """One param of ours made of HF tensors `names` (with `shapes`), and the layout transforms."""

    path: tuple[str, ...]  # ("blocks", "0", "attn", "wqkv")
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    to_ours: Callable[..., np.ndarray]  # HF arrays (in `names` order) -> our array
    to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]  # our array -> HF arrays


def _same(x):
    return x


def _one(path, name, shape, to_ours=_same, to_hf=_same) -> Entry:
    return Entry(path, (name,), (shape,), to_ours, lambda x: (to_hf(x),))


def _norm(path, prefix, D, bias: bool) -> list[Entry]:
    out = [_one((*path, "scale"), f"{prefix}.weight", (D,))]
    return out + ([_one((*path, "bias"), f"{prefix}.bias", (D,))] if bias else [])


def _llama(kw: dict, arch: str) -> list[Entry]:
    D, N, K, H, F = (
        kw[k] for k in ("embed_dim", "num_heads", "num_kv_heads", "head_dim", "mlp_dim")
    )
    vocab, G = kw["vocab_size"], N // K
    table = [
        _one(("embedding",), "model.embed_tokens.weight", (vocab, D), to_hf=lambda x: x[:vocab]),
        *_norm(("final_norm",), "model.norm", D, False),
    ]  # fmt: skip
    if not kw["tie_embeddings"]:
        table.append(
            _one(("head",), "lm_head.weight", (vocab, D), np.transpose, lambda x: x[:, :vocab].T)
        )  # fmt: skip

    def qkv_ours(q, k, v):  # (N*H, ...), (K*H, ...) x2 -> (..., K, G + 2, H) with ... = D or ()
        rest = q.shape[1:]
        parts = [q.reshape(K, G, H, *rest), k.reshape(K, 1, H, *rest), v.reshape(K, 1, H, *rest)]
        x = np.concatenate(parts, axis=1)  # (K, G + 2, H, ...)
        return x.transpose(3, 0, 1, 2) if rest else x

    def qkv_hf(x):  # our (..., K, G + 2, H) -> HF q, k, v
        x = x.transpose(1, 2, 3, 0) if x.ndim == 4 else x  # (K, G + 2, H, ...)
        rest = x.shape[3:]
        return (x[:, :G].reshape(N * H, *rest), x[:, G].reshape(K * H, *rest),
                x[:, G + 1].reshape(K * H, *rest))  # fmt: skip

    for i in range(kw["num_layers"]):
        p, ours = f"model.layers.{i}.", ("blocks", str(i))
        attn = [f"{p}self_attn.{w}_proj" for w in "qkv"]
        gate_up = (f"{p}mlp.gate_proj.weight", f"{p}mlp.up_proj.weight")
        table += [
            *_norm((*ours, "attn_norm"), f"{p}input_layernorm", D, False),
            *_norm((*ours, "mlp_norm"), f"{p}post_attention_layernorm", D, False),
            Entry((*ours, "attn", "wqkv"), tuple(f"{a}.weight" for a in attn),
                  ((N * H, D), (K * H, D), (K * H, D)), qkv_ours, qkv_hf),
            _one((*ours, "attn", "wo"), f"{p}self_attn.o_proj.weight", (D, N * H),
                 lambda w: w.T.reshape(N, H, D), lambda x: x.reshape(N * H, D).T),
            Entry((*ours, "mlp", "w_gate_up"), gate_up,
                  ((F, D), (F, D)), lambda g, u: np.stack([g.T, u.T], axis=1),
                  lambda x: (x[:, 0].T, x[:, 1].T)),
            _one((*ours, "mlp", "w_down"), f"{p}mlp.down_proj.weight", (D, F), np.transpose,
                 np.transpose),
        ]  # fmt: skip
        if kw["qkv_bias"]:
            table.append(
                Entry((*ours, "attn", "bqkv"), tuple(f"{a}.bias" for a in attn),
                      ((N * H,), (K * H,), (K * H,)), qkv_ours, qkv_hf)
            )  # fmt: skip
        if kw["out_bias"]:
            table.append(_one((*ours, "attn", "bo"), f"{p}self_attn.o_proj.bias", (D,)))
    return table


def _gpt2(kw: dict) -> list[Entry]:
    D, N, F, vocab = kw["embed_dim"], kw["num_heads"], kw["mlp_dim"], kw["vocab_size"]
    H, T = D // N, kw["max_seq_len"]
    t = "transformer."
    table = [
        _one(("embedding",), f"{t}wte.weight", (vocab, D), to_hf=lambda x: x[:vocab]),
        # the first max_seq_len positions (all of them unless a shorter context was asked for)
        Entry(("pos_embedding",), (f"{t}wpe.weight",), ((None, D),), lambda w: w[:T],
              lambda x: (x,)),
        *_norm(("final_norm",), f"{t}ln_f", D, True),
    ]  # fmt: skip
    for i in range(kw["num_layers"]):
        p, ours = f"{t}h.{i}.", ("blocks", str(i))
        table += [
            *_norm((*ours, "attn_norm"), f"{p}ln_1", D, True),
            *_norm((*ours, "mlp_norm"), f"{p}ln_2", D, True),
            # Conv1D (D, 3D): columns are [q | k | v], each (N, H): ours is (D, N, 3, H), G = 1
            _one((*ours, "attn", "wqkv"), f"{p}attn.c_attn.weight", (D, 3 * D),
                 lambda w: w.reshape(D, 3, N, H).transpose(0, 2, 1, 3),
                 lambda x: x.transpose(0, 2, 1, 3).reshape(D, 3 * D)),
            _one((*ours, "attn", "bqkv"), f"{p}attn.c_attn.bias", (3 * D,),
                 lambda b: b.reshape(3, N, H).transpose(1, 0, 2),
                 lambda x: x.transpose(1, 0, 2).reshape(3 * D)),
            _one((*ours, "attn", "wo"), f"{p}attn.c_proj.weight", (D, D),
                 lambda w: w.reshape(N, H, D), lambda x: x.reshape(D, D)),
            _one((*ours, "attn", "bo"), f"{p}attn.c_proj.bias", (D,)),
            _one((*ours, "mlp", "w_up"), f"{p}mlp.c_fc.weight", (D, F)),
            _one((*ours, "mlp", "b_up"), f"{p}mlp.c_fc.bias", (F,)),
            _one((*ours, "mlp", "w_down"), f"{p}mlp.c_proj.weight", (F, D)),
            _one((*ours, "mlp", "b_down"), f"{p}mlp.c_proj.bias", (D,)),
        ]  # fmt: skip
    return table


def tensor_table(arch: str, kw: dict) -> list[Entry]:
    """The entries of architecture `arch` for a model with `Transformer` arguments `kw`."""
    return _gpt2(kw) if arch == "gpt2" else _llama(kw, arch)


def canonical_name(arch: str, name: str) -> str | None:
    """The table's name for a checkpoint tensor name, or None for a buffer to skip. GPT-2
    checkpoints exist with and without the `transformer.` prefix."""
    if _IGNORED["gpt2" if arch == "gpt2" else "llama"].match(name):
        return None
    if arch == "gpt2" and not name.startswith("transformer."):
        return "transformer." + name
    return name
