"""Associative scans the sorted-event scan shares (kernels/sorted_scan.py, kernels/sorted_blocks.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segmented_cumsum(starts, x, axis):
    """Running sums of x along `axis` that restart at every True in `starts`."""
    def combine(earlier, later):
        s_e, x_e = earlier
        s_l, x_l = later
        return s_e | s_l, jnp.where(s_l, x_l, x_e + x_l)

    return jax.lax.associative_scan(combine, (starts, x), axis=axis)[1]


def carry_scan(decay, value):
    """H[b] = value[b] + decay[b] H[b - 1] over axis 1 (H[-1] = 0); decay [G, nb], value [G, nb, ...]."""
    def combine(earlier, later):
        a_e, h_e = earlier
        a_l, h_l = later
        return a_e * a_l, a_l.reshape(a_l.shape + (1,) * (h_l.ndim - a_l.ndim)) * h_e + h_l

    return jax.lax.associative_scan(combine, (decay, value), axis=1)[1]
