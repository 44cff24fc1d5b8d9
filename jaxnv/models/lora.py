"""Low-rank adapters (LoRA, Hu et al. 2021) on a transformer's projections.

    model = apply_lora(Transformer(...), cfg.lora, rngs=nnx.Rngs(0))   # adds the adapters
    logits = model(tokens)            # W x + (alpha / r) * B(A(dropout(x))), the same as before
    merged = merge(model)             # W + (alpha / r) * A @ B folded in: a plain model again

A target weight W (`wqkv` (D, K, G+2, H), `wo` (N, H, D), `w_gate_up` (D, 2, F), `w_up` (D, F),
`w_down` (F, D)) gets an adapter beside it, `<name>_lora`, holding A (in..., r), normal with std
1/sqrt(in), and B (r, out...), zeros: the model starts exactly at the base. Both are
`nnx.LoRAParam`s (flax's own type, a subclass of `nnx.Param`), with the logical axis names of W's
input (A) and output (B) axes, so they shard with W under any rule table. The layers add the
adapter's x A B to x W (`adapted`) rather than forming W + A B: the backward then never computes
the full-size gradient of W, the dominant cost a frozen base saves. Measured on this machine's
CPU (jitted gradient of a 2-layer model, rank 4 on wqkv wo w_gate_up w_down, 8 x 16 tokens,
median of 30 interleaved calls): at the tests' D=32 the two forms are even (1.25 ms vs 1.15 ms),
at D=256 x A B takes 18.2 ms against 26.4 ms. It is also the form that lets dropout act on the
adapter's input alone. The train state keeps the `LoRAParam`s as its params and the rest (the
frozen base) beside them (jaxnv/core/state.py).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnv.models.sharding import LAYER_AXIS

# target name -> how many leading axes of W are its input (contracted with x)
TARGETS = {"wqkv": 1, "wo": 2, "w_gate_up": 1, "w_up": 1, "w_down": 1}
SUFFIX = "_lora"


class LoRA(nnx.Module):
    """The adapter of one weight W: `x -> scale * (dropout(x) A) B`, x (..., in...) ->
    (..., out...). `deterministic` (NNX's train/eval switch) turns dropout off."""

    def __init__(self, weight: nnx.Param, in_axes: int, rank: int, alpha: float, *,
                 dropout: float, dtype, rngs: nnx.Rngs):  # fmt: skip
        shape = tuple(weight.shape)
        names = weight.get_metadata().get("out_sharding") or (None,) * len(shape)
        # a stacked weight (L, in..., out...) of the transformer's blocks gets stacked adapters,
        # one per layer: (L, in..., r) and (L, r, out...)
        lead = 1 if names and names[0] == LAYER_AXIS else 0
        layers, names, shape = shape[:lead], names[lead:], shape[lead:]
        fan_in = math.prod(shape[:in_axes])
        a = jax.random.normal(rngs.params(), (*layers, *shape[:in_axes], rank), dtype)
        names_a, names_b = (*names[:in_axes], None), (None, *names[in_axes:])
        lead_names = (LAYER_AXIS,) * lead
        self.a = nnx.LoRAParam(a / math.sqrt(fan_in), out_sharding=(*lead_names, *names_a))
        b = jnp.zeros((*layers, rank, *shape[in_axes:]), dtype)
        self.b = nnx.LoRAParam(b, out_sharding=(*lead_names, *names_b))
        self.in_axes, self.scale, self.rate = in_axes, alpha / rank, dropout
        self.deterministic = True  # eval until the train step's model.train()
        self.rngs = nnx.Rngs(dropout=rngs.dropout()) if dropout else None
        if dropout and lead:  # a stream a layer: each layer's slice is then a plain adapter
            stream = self.rngs.dropout
            stream.key.set_value(jax.random.split(stream.key[...], layers[0]))
            stream.count.set_value(jnp.zeros(layers, stream.count[...].dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.rate and not self.deterministic:
            keep = jax.random.bernoulli(self.rngs.dropout(), 1.0 - self.rate, x.shape)
            x = jnp.where(keep, x / (1.0 - self.rate), 0.0).astype(x.dtype)
        h = jnp.tensordot(x, self.a[...].astype(x.dtype), self.in_axes)  # (..., r)
        return jnp.tensordot(h * self.scale, self.b[...].astype(x.dtype), 1)  # (..., out...)

    def delta(self) -> jax.Array:
        """scale * A @ B in W's shape (stacked: one product a layer), in float32."""
        a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
        lead = a.ndim - 1 - self.in_axes  # 1 for stacked adapters
        if not lead:
            return self.scale * jnp.tensordot(a, b, 1)
        L, r = a.shape[0], a.shape[-1]
        ab = jnp.matmul(a.reshape(L, -1, r), b.reshape(L, r, -1))  # (L, in, out)
        return self.scale * ab.reshape(L, *a.shape[1:-1], *b.shape[2:])


def adapted(module: nnx.Module, name: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """`y` (= x W for the weight `name`) plus the adapter of `name`, when `module` has one."""
    adapter = getattr(module, name + SUFFIX, None)
    return y if adapter is None else y + adapter(x).astype(y.dtype)


def check_lora(cfg: Any) -> None:
    """One-line ValueErrors for a `lora` config section that cannot be applied."""
    if cfg.rank < 0:
        raise ValueError(f"lora.rank={cfg.rank} must be >= 0 (0: no adapters, train every weight)")
    unknown = [t for t in cfg.targets if t not in TARGETS]
    if unknown:
        raise ValueError(
            f"lora.targets names {', '.join(unknown)}, not a projection: use some of "
            f"{' '.join(TARGETS)}"
        )
    if cfg.rank and not cfg.targets:
        raise ValueError(
            f"lora.rank={cfg.rank} with no lora.targets: name some of {' '.join(TARGETS)}"
        )
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"lora.dropout={cfg.dropout} must lie in [0, 1)")


def _targets(model: nnx.Module, names) -> list[tuple[nnx.Module, str]]:
    """(module, weight name) of every param named in `names`, in graph order."""
    found = []
    for _, module in nnx.iter_modules(model):
        for name in names:
            if isinstance(getattr(module, name, None), nnx.Param):
                found.append((module, name))
    return found


def apply_lora(model: nnx.Module, cfg: Any, *, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.Module:
    """Add an adapter (rank `cfg.rank`, scale `cfg.alpha / cfg.rank`, input dropout
    `cfg.dropout`) beside every weight named in `cfg.targets`; returns `model`, changed in
    place. Adapters are created in `dtype` (the policy's param dtype: float32 masters even when
    the base is bf16). `cfg.rank == 0` returns the model untouched."""
    check_lora(cfg)
    if not cfg.rank:
        return model
    found = _targets(model, cfg.targets)
    missing = [t for t in cfg.targets if all(name != t for _, name in found)]
    if missing:
        has = sorted({name for _, name in _targets(model, TARGETS)})
        what = f"its projections are {' '.join(has)}" if has else "it has none of them"
        raise ValueError(
            f"lora.targets names {' '.join(missing)}, which {type(model).__name__} does not have "
            f"({what}): choose targets among its projections, or lora.rank=0"
        )
    if getattr(model, "remat", "none") != "none" and cfg.dropout:
        raise ValueError(
            "lora.dropout needs model.remat=none: a rematerialised block cannot advance the "
            "adapters' dropout stream; set lora.dropout=0 or model.remat=none"
        )
    with nnx.use_eager_sharding(False):
        for module, name in found:
            adapter = LoRA(getattr(module, name), TARGETS[name], cfg.rank, cfg.alpha,
                           dropout=cfg.dropout, dtype=dtype, rngs=rngs)  # fmt: skip
            setattr(module, name + SUFFIX, adapter)
    return model


def has_lora(model: nnx.Module) -> bool:
    """Whether `model` holds any adapter."""
    return any(isinstance(m, LoRA) for _, m in nnx.iter_modules(model))


def merge(model: nnx.Module) -> nnx.Module:
    """A copy of `model` with every adapter folded into its weight (W + scale * A @ B, computed in
    float32 and stored in W's dtype) and removed: what `jaxnv.hf.save` and serving take. The
    argument is left as it was."""
    model = nnx.clone(model)  # new variables (merge(*split) would share them)
    for _, module in list(nnx.iter_modules(model)):
        for name in TARGETS:
            adapter = getattr(module, name + SUFFIX, None)
            if adapter is None:
                continue
            weight = getattr(module, name)
            merged = weight[...].astype(jnp.float32) + adapter.delta()
            weight[...] = merged.astype(weight.dtype)
            delattr(module, name + SUFFIX)
    return model


def lora_param_count(model: nnx.Module) -> int:
    """Scalars in the adapters: r * (in + out) summed over the adapted weights."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
