"""Shape helpers the kernels share: Triton arrays have power-of-2 sizes, so inputs are padded to them."""

from __future__ import annotations

import jax.numpy as jnp


def next_pow2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def pad_axis(x, axis: int, size: int, value):
    """`x` padded with `value` at the end of `axis` to `size` entries."""
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)
