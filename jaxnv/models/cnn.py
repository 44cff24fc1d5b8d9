"""A small ResNet-style CNN for images that honours the precision policy.

Logical axis names: conv kernels (H, W, in, out) are (None, None, `conv_in`, `conv_out`); conv
biases and norm scales/biases are (`conv_out`,); the head kernel is (`conv_out`, None) because its
rows are indexed by the last stage's channels, so a rule that shards channels keeps the pooled
features and the head in one layout. Batch-norm running statistics carry no names (replicated).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxnv.core.precision import Policy, get_policy
from jaxnv.models.sharding import unsharded_init

NORMS = ("batch", "group", "none")
_CONV_AXES = (None, None, "conv_in", "conv_out")


class _Norm(nnx.Module):
    """Batch, group or no normalisation over the channel axis, computed in float32.

    Norms are sums over many elements: in bf16/fp16 the mean and variance lose precision, so the
    input is cast to float32, normalised (the norm's own dtype is float32 too, which promotes
    scale and bias) and cast back to the compute dtype.
    """

    def __init__(
        self, kind: str, channels: int, policy: Policy, groups: int, momentum: float, rngs: nnx.Rngs
    ):
        self.compute_dtype = policy.compute_dtype
        common = dict(
            dtype=jnp.float32,
            param_dtype=policy.param_dtype,
            scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("conv_out",)),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)),
            rngs=rngs,
        )
        if kind == "batch":
            self.norm = nnx.BatchNorm(channels, momentum=momentum, epsilon=1e-5, **common)
        elif kind == "group":
            # the largest group count <= `groups` that divides the channels
            self.norm = nnx.GroupNorm(channels, math.gcd(channels, groups), epsilon=1e-5, **common)
        else:
            self.norm = None

    def __call__(self, x: jax.Array, training: bool) -> jax.Array:
        if self.norm is None:
            return x
        x = x.astype(jnp.float32)
        if isinstance(self.norm, nnx.BatchNorm):
            # training: batch statistics, running averages updated in place; eval: running ones
            x = self.norm(x, use_running_average=not training)
        else:
            x = self.norm(x)
        return x.astype(self.compute_dtype)


def _conv(d_in, d_out, kernel, stride, use_bias, policy, rngs) -> nnx.Conv:
    return nnx.Conv(
        d_in,
        d_out,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding="SAME",
        use_bias=use_bias,
        dtype=policy.compute_dtype,
        param_dtype=policy.param_dtype,
        kernel_init=nnx.with_partitioning(nnx.initializers.he_normal(), _CONV_AXES),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)),
        rngs=rngs,
    )


class ResidualBlock(nnx.Module):
    """`relu(norm(conv(relu(norm(conv(x))))) + skip(x))`; `skip` is a 1x1 conv + norm (the
    projection) only when the channels or the stride change, else the identity."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        stride: int,
        *,
        norm: str,
        policy: Policy,
        groups: int,
        momentum: float,
        rngs: nnx.Rngs,
    ):
        bias = norm == "none"  # a norm's own bias makes a conv bias redundant
        self.conv1 = _conv(d_in, d_out, 3, stride, bias, policy, rngs)
        self.norm1 = _Norm(norm, d_out, policy, groups, momentum, rngs)
        self.conv2 = _conv(d_out, d_out, 3, 1, bias, policy, rngs)
        self.norm2 = _Norm(norm, d_out, policy, groups, momentum, rngs)
        if d_in != d_out or stride != 1:
            self.proj = _conv(d_in, d_out, 1, stride, bias, policy, rngs)
            self.proj_norm = _Norm(norm, d_out, policy, groups, momentum, rngs)
        else:
            self.proj = self.proj_norm = None

    def __call__(self, x: jax.Array, training: bool) -> jax.Array:
        y = jax.nn.relu(self.norm1(self.conv1(x), training))  # (B, H/s, W/s, C_out)
        y = self.norm2(self.conv2(y), training)
        skip = x if self.proj is None else self.proj_norm(self.proj(x), training)
        return jax.nn.relu(y + skip)


class CNN(nnx.Module):
    """Stem conv, stages of residual blocks (stride 2 between stages), global pool, dense head.

    Takes images (B, H, W, C) or, for `in_channels=1`, (B, H, W); returns logits (B, classes).
    `rng` is a PRNG key in training (dropout on, batch norm uses and updates batch statistics)
    and None in evaluation (running averages). `momentum` is batch norm's running-average decay;
    group norm uses the largest group count <= `groups` that divides the channels.

        model = CNN(1, 10, features=(16, 32), rngs=nnx.Rngs(0))
        logits = model(jnp.ones((8, 28, 28)))  # (8, 10)
    """

    @unsharded_init
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        features: Sequence[int] = (32, 64),
        blocks_per_stage: int = 1,
        norm: str = "batch",
        groups: int = 8,
        momentum: float = 0.9,
        dropout: float = 0.0,
        policy: Policy | str | None = None,
        rngs: nnx.Rngs,
    ):
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}: use one of {', '.join(NORMS)}")
        if not features or blocks_per_stage < 1:
            raise ValueError(
                f"CNN needs at least one stage and one block per stage, got features={features}, "
                f"blocks_per_stage={blocks_per_stage}"
            )
        self.policy = get_policy(policy)
        self.in_channels = in_channels
        self.stem = _conv(in_channels, features[0], 3, 1, norm == "none", self.policy, rngs)
        self.stem_norm = _Norm(norm, features[0], self.policy, groups, momentum, rngs)
        norm_kw = dict(norm=norm, policy=self.policy, groups=groups, momentum=momentum, rngs=rngs)
        blocks, d_in = [], features[0]
        for stage, d_out in enumerate(features):
            for b in range(blocks_per_stage):
                stride = 2 if stage > 0 and b == 0 else 1  # downsample entering a later stage
                blocks.append(ResidualBlock(d_in, d_out, stride, **norm_kw))
                d_in = d_out
        self.blocks = nnx.List(blocks)
        self.dropout = nnx.Dropout(dropout) if dropout > 0 else None
        self.head = nnx.Linear(
            d_in,
            num_classes,
            dtype=self.policy.compute_dtype,
            param_dtype=self.policy.param_dtype,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("conv_out", None)),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Logits for images `x`; pass `rng` to train (dropout, batch statistics)."""
        if x.ndim == 3 and self.in_channels == 1:
            x = x[..., None]  # (B, H, W) -> (B, H, W, 1)
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"CNN(in_channels={self.in_channels}) takes images (B, H, W, {self.in_channels})"
                f"{' or (B, H, W)' if self.in_channels == 1 else ''}, got shape {x.shape}"
            )
        training = rng is not None
        x = jnp.asarray(x).astype(self.policy.compute_dtype)  # ints (e.g. uint8 pixels) too
        x = jax.nn.relu(self.stem_norm(self.stem(x), training))  # (B, H, W, C0)
        for block in self.blocks:
            x = block(x, training)  # (B, H_s, W_s, C_s)
        # the pooling sum runs in float32: H*W terms
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.policy.compute_dtype)
        if self.dropout is not None and training:
            x = self.dropout(x, deterministic=False, rngs=nnx.Rngs(rng))  # (B, C_last)
        return self.policy.cast_to_output(self.head(x))  # (B, num_classes)
