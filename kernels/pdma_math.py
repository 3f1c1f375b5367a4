"""The pieces of PDMA that every implementation shares: layouts, merged writes, the decay and its proxy."""

from __future__ import annotations

import jax.numpy as jnp

# A full reset (w = 1) leaves exp(-60) ~ 1e-26 of the old value instead of 0: the chunk maths subtracts
# log-decays, and -inf - -inf has no value.
LOG_DECAY_FLOOR = -60.0


def to_sequences(x):
    """[batch, time, heads, ...] -> [batch * heads, time, ...]."""
    b, t, h = x.shape[:3]
    return jnp.moveaxis(x, 2, 1).reshape(b * h, t, *x.shape[3:])


def from_sequences(x, batch: int):
    g, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(batch, g // batch, t, *x.shape[2:]), 1, 2)


def merged_writes(write_idx, write_val):
    """Per token, one event per distinct slot: (slot or -1, summed weight, same-slot matrix)."""
    same = write_idx[..., :, None] == write_idx[..., None, :]
    k = write_idx.shape[-1]
    earlier = jnp.tril(jnp.ones((k, k), bool), -1)
    first = ~jnp.any(same & earlier, axis=-1)
    w_sum = jnp.einsum("...ij,...j->...i", same.astype(write_val.dtype), write_val)
    return jnp.where(first, write_idx, -1), jnp.where(first, w_sum, 0.0), same


def log_decay(w, gamma):
    """log (1 - w)^gamma, floored at LOG_DECAY_FLOOR (a full reset leaves exp(-60) of the old value)."""
    if gamma == 0:
        return jnp.zeros_like(w)
    one_minus = jnp.maximum(1 - w, 0.0)
    return jnp.maximum(gamma * jnp.log(jnp.maximum(one_minus, 1e-30)), LOG_DECAY_FLOOR)


def proxy_derivative(w, gamma, grad_eps):
    """d/dw of (grad_eps + (1 - grad_eps)(1 - w))^gamma: the backward stand-in for d(1 - w)^gamma / dw."""
    if gamma == 0:
        return jnp.zeros_like(w)
    base = grad_eps + (1 - grad_eps) * jnp.maximum(1 - w, 0.0)
    power = base ** int(gamma - 1) if float(gamma - 1).is_integer() else base ** (gamma - 1)
    return -gamma * (1 - grad_eps) * power
