"""A stacked LSTM over sequences that honours the precision policy.

Logical axis names: per layer the input kernel `w_in` (F, 4H) and the recurrent kernel `w_hh`
(H, 4H) are both (`embed`, `mlp`) -- the hidden state plays the role of the embedding, the four
stacked gates that of the MLP's wide axis -- and the bias (4H,) is (`mlp`,). The token embedding
is (`vocab`, `embed`) and the head kernel (`embed`, None).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnv.core.precision import Policy, get_policy
from jaxnv.models.sharding import unsharded_init

HEADS = ("last", "sequence")


def _recurrent_step(w_hh: jax.Array, carry, xw: jax.Array):
    """One LSTM step given the input projection `xw = x @ w_in + bias` (B, 4H).

    Gates in the dtype of `w_hh` (the compute dtype); the cell state `c` stays float32.
    """
    h, c = carry  # (B, H) compute dtype, (B, H) float32
    z = xw + h @ w_hh  # (B, 4H), gates stacked as i, f, g, o
    i, f, g, o = jnp.split(z, 4, axis=-1)
    i, f, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jax.nn.sigmoid(o)
    g = jnp.tanh(g)
    # c is a running sum over every step: in bf16 (8 mantissa bits) increments smaller than
    # 1/256 of |c| vanish, so long memories drift. float32 costs only B*H values per step.
    c = f.astype(jnp.float32) * c + (i * g).astype(jnp.float32)
    h = o * jnp.tanh(c).astype(o.dtype)
    return (h, c), h


def lstm_cell(params: dict, carry, x: jax.Array):
    """One LSTM step: `((h, c), x) -> ((h', c'), h')` with `params` {w_in, w_hh, bias}.

    `z = x @ w_in + h @ w_hh + bias` split into gates i, f, g, o; `c' = f*c + i*g`,
    `h' = o * tanh(c')`. Gate math runs in the params' dtype, `c` in float32.

        params = nnx.to_pure_dict(nnx.state(model.layers[0], nnx.Param))
        (h, c), _ = lstm_cell(params, (h, c), x_t)  # x_t (B, F), h and c (B, H)
    """
    xw = x @ params["w_in"] + params["bias"][None, :]  # (B, 4H)
    return _recurrent_step(params["w_hh"], carry, xw)


class LSTMLayer(nnx.Module):
    """One LSTM layer: params `w_in` (F, 4H), `w_hh` (H, 4H), `bias` (4H,); forget bias 1."""

    def __init__(self, in_features: int, hidden: int, *, policy: Policy, rngs: nnx.Rngs):
        self.policy = policy
        self.hidden = hidden
        dtype, names = policy.param_dtype, ("embed", "mlp")
        w_in = nnx.initializers.lecun_normal()(rngs.params(), (in_features, 4 * hidden), dtype)
        # orthogonal recurrence keeps h's scale through many steps at initialisation
        w_hh = nnx.initializers.orthogonal()(rngs.params(), (hidden, 4 * hidden), dtype)
        # forget-gate bias 1: remember by default until the gradient says otherwise
        bias = jnp.zeros((4 * hidden,), dtype).at[hidden : 2 * hidden].set(1.0)
        self.w_in = nnx.Param(w_in, out_sharding=names)
        self.w_hh = nnx.Param(w_hh, out_sharding=names)
        self.bias = nnx.Param(bias, out_sharding=("mlp",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Hidden states (T, B, H) for time-major inputs `x` (T, B, F) from a zero state."""
        cdt = self.policy.compute_dtype
        w_in, w_hh, bias = (p[...].astype(cdt) for p in (self.w_in, self.w_hh, self.bias))
        # one big matmul for the input projections of all steps; only h @ w_hh is sequential
        xw = jnp.einsum("tbf,fg->tbg", x, w_in) + bias[None, None, :]  # (T, B, 4H)
        batch = x.shape[1]
        carry = (jnp.zeros((batch, self.hidden), cdt), jnp.zeros((batch, self.hidden), jnp.float32))
        _, hs = jax.lax.scan(lambda carry, xw_t: _recurrent_step(w_hh, carry, xw_t), carry, xw)
        return hs  # (T, B, H)


class LSTM(nnx.Module):
    """Stacked LSTM: (B, T, F) floats, or (B, T) token ids when `vocab_size` is set.

    `head="last"` returns outputs (B, out) from the top layer's final hidden state;
    `head="sequence"` returns per-step outputs (B, T, out). `rng` is accepted for the common
    model signature and unused (no stochastic layers).

        model = LSTM(8, 32, 10, num_layers=2, rngs=nnx.Rngs(0))
        y = model(jnp.ones((4, 16, 8)))  # (4, 10)
    """

    @unsharded_init
    def __init__(
        self,
        in_features: int,
        hidden: int,
        out_features: int,
        *,
        num_layers: int = 1,
        vocab_size: int | None = None,
        head: str = "last",
        policy: Policy | str | None = None,
        rngs: nnx.Rngs,
    ):
        if head not in HEADS:
            raise ValueError(f"unknown LSTM head {head!r}: use one of {', '.join(HEADS)}")
        if num_layers < 1:
            raise ValueError(f"LSTM needs num_layers >= 1, got {num_layers}")
        self.policy = get_policy(policy)
        self.in_features = in_features
        self.vocab_size = vocab_size
        self.head_kind = head
        if vocab_size is None:
            self.embed = None
        else:
            self.embed = nnx.Embed(
                vocab_size,
                in_features,
                dtype=self.policy.compute_dtype,
                param_dtype=self.policy.param_dtype,
                embedding_init=nnx.with_partitioning(
                    nnx.initializers.normal(stddev=1.0), ("vocab", "embed")
                ),
                rngs=rngs,
            )
        dims = [in_features] + [hidden] * num_layers
        self.layers = nnx.List(
            [LSTMLayer(d, hidden, policy=self.policy, rngs=rngs) for d in dims[:-1]]
        )
        self.head = nnx.Linear(
            hidden,
            out_features,
            dtype=self.policy.compute_dtype,
            param_dtype=self.policy.param_dtype,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", None)),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Outputs for sequences `x`: (B, out) for head "last", (B, T, out) for "sequence"."""
        del rng  # no stochastic layers
        if self.embed is not None:
            if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.integer):
                raise ValueError(
                    f"LSTM(vocab_size={self.vocab_size}) takes integer token ids (B, T), got "
                    f"{x.dtype} {x.shape}: pass ids, or build it with vocab_size=None for features"
                )
            x = self.embed(x)  # (B, T, F)
        elif x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"LSTM(in_features={self.in_features}) takes (B, T, {self.in_features}), got "
                f"shape {x.shape}"
            )
        h = jnp.swapaxes(self.policy.cast_to_compute(x), 0, 1)  # (T, B, F): scan runs over axis 0
        for layer in self.layers:
            h = layer(h)  # (T, B, H)
        h = h[-1] if self.head_kind == "last" else jnp.swapaxes(h, 0, 1)  # (B, H) | (B, T, H)
        return self.policy.cast_to_output(self.head(h))  # (B, out) | (B, T, out)
