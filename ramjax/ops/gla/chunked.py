"""Gated linear attention, the chunked form (impl="chunked", the training path): see `ramjax.ops.gla.op`.

Internally: q, k [B, H, T, dk], v [B, H, T, dv], a [B, H, T, D] log decays with D = 1 or D = d_k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ramjax.ops.gla.reference import causal_scores, log_decay_to_end
from ramjax.ops.shared import numerics

# Per-dimension gates inside a chunk: sub-chunks of this many tokens (when the chunk splits into several), so that
# only [SUB, SUB, d_k] decay tensors are formed (see `_subchunk_scores`).
GLA_SUBCHUNK = 16


def _subchunk_scores(q, k, a, sub: int, operand_dtype=None):
    """`causal_scores` for a per-dimension gate, without the [C, C, d_k] decay tensor (as fla's chunk_gla).

    The chunk's C tokens split into n = C / sub sub-chunks. With A the in-chunk cumulative log-decay, for t in
    sub-chunk i and s in an earlier sub-chunk j the decay exp(A_t - A_s) factors into three terms that are each
    <= 1: exp(A_t - E_{i-1}) on the query, exp(E_{i-1} - E_j) between sub-chunks and exp(E_j - A_s) on the key
    (E_j: A at the last token of sub-chunk j). So the off-diagonal blocks are matrix products of decayed q and
    k, with an [n, n, d_k] decay between them; the diagonal blocks use `causal_scores` on [sub, sub, d_k].
    """
    lead, size = q.shape[:-2], q.shape[-2]
    n = size // sub
    blocks = lambda x: x.reshape(*lead, n, sub, x.shape[-1])  # noqa: E731
    qb, kb, ab = blocks(q), blocks(k), blocks(a)
    cum = jnp.cumsum(a, axis=-2)  # A, inclusive, [..., C, dk]
    ends = blocks(cum)[..., -1, :]  # E_j [..., n, dk]
    before = jnp.concatenate([jnp.zeros_like(ends[..., :1, :]), ends[..., :-1, :]], axis=-2)  # E_{i-1}, E_{-1} = 0
    q_decayed = qb * jnp.exp(blocks(cum) - before[..., :, None, :])
    k_decayed = kb * jnp.exp(ends[..., :, None, :] - blocks(cum))
    earlier = np.tril(np.ones((n, n), bool), -1)[:, :, None]  # [i, j]: j < i
    between = jnp.exp(jnp.where(earlier, before[..., :, None, :] - ends[..., None, :, :], -jnp.inf))  # [.., i, j, dk]
    # One three-operand einsum, not the product (q_decayed x between) fed to a two-operand one: written that way,
    # the gradient's compiled program crashed XLA CPU (jaxlib 0.10.2, segfault) at some shapes, e.g. 5 chunks of
    # 32 tokens (tests/test_linear_attention.py::test_chunked_gla_gradient_at_many_chunks).
    if operand_dtype is not None:
        q_decayed, between, k_decayed = (x.astype(operand_dtype) for x in (q_decayed, between, k_decayed))
    off = jnp.einsum("...itk,...ijk,...jsk->...ijts", q_decayed, between, k_decayed,
                     preferred_element_type=jnp.float32 if operand_dtype is not None else None)  # 0 for j >= i
    diagonal = causal_scores(qb, kb, ab, exact=False)  # [..., n, sub, sub]
    same = np.eye(n, dtype=bool)[:, :, None, None]
    scores = jnp.where(same, diagonal[..., :, None, :, :], off)
    return jnp.swapaxes(scores, -3, -2).reshape(*lead, size, size)


def gla_chunked(q, k, v, a, state, chunk_size, operand_dtype=None):
    """Chunked GLA; q, k, v may be 16-bit (then `operand_dtype`: the matrix products take 16-bit operands and
    accumulate in float32), a and the state are in the compute dtype; o and the final state come back in it."""
    batch, heads, seq_len, d_k = q.shape
    d_v = v.shape[-1]
    total = -(-seq_len // chunk_size) * chunk_size
    qc, kc, vc, ac = (numerics.to_chunks(numerics.pad_time(x, total), chunk_size) for x in (q, k, v, a))

    # Inside each chunk.
    # Exact segment sums cost a pass over [C, C, D]: next to nothing for the scalar gate (Mamba-2's decays can
    # be strong), about the time of the rest of the chunk for the per-dimension one (GLA's are mild), on CPU.
    if a.shape[-1] > 1 and chunk_size > GLA_SUBCHUNK and chunk_size % GLA_SUBCHUNK == 0:
        # Recomputed in the backward pass: its intermediates are several times the size of q and k (compile-time
        # memory analysis of the LM step at 4096 x 8 on the CPU: 37.2 GB saved -> 26.8 GB recomputed).
        scores = jax.checkpoint(_subchunk_scores, static_argnums=(3, 4))(qc, kc, ac, GLA_SUBCHUNK, operand_dtype)
    else:
        scores = causal_scores(qc, kc, ac, exact=a.shape[-1] == 1, operand_dtype=operand_dtype)
    o = numerics.matmul("bhnts,bhnsv->bhntv", scores, vc, operand_dtype)

    # Between chunks: keys decayed to the chunk's end, queries from its start; both factors <= 1.
    cum = jnp.cumsum(ac, axis=3)  # log decay from the chunk's start, inclusive [B, H, N, C, D]
    chunk_decay = jnp.exp(cum[..., -1, :])  # [B, H, N, D]
    chunk_kv = numerics.matmul("bhnck,bhncv->bhnkv", jnp.exp(log_decay_to_end(ac)) * kc, vc, operand_dtype)
    if state is None:
        state = jnp.zeros((batch, heads, d_k, d_v), a.dtype)
    starts, final = numerics.scan_chunk_states(
        lambda s, decay_n, kv_n: decay_n[..., None] * s + kv_n, state, (chunk_decay, chunk_kv)
    )
    o = o + numerics.matmul("bhnck,bhnkv->bhncv", jnp.exp(cum) * qc, starts, operand_dtype)
    return o.reshape(batch, heads, total, d_v)[:, :, :seq_len], final
