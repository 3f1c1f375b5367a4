"""The short causal depthwise convolution Mamba-2 and Gated DeltaNet apply to their projections."""

from __future__ import annotations

import functools

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
        padded = jnp.pad(x.astype(self.dtype), ((0, 0), (self.width - 1, 0), (0, 0)))
        return self._over(padded, x.shape[1])

    def init_window(self, batch: int) -> jax.Array:
        """The decoding state: the last width - 1 inputs `[batch, width - 1, channels]` (zeros: nothing before)."""
        return jnp.zeros((batch, self.width - 1, self.kernel.shape[-1]), self.dtype)

    def extend(self, x: jax.Array, window: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The convolution of x `[batch, time, channels]` continuing after the inputs kept in `window`; returns
        (y, the window after x). Equal to running `__call__` over the whole sequence at once."""
        padded = jnp.concatenate([window.astype(self.dtype), x.astype(self.dtype)], axis=1)
        return self._over(padded, x.shape[1]), padded[:, padded.shape[1] - (self.width - 1):]

    def _over(self, padded: jax.Array, seq_len: int) -> jax.Array:
        """y for the last seq_len positions of `padded` (which has width - 1 earlier inputs before them)."""
        return causal_conv(padded, self.kernel[...].astype(self.dtype), self.bias[...].astype(self.dtype), seq_len,
                           self.activation)


@functools.partial(jax.checkpoint, static_argnums=(3, 4))
def causal_conv(padded: jax.Array, kernel: jax.Array, bias: jax.Array, seq_len: int, activation: bool) -> jax.Array:
    """sum_j kernel[j] * (padded shifted by j), over the last seq_len positions, then SiLU. Rematerialised: the
    backward pass keeps the input and recomputes the rest (saved, its shifted copies, partial sums and SiLU were
    ~8 copies of the input per conv: jax.ad_checkpoint.print_saved_residuals)."""
    width = kernel.shape[0]
    y = bias
    for j in range(width):
        start = width - 1 - j
        y = y + kernel[j] * padded[:, start:start + seq_len]
    return jax.nn.silu(y) if activation else y


def convolve_all(convs, inputs, windows=None):
    """Each of `inputs` through its conv: (outputs, None) in training; with decoding `windows` (one per conv, the
    inputs before these), (outputs, the windows after them)."""
    if windows is None:
        return [conv(y) for conv, y in zip(convs, inputs, strict=True)], None
    pairs = [conv.extend(y, w) for conv, y, w in zip(convs, inputs, windows, strict=True)]
    return [y for y, _ in pairs], [w for _, w in pairs]
