"""Numerics shared by the ops: 16-bit matmul operands, the log-decay floor, the compute dtype, exclusive
cumulative sums, padding and chunking the time axis, and what `impl="auto"` stands for in the sequence ops.

Matrix products of the chunked ops in bf16 training: 16-bit operands, float32 accumulation (`operand_dtype`,
`matmul`). The chunked forms (GLA / Mamba-2, log-linear attention) keep sums, decays and states in at least
float32. Their matrix products are where the time goes, and with 16-bit q, k, v they take 16-bit operands with
float32 accumulation (`preferred_element_type`), as fla's Triton kernels do: the tensor cores run at bf16 rate
and the inputs are read at half the bytes. Results then carry bf16 rounding (the tests state the tolerance).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Log-decays below this count as this (e^-30 ~ 1e-13: a full reset in fp32). The dense and chunked forms take
# differences of cumulative log-decays, where a -inf (a gate of exactly 0, exp(A_log) overflowing) would give
# -inf - -inf = NaN; every implementation (plain and log-linear) applies the same floor, so they agree.
LOG_DECAY_FLOOR = -30.0


@jax.custom_vjp
def floor_log_decay(log_decay: jax.Array) -> jax.Array:
    """max(log_decay, LOG_DECAY_FLOOR), with the gradient of max (0 where the floor holds) computed from a boolean
    mask: the backward pass keeps that mask, not a float copy of the log decays (one more residual per layer)."""
    return jnp.maximum(log_decay, LOG_DECAY_FLOOR)


def _floor_log_decay_forward(log_decay):
    kept = log_decay > LOG_DECAY_FLOOR
    return jnp.where(kept, log_decay, LOG_DECAY_FLOOR), kept


def _floor_log_decay_backward(kept, cotangent):
    return (jnp.where(kept, cotangent, 0.0),)


floor_log_decay.defvjp(_floor_log_decay_forward, _floor_log_decay_backward)


def operand_dtype(*arrays):
    """The 16-bit dtype all `arrays` share (bf16 or fp16), or None when they are wider or mixed."""
    dtypes = {jnp.dtype(a.dtype) for a in arrays}
    if len(dtypes) == 1:
        (dtype,) = dtypes
        if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2:
            return dtype
    return None


# On CPUs the 16-bit operands are widened to float32 first. CPUs have no bf16 matrix units (the cpu configs compute
# in float32 because it is faster), and XLA:CPU's dot runtime rejects some BF16 x BF16 = F32 products outright: seen
# with jax 0.10.2, log-linear attention's level read ("bgichk,bghkv->bgichv") at T >= 256 failed with "UNIMPLEMENTED:
# Unsupported element type for DotThunk::Execute", so a bf16 config (the GPU defaults) could not run on a CPU.
WIDEN_ON_CPU = True


def matmul(spec: str, x, y, dtype=None):
    """einsum(spec, x, y) with both operands cast to `dtype` (None: as given), accumulated and returned in at
    least float32 (float64 stays float64). On CPUs 16-bit operands are multiplied in float32 (WIDEN_ON_CPU)."""
    if dtype is not None:
        x, y = x.astype(dtype), y.astype(dtype)
    if WIDEN_ON_CPU and jax.default_backend() == "cpu":
        x, y = x.astype(jnp.result_type(jnp.float32, x.dtype)), y.astype(jnp.result_type(jnp.float32, y.dtype))
    return jnp.einsum(spec, x, y, preferred_element_type=jnp.result_type(jnp.float32, x.dtype, y.dtype))


def compute_dtype(*arrays):
    """float32 at least (float64 stays float64): sums, decays and states accumulate over the whole sequence."""
    return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))


def resolve_sequence_impl(impl: str, seq_len: int) -> str:
    """What `impl="auto"` stands for in the sequence ops: recurrent for a single token, chunked otherwise."""
    if impl != "auto":
        return impl
    return "recurrent" if seq_len == 1 else "chunked"


def exclusive_cumsum(x: jax.Array, axis: int, reverse: bool = False) -> jax.Array:
    """Sums of the elements strictly before (or, reversed, strictly after) each one along `axis`.

    Summed directly, not as a running sum minus the element: with strong decays that difference cancels large
    terms and the gradient for g loses its accuracy."""
    x = jnp.moveaxis(x, axis, -1)
    if reverse:
        x = jnp.flip(x, -1)
    shifted = jnp.concatenate([jnp.zeros_like(x[..., :1]), jnp.cumsum(x[..., :-1], axis=-1)], axis=-1)
    if reverse:
        shifted = jnp.flip(shifted, -1)
    return jnp.moveaxis(shifted, -1, axis)


def pad_time(a: jax.Array, total: int) -> jax.Array:
    """Pads axis 2 (time) with zeros to `total`: tokens that write nothing (k = 0) and do not decay (a = 0)."""
    widths = [(0, 0)] * a.ndim
    widths[2] = (0, total - a.shape[2])
    return jnp.pad(a, widths)


def to_chunks(a: jax.Array, chunk_size: int) -> jax.Array:
    """[B, H, N*C, ...] -> [B, H, N, C, ...]."""
    return a.reshape(*a.shape[:2], a.shape[2] // chunk_size, chunk_size, *a.shape[3:])


def scan_chunk_states(step, state, xs):
    """The state at the start of every chunk [B, H, N, dk, dv], and after the last; xs have N on axis 2."""

    def body(state, x):
        return step(state, *x), state

    final, starts = jax.lax.scan(body, state, [jnp.moveaxis(x, 2, 0) for x in xs])
    return jnp.moveaxis(starts, 0, 2), final
