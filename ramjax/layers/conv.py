"""The short causal depthwise convolution Mamba-2 and Gated DeltaNet apply to their projections."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ramjax.layers.axes import logical_param


class ShortConv(nnx.Module):
    """y_t = sum_{j < width} w[j] * x_{t - j} per channel (zero before the sequence start), then SiLU (unless
    `activation=False`).

    x `[batch, time, channels]`. Written as `width` shifted multiply-adds: for widths of 4 this is cheaper than a
    general convolution and needs nothing backend-specific."""

    def __init__(self, channels: int, width: int, *, activation: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
        if width < 1:
            raise ValueError(f"conv width: must be >= 1, got {width}")
        self.width, self.activation, self.dtype = width, activation, dtype
        bound = 1.0 / width**0.5  # PyTorch's Conv1d default for a depthwise kernel of this width
        kernel = jax.random.uniform(rngs.params(), (width, channels), jnp.float32, -bound, bound)
        self.kernel = logical_param(kernel, None, "heads")
        self.bias = logical_param(jnp.zeros((channels,)), "heads")

    def __call__(self, x: jax.Array) -> jax.Array:
        seq_len = x.shape[1]
        kernel = self.kernel[...].astype(self.dtype)
        padded = jnp.pad(x.astype(self.dtype), ((0, 0), (self.width - 1, 0), (0, 0)))
        y = self.bias[...].astype(self.dtype)
        for j in range(self.width):
            start = self.width - 1 - j
            y = y + kernel[j] * padded[:, start:start + seq_len]
        return jax.nn.silu(y) if self.activation else y
