"""CAPE, cyclic address positional embedding, on the decoder's sparse codes (docs/ramnet.md section 3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ramjax.ops.shared import checks


def cape_shift(idx: jax.Array, positions: jax.Array, num_slots: int) -> jax.Array:
    """Cyclic address positional embedding on sparse codes: (idx - position) mod M.

    `positions` broadcasts against `idx` (for example `[batch, time, 1, 1]` against `[batch, time, heads, K]`).
    """
    checks.require_positive_int("num_slots", num_slots)
    idx, positions = jnp.asarray(idx), jnp.asarray(positions)
    checks.require_integer("idx", idx)
    checks.require_integer("positions", positions)
    try:
        jnp.broadcast_shapes(idx.shape, positions.shape)
    except ValueError:
        raise ValueError(
            f"positions: shape {positions.shape} does not broadcast against idx shape {idx.shape}"
        ) from None
    # Reduce positions first so that idx - position cannot overflow int32 for long sequences.
    shift = jnp.mod(positions, num_slots).astype(idx.dtype)
    return jnp.mod(idx - shift, num_slots)
