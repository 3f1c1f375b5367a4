"""The SwiGLU feed-forward block of Transformer++ (and every FLA baseline): W_down(silu(W_gate x) * W_up x)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ramjax.layers.axes import dense


@jax.checkpoint
def silu_gate(y: jax.Array, z: jax.Array) -> jax.Array:
    """y * silu(z). Rematerialised: the backward pass keeps y and z and recomputes silu, instead of saving its
    intermediates too (the scan over layers stacks every saved tensor of every layer)."""
    return y * jax.nn.silu(z)


class SwiGLU(nnx.Module):
    """x `[batch, time, d_model]` -> `[batch, time, d_model]` through a hidden width `hidden`."""

    def __init__(self, d_model: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.gate = dense(d_model, hidden, "embed", "mlp", dtype=dtype, rngs=rngs)
        self.up = dense(d_model, hidden, "embed", "mlp", dtype=dtype, rngs=rngs)
        self.down = dense(hidden, d_model, "mlp", "embed", dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(silu_gate(self.up(x), self.gate(x)))
