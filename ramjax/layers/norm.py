"""RMSNorm, the gated RMSNorm that Mamba-2, Gated DeltaNet and GLA put before their output projections, and
LayerNorm (the residual norm of the adaptive-decay fork's model, `model.norm = "layer"`)."""

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


class LayerNorm(nnx.Module):
    """(x - mean(x)) / sqrt(var(x) + eps) * scale + bias over the last axis, as PyTorch's nn.LayerNorm; computed in
    fp32 and returned in x's dtype. Scale and bias are excluded from weight decay."""

    def __init__(self, size: int, *, eps: float = 1e-5, axis_name: str | None = "embed"):
        self.eps = eps
        self.scale = logical_param(jnp.ones((size,)), axis_name)
        self.bias = logical_param(jnp.zeros((size,)), axis_name)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        normed = centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...] + self.bias[...]).astype(x.dtype)
