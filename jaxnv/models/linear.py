"""Linear and logistic regression: one dense layer that honours the precision policy."""

from __future__ import annotations

import jax
from flax import nnx

from jaxnv.core.precision import Policy, get_policy
from jaxnv.models.sharding import unsharded_init


class Linear(nnx.Module):
    """`y = x @ W + b`, params in the policy's param dtype, the matmul in its compute dtype.

    Outputs are cast to the policy's output dtype. Kernel axes are named (`embed`, None).

        model = Linear(4, 1, policy=get_policy("fp32"), rngs=nnx.Rngs(0))
        y = model(jnp.ones((8, 4)))  # (8, 1)
    """

    @unsharded_init
    def __init__(
        self,
        in_features: int,
        out_features: int = 1,
        *,
        use_bias: bool = True,
        policy: Policy | str | None = None,
        rngs: nnx.Rngs,
    ):
        self.policy = get_policy(policy)
        self.in_features = in_features
        self.dense = nnx.Linear(
            in_features,
            out_features,
            use_bias=use_bias,
            dtype=self.policy.compute_dtype,
            param_dtype=self.policy.param_dtype,
            kernel_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed", None)),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        del rng  # no stochastic layers
        x = self.policy.cast_to_compute(x)  # (B, F)
        return self.policy.cast_to_output(self.dense(x))  # (B, out)
