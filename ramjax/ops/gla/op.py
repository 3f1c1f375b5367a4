"""Plain (not log-linear) gated linear attention, the base of the GLA and Mamba-2 baseline layers
(docs/loglinear.md section 5).

Gated linear attention (Mamba-2 / SSD with a scalar gate per head, GLA with one gate per key dimension):

    S_t = diag(exp(a_t)) S_{t-1} + k_t v_t^T,    o_t = S_t^T q_t,    S_0 = initial_state or 0

with a_t = log_decay_t <= 0 (a scalar gate broadcasts over d_k). Unrolled, with A = cumsum(a) over time:

    o_t = sum_{s <= t} (sum_d q_td k_sd exp(A_td - A_sd)) v_s  +  (q_t * exp(A_t))^T S_0

Implementations (`impl=`):
  dense      the materialised T x T score matrix, the reference (`reference.py`). The log decay from s to t is
             summed over the segment itself (not taken as A_t - A_s, which loses precision once A is large) and
             masked to s <= t before the exp, so nothing overflows.
  recurrent  `jax.lax.scan` over time of the step function (`gated_linear_attention_step`).
  chunked    the training path (`chunked.py`). The sequence is padded to a whole number of chunks of C tokens
             (padding tokens write nothing and do not decay). Inside a chunk, the masked C x C score matrix as in
             dense (for the per-dimension gate the log decays are differences of in-chunk cumulative sums, and
             the chunk splits into sub-chunks of GLA_SUBCHUNK tokens: decay tensors only of [sub, sub, d_k] on
             the diagonal, matrix products of decayed q and k between sub-chunks, as fla's chunk_gla; those
             scores are recomputed in the backward pass rather than saved). Between chunks, a `jax.lax.scan`
             over chunks carries the d_k x d_v state; every exponent it uses is <= 0 (keys decayed to the
             chunk's end, queries from the chunk's start).
  pallas     the chunked form as Pallas kernels with a Pallas backward pass (`kernels.gla_chunk`: Triton on
             GPUs, interpret mode elsewhere); float32 or bfloat16 inputs, chunk_size a power of 2 >= 16.
  auto       recurrent for a single token; on a GPU, pallas where the kernels take the inputs; chunked otherwise.
             On one H200 the Pallas kernels made the whole LM train step faster than the XLA chunked form wherever
             both were timed in one run (experiments/results/bench_models.md, the 2026-12-01 10:47-11:12 runs: GLA
             71 -> 49 ms at 1024 x 32, 78 -> 51 ms at 4096 x 8; Mamba-2 92 -> 70 ms at 4096 x 8), and at 16384 x 2
             faster than the XLA rows of an earlier run. On a CPU the kernels would run in interpret mode, far
             slower than XLA, so auto keeps the chunked form there.

Sums, decays and states are computed in at least float32; o comes back in v's dtype and the final state
`[batch, heads, d_k, d_v]` in the compute dtype (float32, or float64 for float64 inputs). With 16-bit q, k, v
(bf16 training) the chunked form hands its matrix products 16-bit operands with float32 accumulation
(`preferred_element_type`), as fla's kernels do; within a chunk the scores are rounded to 16 bits before they
multiply v, so its error is that of bf16 (tests/test_linear_attention.py states the tolerance).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ramjax.ops.gla.chunked import gla_chunked
from ramjax.ops.gla.reference import gla_dense, gla_recurrent, gla_step
from ramjax.ops.shared import checks, numerics, per_shard

IMPLS = ("auto", "dense", "recurrent", "chunked", "pallas")


def _heads_first(a: jax.Array) -> jax.Array:
    """[B, T, H, ...] -> [B, H, T, ...]."""
    return jnp.moveaxis(a, 2, 1)


def gated_linear_attention_step(state, q, k, v, log_decay):
    """One token of gated linear attention.

    Args:
      state: `[batch, heads, d_k, d_v]`, the state after the previous token (zeros before the first).
      q, k: `[batch, heads, d_k]`.
      v: `[batch, heads, d_v]`.
      log_decay: `[batch, heads]` (scalar gate) or `[batch, heads, d_k]` (per key dimension), <= 0.

    Returns:
      (o `[batch, heads, d_v]` in v's dtype, the new state in the compute dtype, at least float32).
    """
    state, q, k, v, log_decay = map(jnp.asarray, (state, q, k, v, log_decay))
    checks.check_step(state, q, k, v, log_decay, None)
    out_dtype = v.dtype
    dtype = numerics.compute_dtype(state, q, k, v, log_decay)
    state, q, k, v, log_decay = (x.astype(dtype) for x in (state, q, k, v, log_decay))
    if log_decay.ndim == 2:
        log_decay = log_decay[..., None]
    o, state = gla_step(state, q, k, v, log_decay)
    return o.astype(out_dtype), state


def gated_linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_decay: jax.Array,
    *,
    impl: str = "auto",
    chunk_size: int = 64,
    initial_state: jax.Array | None = None,
    return_final_state: bool = False,
    sharding=None,
):
    """Gated linear attention: S_t = diag(exp(log_decay_t)) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t.

    Args:
      q, k: `[batch, time, heads, d_k]`, or `[batch, time, 1, d_k]`: one q and k that every head reads (Mamba-2's
        C and B); the Pallas kernels then read them without a copy per head.
      v: `[batch, time, heads, d_v]`.
      log_decay: `[batch, time, heads]` (a scalar gate per head: Mamba-2 / SSD) or `[batch, time, heads, d_k]`
        (a gate per key dimension: GLA), <= 0.
      impl: "auto", "dense", "recurrent", "chunked" or "pallas" (see the module docstring).
      chunk_size: C for impl="chunked", any positive integer (the sequence is padded to a multiple of it).
      initial_state: `[batch, heads, d_k, d_v]`, the state to continue from (zeros when None).
      return_final_state: also return the state after the last token.
      sharding: how the `[batch, time, heads, ...]` arguments are laid out on a device mesh (time unsplit): the
        Pallas kernels then run on each device's shard (`ramjax.ops.shared.per_shard`); the XLA forms ignore it.

    Returns:
      o `[batch, time, heads, d_v]` in v's dtype, and when asked the final state `[batch, heads, d_k, d_v]` in
      the compute dtype (at least float32).
    """
    q, k, v, log_decay = map(jnp.asarray, (q, k, v, log_decay))
    if initial_state is not None:
        initial_state = jnp.asarray(initial_state)
    checks.check_sequence(q, k, v, log_decay, None, impl, IMPLS, chunk_size, initial_state, shared_qk=True)
    out_dtype = v.dtype
    dtype = numerics.compute_dtype(q, k, v, log_decay)
    operand_dtype = numerics.operand_dtype(q, k, v)
    impl = _resolve_impl(impl, q, k, v, chunk_size)
    if impl == "pallas":
        return _pallas(q, k, v, log_decay, initial_state, chunk_size, return_final_state, sharding)
    if q.shape[2] != v.shape[2]:  # one q and k head for all heads: the XLA forms take a copy per head
        q, k = (jnp.broadcast_to(x, (*v.shape[:3], x.shape[3])) for x in (q, k))
    if impl != "chunked" or operand_dtype is None:  # only the chunked form keeps 16-bit operands
        q, k, v = (x.astype(dtype) for x in (q, k, v))
    log_decay = numerics.floor_log_decay(log_decay.astype(dtype))
    if log_decay.ndim == 3:
        log_decay = log_decay[..., None]
    q, k, v, a = map(_heads_first, (q, k, v, log_decay))
    state = None if initial_state is None else initial_state.astype(dtype)
    if impl == "recurrent":
        if state is None:
            state = jnp.zeros((*q.shape[:2], q.shape[-1], v.shape[-1]), dtype)
        o, final = gla_recurrent(q, k, v, a, state)
    elif impl == "dense":
        o, final = gla_dense(q, k, v, a, state)
    else:
        o, final = gla_chunked(q, k, v, a, state, chunk_size, operand_dtype)
    o = jnp.moveaxis(o, 1, 2).astype(out_dtype)
    return (o, final) if return_final_state else o


def _resolve_impl(impl: str, q, k, v, chunk_size: int) -> str:
    """What impl="auto" stands for (see the module docstring)."""
    impl = numerics.resolve_sequence_impl(impl, q.shape[1])
    if impl != "chunked" or jax.default_backend() != "gpu":
        return impl
    return "pallas" if checks.pallas_sequence_problem(chunk_size, q=q, k=k, v=v) is None else "chunked"


def _pallas(q, k, v, log_decay, initial_state, chunk_size, return_final_state, sharding):
    """impl="pallas": `kernels.gla_chunk.chunk_gla` on [B, T, H, ...] arrays, interpret mode off GPUs."""
    from kernels import gla_chunk

    checks.check_pallas_sequence(chunk_size, q=q, k=k, v=v)
    log_decay = numerics.floor_log_decay(log_decay.astype(jnp.float32))
    if log_decay.ndim == 3:
        log_decay = log_decay[..., None]
    if initial_state is None:
        initial_state = jnp.zeros((v.shape[0], v.shape[2], q.shape[3], v.shape[3]), jnp.float32)

    def kernel(q, k, v, log_decay, state):
        return gla_chunk.chunk_gla(q, k, v, log_decay, state, chunk_size=chunk_size,
                                   interpret=jax.default_backend() != "gpu")

    o, final = per_shard.run_per_shard(kernel, sharding, (q, k, v, log_decay), initial_state.astype(jnp.float32))
    return (o, final) if return_final_state else o
