"""Plain (not log-linear) Gated DeltaNet, the base of the Gated DeltaNet baseline layer (docs/loglinear.md
section 5):

    S_t = exp(a_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T q_t

with a_t = log_decay_t <= 0 and S_0 = initial_state or 0.

Implementations (`impl=`):
  recurrent  `jax.lax.scan` over time of the step function (`gated_delta_rule_step`, `recurrent.py`); the
             reference for the delta rule.
  chunked    the training path (`chunked.py`). The sequence is padded to a whole number of chunks of C tokens
             (padding tokens write nothing and do not decay). Inside a chunk, the WY / UT representation
             (`delta_chunk_pieces`). Between chunks, a `jax.lax.scan` over chunks carries the d_k x d_v state;
             every exponent it uses is <= 0 (keys decayed to the chunk's end, queries from the chunk's start).
             16-bit q, k, v: the chunk pieces' products take 16-bit operands with fp32 accumulation, as the
             kernels do; the chunk inverse and the state passing stay in fp32.
  pallas     the chunked form as Pallas kernels with a Pallas backward pass (`kernels.gated_delta_chunk`: Triton
             on GPUs, interpret mode elsewhere); float32 or bfloat16 inputs (kept 16-bit for the matrix products;
             the chunk inverse in fp32), chunk_size a power of 2 >= 16. On one H200, in the LM train step at
             4096 x 8 (experiments/results/bench_models.md, 2026-12-01): 71 ms at chunk 32 against the chunked
             form's 136 ms at chunk 64, but 164 ms at chunk 64 (its [64, 64] fp32 inverse and gradients spill
             registers, kernels/README.md).
  auto       recurrent for a single token; on GPUs the Pallas kernels where they take the inputs and the chunk
             is at most PALLAS_MAX_CHUNK (32) tokens; chunked otherwise.

Sums, decays and states are computed in at least float32; o comes back in v's dtype and the final state
`[batch, heads, d_k, d_v]` in the compute dtype (float32, or float64 for float64 inputs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ramjax.ops.gated_delta.chunked import delta_chunked
from ramjax.ops.gated_delta.recurrent import delta_recurrent, delta_step
from ramjax.ops.shared import checks, numerics, per_shard

IMPLS = ("auto", "recurrent", "chunked", "pallas")
# impl="auto" takes the kernels on GPUs up to this chunk size: above it they were measured slower than the chunked
# XLA form (see the module docstring).
PALLAS_MAX_CHUNK = 32


def gated_delta_rule_step(state, q, k, v, log_decay, beta):
    """One token of Gated DeltaNet.

    Args:
      state: `[batch, heads, d_k, d_v]`, the state after the previous token (zeros before the first).
      q, k: `[batch, heads, d_k]` (used as given; the layer L2-normalises k).
      v: `[batch, heads, d_v]`.
      log_decay, beta: `[batch, heads]`; log_decay <= 0.

    Returns:
      (o `[batch, heads, d_v]` in v's dtype, the new state in the compute dtype, at least float32).
    """
    state, q, k, v, log_decay, beta = map(jnp.asarray, (state, q, k, v, log_decay, beta))
    checks.check_step(state, q, k, v, log_decay, beta)
    out_dtype = v.dtype
    dtype = numerics.compute_dtype(state, q, k, v, log_decay, beta)
    o, state = delta_step(*(x.astype(dtype) for x in (state, q, k, v, log_decay, beta)))
    return o.astype(out_dtype), state


def gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_decay: jax.Array,
    beta: jax.Array,
    *,
    impl: str = "auto",
    chunk_size: int = 64,
    initial_state: jax.Array | None = None,
    return_final_state: bool = False,
    sharding=None,
):
    """Gated DeltaNet: S_t = exp(log_decay_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T q_t.

    Args:
      q, k: `[batch, time, heads, d_k]`, used as given (the layer L2-normalises them).
      v: `[batch, time, heads, d_v]`.
      log_decay: `[batch, time, heads]` log decays, <= 0.
      beta: `[batch, time, heads]` write strengths; beta in [0, 1] with unit-norm keys keeps the transition a
        contraction (sigmoid in the layer).
      impl: "auto", "recurrent", "chunked" or "pallas" (see the module docstring).
      chunk_size: C for impl="chunked", any positive integer (the sequence is padded to a multiple of it).
      initial_state: `[batch, heads, d_k, d_v]`, the state to continue from (zeros when None).
      return_final_state: also return the state after the last token.
      sharding: how the `[batch, time, heads, ...]` arguments are laid out on a device mesh (time unsplit): the
        Pallas kernels then run on each device's shard (`ramjax.ops.shared.per_shard`); the XLA forms ignore it.

    Returns:
      o `[batch, time, heads, d_v]` in v's dtype, and when asked the final state `[batch, heads, d_k, d_v]` in
      the compute dtype (at least float32).
    """
    q, k, v, log_decay, beta = map(jnp.asarray, (q, k, v, log_decay, beta))
    if initial_state is not None:
        initial_state = jnp.asarray(initial_state)
    checks.check_sequence(q, k, v, log_decay, beta, impl, IMPLS, chunk_size, initial_state)
    out_dtype = v.dtype
    impl = _resolve_impl(impl, q, k, v, chunk_size)
    if impl == "pallas":
        return _pallas(q, k, v, log_decay, beta, initial_state, chunk_size, return_final_state, sharding)
    dtype = numerics.compute_dtype(q, k, v, log_decay, beta)
    operand_dtype = numerics.operand_dtype(q, k, v)  # 16-bit q, k, v: 16-bit operands in the chunked products
    q, k, v, log_decay, beta = (x.astype(dtype) for x in (q, k, v, log_decay, beta))
    log_decay = numerics.floor_log_decay(log_decay)
    state = None if initial_state is None else initial_state.astype(dtype)
    if impl == "recurrent":
        if state is None:
            state = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[-1]), dtype)
        o, final = delta_recurrent(q, k, v, log_decay, beta, state)
    else:
        o, final = delta_chunked(q, k, v, log_decay, beta, state, chunk_size, operand_dtype)
    o = o.astype(out_dtype)
    return (o, final) if return_final_state else o


def _resolve_impl(impl: str, q, k, v, chunk_size: int) -> str:
    """What impl="auto" stands for (see the module docstring)."""
    impl = numerics.resolve_sequence_impl(impl, q.shape[1])
    if impl != "chunked" or jax.default_backend() != "gpu" or chunk_size > PALLAS_MAX_CHUNK:
        return impl
    return "pallas" if checks.pallas_sequence_problem(chunk_size, q=q, k=k, v=v) is None else "chunked"


def _pallas(q, k, v, log_decay, beta, initial_state, chunk_size, return_final_state, sharding):
    """impl="pallas": `kernels.gated_delta_chunk.chunk_gated_delta`, interpret mode off GPUs."""
    from kernels import gated_delta_chunk

    checks.check_pallas_sequence(chunk_size, q=q, k=k, v=v)
    log_decay = numerics.floor_log_decay(log_decay.astype(jnp.float32))
    if initial_state is None:
        initial_state = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), jnp.float32)

    def kernel(q, k, v, log_decay, beta, state):
        return gated_delta_chunk.chunk_gated_delta(q, k, v, log_decay, beta, state, chunk_size=chunk_size,
                                                   interpret=jax.default_backend() != "gpu")

    o, final = per_shard.run_per_shard(kernel, sharding, (q, k, v, log_decay, beta.astype(jnp.float32)),
                                       initial_state.astype(jnp.float32))
    return (o, final) if return_final_state else o
