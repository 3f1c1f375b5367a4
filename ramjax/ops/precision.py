"""Matrix products of the chunked ops in bf16 training: 16-bit operands, float32 accumulation.

The chunked forms (GLA / Mamba-2, log-linear attention) keep sums, decays and states in at least float32. Their
matrix products are where the time goes, and with 16-bit q, k, v they take 16-bit operands with float32
accumulation (`preferred_element_type`), as fla's Triton kernels do: the tensor cores run at bf16 rate and the
inputs are read at half the bytes. Results then carry bf16 rounding (the tests state the tolerance).
"""

from __future__ import annotations

import jax.numpy as jnp


def operand_dtype(*arrays):
    """The 16-bit dtype all `arrays` share (bf16 or fp16), or None when they are wider or mixed."""
    dtypes = {jnp.dtype(a.dtype) for a in arrays}
    if len(dtypes) == 1:
        (dtype,) = dtypes
        if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2:
            return dtype
    return None


def matmul(spec: str, x, y, dtype=None):
    """einsum(spec, x, y) with both operands cast to `dtype` (None: as given), accumulated and returned in at
    least float32 (float64 stays float64)."""
    if dtype is not None:
        x, y = x.astype(dtype), y.astype(dtype)
    return jnp.einsum(spec, x, y, preferred_element_type=jnp.result_type(jnp.float32, x.dtype, y.dtype))
