"""Gated DeltaNet, the chunked form (impl="chunked", the training path): the WY / UT representation of each chunk.

Inside a chunk of C tokens: T = (I + diag(beta) L)^-1 diag(beta) with L = strict_lower((Gamma_i / Gamma_j)
k_i . k_j), W = T (Gamma K), U = T V (Gamma: the decays from the chunk's start, inclusive). From these
(`delta_chunk_pieces`): the chunk's score matrix tril(Gamma-ratio Q K^T) T, its transition
P = Gamma_C I - (Gamma_C/Gamma K)^T W, its own end state (Gamma_C/Gamma K)^T U, and the effective query
q~ = Gamma Q - tril(ratio Q K^T) W that reads a chunk-start state through the chunk's transitions. Between
chunks, `delta_chunked` carries the state S_end = P S_start + U with a `jax.lax.scan`; the log-linear delta rule
(`ramjax.ops.loglinear.gated_delta`) combines the same pieces over Fenwick levels (docs/loglinear.md section 3).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ramjax.ops.shared import numerics


# How the chunk inverse (I + diag(beta) L)^-1 is formed on CUDA GPUs (other platforms always take "doubling"):
#   "doubling"          block doubling in IEEE fp32 products (~12 [C, C] products per chunk, which XLA runs on the
#                       CUDA cores, not the tensor cores);
#   "doubling_tf32x3"   the same products as three TF32 tensor-core products each (the operands split into a high
#                       and a low TF32 part: about fp32's accuracy, where one TF32 product would lose the inverse);
#   "triangular_solve"  one batched unit-lower triangular solve against I (cuBLAS; ~C^3 / 3 multiply-adds per
#                       chunk against doubling's ~2 log2(C) C^3), differentiated by JAX as further solves.
# Chosen per platform when the program is lowered. "triangular_solve" by default: on an H200 it made the log-linear
# Gated DeltaNet LM's step 5-6% faster than "doubling" (experiments/results/bench_models.md, 2026-12-03), and with
# the chunked form's other products at full fp32 its error on the aligned-keys case (chunk 64) against the float64
# recurrence was 7.0e-7 against doubling's 8.0e-7 (2026-12-04).
INVERSE_METHOD = "triangular_solve"
INVERSE_METHODS = ("doubling", "doubling_tf32x3", "triangular_solve")


def _doubling_inverse(strict_lower: jax.Array, precision) -> jax.Array:
    """(I + A)^-1 for strictly lower-triangular A [..., C, C] by block doubling, products at `precision`.

    X starts as the inverse of the unit diagonal (I); each round merges pairs of diagonal blocks of width w into
    blocks of width 2w: if E holds the entries of I + A that link the two halves of each 2w block (a fixed mask),
    the merged inverse is X - X E X (exact: E X E = 0). Every X is the inverse of a block-diagonal part of I + A,
    so it stays moderate for the delta rule's unit-norm keys and beta in [0, 1]. (The Neumann product
    prod_i (I + (-A)^(2^i)) has the same cost but is not stable: with aligned keys the powers of A reach ~1e17
    and cancel, which gave wrong outputs and NaN gradients in fp32.) Full fp32 precision (or TF32 x 3): one TF32
    product would lose the inverse. Matmuls also avoid jaxlib's CPU triangular solve, which deadlocked here when
    two batched solves ran at once on a 2-core machine.
    """
    size = strict_lower.shape[-1]
    index = np.arange(size)
    inverse = jnp.broadcast_to(jnp.eye(size, dtype=strict_lower.dtype), strict_lower.shape)
    width = 1
    while width < size:
        same_pair = (index[:, None] // (2 * width)) == (index[None, :] // (2 * width))
        link = same_pair & ((index[:, None] // width) % 2 == 1) & ((index[None, :] // width) % 2 == 0)
        step = jnp.matmul(inverse, jnp.where(link, strict_lower, 0.0), precision=precision)
        inverse = inverse - jnp.matmul(step, inverse, precision=precision)
        width *= 2
    return inverse


def _solved_inverse(strict_lower: jax.Array) -> jax.Array:
    """(I + A)^-1 for strictly lower-triangular A [..., C, C] by one triangular solve against I."""
    eye = jnp.broadcast_to(jnp.eye(strict_lower.shape[-1], dtype=strict_lower.dtype), strict_lower.shape)
    return jax.lax.linalg.triangular_solve(strict_lower, eye, left_side=True, lower=True, unit_diagonal=True)


def _unit_lower_inverse(strict_lower: jax.Array) -> jax.Array:
    """(I + A)^-1 for strictly lower-triangular A [..., C, C] by INVERSE_METHOD on CUDA, block doubling in IEEE fp32
    elsewhere."""
    if INVERSE_METHOD not in INVERSE_METHODS:
        raise ValueError(f"ramjax.ops.gated_delta.chunked.INVERSE_METHOD: {INVERSE_METHOD!r} is not one of "
                         f"{INVERSE_METHODS}")

    def ieee(a):
        return _doubling_inverse(a, "highest")

    if INVERSE_METHOD == "doubling":
        return ieee(strict_lower)
    if INVERSE_METHOD == "doubling_tf32x3":
        def on_cuda(a):
            return _doubling_inverse(a, jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3)
    else:
        on_cuda = _solved_inverse
    return jax.lax.platform_dependent(strict_lower, cuda=on_cuda, default=ieee)


class ChunkPieces(NamedTuple):
    """The WY / UT pieces of every chunk, per chunk and head: [B, N, H, ...]."""
    scores: jax.Array  # [C, C]: (q_t^T A_{t,s} k_s) beta_s for s <= t
    q_eff: jax.Array  # [C, dk]: reads a chunk-start state through the chunk's transitions
    transition: jax.Array  # [dk, dk]: P, S_end = P S_start + own_state
    own_state: jax.Array  # [dk, dv]
    key_paths: jax.Array  # [dk, C]: A_{end,s} beta_s k_s
    w: jax.Array  # [C, dk]: W = T Gamma K (V' = U - W S for a chunk-start state S)
    u: jax.Array  # [C, dv]: U = T V
    to_end: jax.Array  # [C, dk]: (Gamma_C / Gamma) K
    gamma_end: jax.Array  # []: Gamma_C, the chunk's whole decay


def delta_chunk_pieces(qc, kc, vc, gc, bc, operand_dtype=None) -> ChunkPieces:
    """The WY / UT pieces of every chunk. Inputs [B, N, C, H, ...] -> per chunk and head.

    operand_dtype (bf16 for 16-bit inputs, or None): the matrix products take operands of that dtype and
    accumulate in float32, as the Pallas kernel does; the inverse (I + diag(beta) L)^-1 stays in full float32."""
    chunk_size = qc.shape[2]

    def mm(spec, x, y):
        return numerics.matmul(spec, x, y, operand_dtype)

    g_in = jnp.cumsum(gc, axis=2)  # [B, N, C, H]
    g_in = jnp.moveaxis(g_in, 3, 2)  # [B, N, H, C]
    q, k, v = (jnp.moveaxis(a, 3, 2) for a in (qc, kc, vc))  # [B, N, H, C, d]
    beta = jnp.moveaxis(bc, 3, 2)  # [B, N, H, C]
    strict = np.tril(np.ones((chunk_size, chunk_size), bool), -1)
    log_ratio = g_in[..., :, None] - g_in[..., None, :]
    ratio_strict = jnp.exp(jnp.where(strict, log_ratio, -jnp.inf))
    # The diagonal's exponent is the constant 0, not g_i - g_i: with strong decays the two opposite gradient
    # contributions of such a difference cancel against large terms and leave a wrong gradient for g.
    eye = np.eye(chunk_size, dtype=bool)
    ratio_incl = jnp.exp(jnp.where(strict, log_ratio, jnp.where(eye, 0.0, -jnp.inf)))
    lower = ratio_strict * mm("...ik,...jk->...ij", k, k)
    t_mat = _unit_lower_inverse(beta[..., :, None] * lower) * beta[..., None, :]  # (I + diag(beta) L)^-1 diag(beta)
    gamma = jnp.exp(g_in)
    w = mm("...ij,...jk->...ik", t_mat, gamma[..., None] * k)
    u = mm("...ij,...jv->...iv", t_mat, v)
    qk = ratio_incl * mm("...ik,...jk->...ij", q, k)
    scores = mm("...ij,...jk->...ik", qk, t_mat)  # [B, N, H, C, C]: (q_t^T A_{t,s} k_s) beta_s for s <= t
    q_eff = gamma[..., None] * q - mm("...ij,...jk->...ik", qk, w)  # [B, N, H, C, dk]
    # log(Gamma_C / Gamma_i) = the gates after i, summed directly (see numerics.exclusive_cumsum).
    after = numerics.exclusive_cumsum(jnp.moveaxis(gc, 3, 2), axis=-1, reverse=True)  # [B, N, H, C]
    to_end = jnp.exp(after)[..., None] * k  # (Gamma_C / Gamma) K
    d_k = k.shape[-1]
    transition = gamma[..., -1, None, None] * jnp.eye(d_k, dtype=q.dtype) - mm("...ck,...cj->...kj", to_end, w)
    own_state = mm("...ck,...cv->...kv", to_end, u)  # [B, N, H, dk, dv]
    key_paths = mm("...ck,...cj->...kj", to_end, t_mat)  # [B, N, H, dk, C]: A_{end,s} beta_s k_s
    return ChunkPieces(scores, q_eff, transition, own_state, key_paths, w, u, to_end, gamma[..., -1])


def delta_chunked(q, k, v, a, beta, state, chunk_size, operand_dtype=None):
    """Inputs [B, T, H, ...]; returns o [B, T, H, dv] and the final state. operand_dtype: as
    `delta_chunk_pieces`' (the states and their products stay in the compute dtype)."""
    batch, seq_len, heads, d_k = q.shape
    d_v = v.shape[-1]
    num_chunks = -(-seq_len // chunk_size)
    total = num_chunks * chunk_size

    def chunked(x):  # pad with tokens that change nothing (k = 0, beta = 0, a = 0); [B, N, C, H, ...]
        x = jnp.pad(x, ((0, 0), (0, total - seq_len)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape(batch, num_chunks, chunk_size, *x.shape[2:])

    qc, kc, vc, ac, bc = map(chunked, (q, k, v, a, beta))
    # Per chunk and head [B, N, H, ...]: scores [C, C], q_eff [C, dk] (reads the chunk-start state through the
    # chunk's transitions), transition P [dk, dk] and own end state U [dk, dv]: S_end = P S_start + U.
    scores, q_eff, transition, own_state = delta_chunk_pieces(qc, kc, vc, ac, bc, operand_dtype)[:4]
    o = numerics.matmul("bnhts,bnshv->bnhtv", scores, vc, operand_dtype)
    if state is None:
        state = jnp.zeros((batch, heads, d_k, d_v), q.dtype)
    starts, final = numerics.scan_chunk_states(
        lambda s, p_n, u_n: p_n @ s + u_n,
        state,
        (jnp.moveaxis(transition, 1, 2), jnp.moveaxis(own_state, 1, 2)),
    )  # starts [B, H, N, dk, dv]
    o = o + q_eff @ jnp.moveaxis(starts, 2, 1)
    o = jnp.moveaxis(o, 2, 3).reshape(batch, total, heads, d_v)[:, :seq_len]
    return o, final
