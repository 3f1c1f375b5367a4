"""Argument checks shared by the ops: each raises a ValueError that names the argument and what is allowed.

The last group checks the arguments of the plain gated recurrences (`ramjax.ops.gla`, `ramjax.ops.gated_delta`):
beta None for gated linear attention, an array for the delta rule."""

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


# ----------------------------------------------------------------------------------------------------------
# The plain gated recurrences: gated linear attention (beta None) and the gated delta rule.


def require_nonpositive(name: str, array: jax.Array) -> None:
    # NumPy, not jnp: inside a jit trace jnp would stage even a concrete array's comparison.
    if is_concrete(array) and array.size and np.asarray(array).max() > 0:
        raise ValueError(f"{name}: log decays must be <= 0, got a maximum of {np.asarray(array).max()}")


def check_log_decay(log_decay, lead: tuple, d_k: int, per_dim_allowed: bool, described: str) -> None:
    """log_decay is lead + () or, where allowed, lead + (d_k,); `described` names the lead dimensions."""
    require_floating("log_decay", log_decay)
    shape = tuple(log_decay.shape)
    if shape == lead or (per_dim_allowed and shape == lead + (d_k,)):
        require_nonpositive("log_decay", log_decay)
        return
    allowed = f"[{described}] = {lead}"
    if per_dim_allowed:
        allowed += f" or [{described}, d_k] = {lead + (d_k,)}"
    raise ValueError(f"log_decay: expected shape {allowed}, got {shape}")


def check_sequence(q, k, v, log_decay, beta, impl, impls, chunk_size, initial_state, shared_qk=False) -> None:
    """shared_qk: q and k may also have one head that every head of v reads (`[batch, time, 1, d_k]`)."""
    if not isinstance(impl, str) or impl not in impls:
        raise ValueError(f"impl: must be one of {impls}, got {impl!r}")
    require_positive_int("chunk_size", chunk_size)
    for name, array in (("q", q), ("k", k), ("v", v)):
        require_floating(name, array)
    if q.ndim != 4:
        raise ValueError(f"q: expected shape [batch, time, heads, d_k], got {tuple(q.shape)}")
    batch, seq_len, heads, d_k = q.shape
    require_shape("k", k, (batch, seq_len, heads, d_k), "[batch, time, heads, d_k] like q")
    if shared_qk and heads == 1 and v.ndim == 4:
        heads = v.shape[2]  # one q and k head for all of v's heads
    require_shape("v", v, (batch, seq_len, heads, None), "[batch, time, heads, d_v]")
    if seq_len == 0:
        raise ValueError("q: the time dimension is empty")
    check_log_decay(log_decay, (batch, seq_len, heads), d_k, beta is None, "batch, time, heads")
    if beta is not None:
        require_floating("beta", beta)
        require_shape("beta", beta, (batch, seq_len, heads), "[batch, time, heads]")
    if initial_state is not None:
        require_floating("initial_state", initial_state)
        require_shape(
            "initial_state", initial_state, (batch, heads, d_k, v.shape[-1]), "[batch, heads, d_k, d_v]"
        )


def check_step(state, q, k, v, log_decay, beta) -> None:
    for name, array in (("state", state), ("q", q), ("k", k), ("v", v)):
        require_floating(name, array)
    if q.ndim != 3:
        raise ValueError(f"q: expected shape [batch, heads, d_k], got {tuple(q.shape)}")
    batch, heads, d_k = q.shape
    require_shape("k", k, (batch, heads, d_k), "[batch, heads, d_k] like q")
    require_shape("v", v, (batch, heads, None), "[batch, heads, d_v]")
    require_shape("state", state, (batch, heads, d_k, v.shape[-1]), "[batch, heads, d_k, d_v]")
    check_log_decay(log_decay, (batch, heads), d_k, beta is None, "batch, heads")
    if beta is not None:
        require_floating("beta", beta)
        require_shape("beta", beta, (batch, heads), "[batch, heads]")


def pallas_sequence_problem(chunk_size: int, **arrays) -> str | None:
    """Why the chunked Pallas kernels (kernels/gla_chunk.py, gated_delta_chunk.py) cannot take these arguments, or
    None: they take float32 or bfloat16 q, k, v and a chunk size that is a power of 2 >= 16."""
    for name, x in arrays.items():
        if x.dtype not in (jnp.float32, jnp.bfloat16):
            return f"{name}: impl='pallas' takes float32 or bfloat16, got {x.dtype}"
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        return f"chunk_size: impl='pallas' needs a power of 2 >= 16, got {chunk_size}"
    return None


def check_pallas_sequence(chunk_size: int, **arrays) -> None:
    """Raises a ValueError naming what the chunked Pallas kernels cannot take (`pallas_sequence_problem`)."""
    problem = pallas_sequence_problem(chunk_size, **arrays)
    if problem is not None:
        raise ValueError(problem)
