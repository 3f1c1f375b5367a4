"""RMSNorm, the gated RMSNorm that Mamba-2, Gated DeltaNet and GLA put before their output projections, and
LayerNorm (the residual norm of the adaptive-decay fork's model, `model.norm = "layer"`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ramjax.layers.axes import logical_param


# The norms run as rematerialised functions: the backward pass keeps only their inputs (x in the compute dtype,
# the gate, the scale) and recomputes the fp32 intermediates, which are a few elementwise passes. Saved, those
# intermediates were the largest residuals of a GLA layer (six fp32 tensors the size of its [batch, time, heads,
# d_v] output, ~6x the bytes of its bf16 q, k and v; jax.ad_checkpoint.print_saved_residuals),
# and the scan over layers stacks every layer's residuals (experiments/results/profile_train_step_gpu.md).


@functools.partial(jax.checkpoint, static_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) * scale over the last axis, in fp32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (normed * scale).astype(x.dtype)


@functools.partial(jax.checkpoint, static_argnums=(3,))
def gated_rms_norm(x: jax.Array, gate: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """rms_norm(x) * silu(gate), the gate in fp32."""
    return rms_norm(x, scale, eps) * jax.nn.silu(gate.astype(jnp.float32)).astype(x.dtype)


@functools.partial(jax.checkpoint, static_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """(x - mean(x)) / sqrt(var(x) + eps) * scale + bias over the last axis, in fp32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    normed = centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)
    return (normed * scale + bias).astype(x.dtype)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale over the last axis, computed in fp32 and returned in x's dtype.

    `axis_name` is the logical name of the scale's one dimension (embed for the residual stream, head_dim inside
    a mixer). The scale is excluded from weight decay (see `ramjax.train.optim`)."""

    def __init__(self, size: int, *, eps: float = 1e-6, axis_name: str | None = "embed"):
        self.eps = eps
        self.scale = logical_param(jnp.ones((size,)), axis_name)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


class GatedRMSNorm(RMSNorm):
    """RMSNorm(x) * silu(gate): the output gate of Mamba-2 / Gated DeltaNet / GLA, per head over the last axis."""

    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
        return gated_rms_norm(x, gate, self.scale[...], self.eps)


@nnx.remat
def gated_norm_projection(norm: GatedRMSNorm, gate_proj: nnx.Linear, out_proj: nnx.Linear, x: jax.Array,
                          o: jax.Array) -> jax.Array:
    """out_proj(GatedRMSNorm(o, gate_proj(x))): a gated mixer's output, x `[batch, time, d_model]`, o `[batch,
    time, heads, d_v]`. Rematerialised as one piece: the backward pass keeps x (which the mixer's input
    projections keep anyway) and o, and recomputes the gate projection and the normalised output, rather than
    keeping two more [batch, time, heads * d_v] tensors per layer (the scan over layers stacks them)."""
    o = norm(o, gate_proj(x).reshape(o.shape))
    return out_proj(o.reshape(*x.shape[:2], -1))


class LayerNorm(nnx.Module):
    """(x - mean(x)) / sqrt(var(x) + eps) * scale + bias over the last axis, as PyTorch's nn.LayerNorm; computed in
    fp32 and returned in x's dtype. Scale and bias are excluded from weight decay."""

    def __init__(self, size: int, *, eps: float = 1e-5, axis_name: str | None = "embed"):
        self.eps = eps
        self.scale = logical_param(jnp.ones((size,)), axis_name)
        self.bias = logical_param(jnp.zeros((size,)), axis_name)

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)
