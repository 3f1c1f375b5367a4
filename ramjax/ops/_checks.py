"""Argument checks shared by the ops: each raises a ValueError that names the argument and what is allowed."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np


def require_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


def require_integer(name: str, array: jax.Array) -> None:
    if not jnp.issubdtype(array.dtype, jnp.integer):
        raise ValueError(f"{name}: expected an integer dtype, got {array.dtype}")


def require_floating(name: str, array: jax.Array) -> None:
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise ValueError(f"{name}: expected a floating dtype, got {array.dtype}")


def require_shape(name: str, array: jax.Array, expected: tuple, described: str) -> None:
    """`expected` may hold None for a free dimension; `described` names the dimensions, e.g. '[batch, time]'."""
    ok = array.ndim == len(expected) and all(e is None or e == a for e, a in zip(expected, array.shape))
    if not ok:
        shown = tuple("?" if e is None else e for e in expected)
        raise ValueError(f"{name}: expected shape {described} = {shown}, got {tuple(array.shape)}")


def is_concrete(array) -> bool:
    """True when the values are known now (not a tracer inside jit, grad or vmap)."""
    return not isinstance(array, jax.core.Tracer)


def require_index_range(name: str, idx: jax.Array, upper: int) -> None:
    """0 <= idx < upper, checked when the values are known (inside jit they are not, and cannot be)."""
    if not is_concrete(idx) or idx.size == 0:
        return
    values = np.asarray(idx)
    low, high = values.min(), values.max()
    if low < 0 or high >= upper:
        raise ValueError(f"{name}: indices must lie in [0, {upper}), got values in [{low}, {high}]")
