"""RMSNorm, and the gated RMSNorm that Mamba-2, Gated DeltaNet and GLA put before their output projections."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ramjax.layers.axes import logical_param


class RMSNorm(nnx.Module):
    """x / rms(x) * scale over the last axis, computed in fp32 and returned in x's dtype.

    `axis_name` is the logical name of the scale's one dimension (embed for the residual stream, head_dim inside
    a mixer). The scale is excluded from weight decay (see `ramjax.train.optim`)."""

    def __init__(self, size: int, *, eps: float = 1e-6, axis_name: str | None = "embed"):
        self.eps = eps
        self.scale = logical_param(jnp.ones((size,)), axis_name)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...]).astype(x.dtype)


class GatedRMSNorm(RMSNorm):
    """RMSNorm(x) * silu(gate): the output gate of Mamba-2 / Gated DeltaNet / GLA, per head over the last axis."""

    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
        return super().__call__(x) * jax.nn.silu(gate.astype(jnp.float32)).astype(x.dtype)
