"""A multi-layer perceptron that honours the precision policy."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from jaxnv.core.precision import Policy, get_policy
from jaxnv.models.sharding import unsharded_init

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "tanh": jax.nn.tanh,
    "sigmoid": jax.nn.sigmoid,
    "relu2": lambda x: jax.nn.relu(x) ** 2,  # squared ReLU: cheap on XLA:CPU
}


def get_activation(name: str):
    """The activation function called `name` (one of ACTIVATIONS)."""
    if name not in ACTIVATIONS:
        import difflib

        close = difflib.get_close_matches(name, list(ACTIVATIONS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown activation {name!r}: use one of {', '.join(ACTIVATIONS)}{hint}")
    return ACTIVATIONS[name]


class MLP(nnx.Module):
    """Dense layers `in -> features... -> out` with an activation and optional dropout between.

    Hidden kernels alternate logical axes (`embed`, `mlp`) / (`mlp`, `embed`) so that tensor
    parallelism can split them column- then row-wise; the output head is (`*`, None).

        model = MLP(10, (5,), 1, rngs=nnx.Rngs(0))
        y = model(jnp.ones((16, 10)))  # (16, 1)
    """

    @unsharded_init
    def __init__(
        self,
        in_features: int,
        features: Sequence[int],
        out_features: int = 1,
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        use_bias: bool = True,
        policy: Policy | str | None = None,
        rngs: nnx.Rngs,
    ):
        self.policy = get_policy(policy)
        self.in_features = in_features
        self.activation = activation
        self.act = get_activation(activation)
        self.dropout = nnx.Dropout(dropout) if dropout > 0 else None
        names = ("embed", "mlp")
        dims = [in_features, *features]
        layers = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            axes = names if i % 2 == 0 else names[::-1]
            layers.append(self._dense(d_in, d_out, axes, use_bias, rngs))
        self.hidden = nnx.List(layers)
        head_in = names[len(features) % 2]
        self.head = self._dense(dims[-1], out_features, (head_in, None), use_bias, rngs)

    def _dense(self, d_in, d_out, axes, use_bias, rngs):
        return nnx.Linear(
            d_in,
            d_out,
            use_bias=use_bias,
            dtype=self.policy.compute_dtype,
            param_dtype=self.policy.param_dtype,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), axes),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Forward pass; pass `rng` to turn dropout on (training)."""
        x = self.policy.cast_to_compute(x)  # (B, F)
        for i, layer in enumerate(self.hidden):
            x = self.act(layer(x))  # (B, H_i)
            if self.dropout is not None and rng is not None:
                x = self.dropout(x, deterministic=False, rngs=nnx.Rngs(jax.random.fold_in(rng, i)))
        return self.policy.cast_to_output(self.head(x))  # (B, out)
