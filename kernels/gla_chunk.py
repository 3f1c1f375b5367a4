"""Chunked gated linear attention (GLA, Mamba-2 SSD) as Pallas kernels (Triton lowering), with a custom VJP
whose backward pass is Pallas kernels too.

Per batch b and head h, with a_t <= 0 the log decay (per key dimension, GLA; or one scalar per head, Mamba-2):

    S_t = diag(exp(a_t)) S_{t-1} + k_t v_t^T,    o_t = S_t^T q_t,    S_0 = initial_state (or 0)

In chunks of C tokens, with A_t = a_1 + ... + a_t the log decay from the chunk's start (A <= 0, non-increasing)
and H the state at the chunk's start:

    o_t    = (q_t * exp(A_t)) H  +  sum_{s <= t in the chunk} P[t, s] v_s,   P[t, s] = sum_d q_td k_sd exp(A_td - A_sd)
    H_next = exp(A_last) * H  +  sum_s (k_s * exp(A_last - A_s)) v_s^T

Kernels (G = B * H sequences, each a (batch, head) of the [B, T, H, D] arrays, read in place; d_k, d_v padded to
powers of 2 >= 16, T to whole chunks, where they are not):
  _state_kernel    grid (G, d_k blocks, d_v blocks): walks the chunks, stores each chunk's start state and the final
                   state;
  _output_kernel   grid (G, chunks, d_v blocks): o per chunk (full d_k: the scores sum over it), and P's diagonal
                   [16, 16] blocks, which the backward pass keeps for _dv_kernel (their per-row exps are most of
                   its work otherwise; a scalar gate's whole-chunk kernels recompute P instead);
  _state_grad_kernel  grid (G, d_k blocks, d_v blocks): the adjoint dH walks the chunks backwards, storing each
                   chunk's end-state gradient and the initial state's;
  _dv_kernel       grid (G, chunks, d_v blocks): dv;
  _dqk_kernel      grid (G, chunks, d_k blocks): dq, dk and dA (the gradient of the cumulative log decay), summing
                   over d_v blocks inside the program.

Numerics: no positive number is ever exponentiated. Inside a chunk, the tokens go in sub-chunks of 16 rows. For a
query sub-chunk i and an earlier key sub-chunk j, with E = A at the last row of sub-chunk i - 1,
exp(A_t - A_s) = exp(A_t - E) exp(E - A_s), both factors <= 1, so P_ij = (q_i exp(A_i - E)) (k_j exp(E - A_j))^T
is one matrix product. The diagonal [16, 16] blocks take exp(A_t - A_s) per (t, s) pair and dimension, one key
row at a time (never a [16, 16, d_k] array); with a scalar gate they are a [16, 16] decay matrix times q k^T.

Matrix products take operands in the inputs' dtype (bf16 or fp32) with fp32 accumulation; gates, cumulative sums
and states are fp32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kernels.chunk_common import (ChunkConfig, call, default_num_warps, dot, exp_nonpositive, operand_dtype,
                                  padded_width, state_rows)
from kernels.shapes import pad_axis

# Rows per sub-chunk: the smallest block Triton's dot takes. 32 works too (tested) but trained the GLA LM 1.67x
# slower on an H200 (its per-row decay loop keeps twice the tiles live; experiments/results/bench_models.md).
SUB = 16
MAX_BLOCK = 64  # d_k and d_v block width where a kernel tiles them
# The two kernels that walk the chunks one after another (states, state gradients) have one program per (sequence,
# d_k block, d_v block), so few sequences (batch x heads = 16 in the LM at 16384 x 2) leave most of a GPU idle
# while each program takes T / C sequential steps. Their tiles narrow (down to 16) until there are at least this
# many programs: about two per SM of an H200 (132 SMs). Timed on one H200 against full-width tiles (=1), in the LM
# train step at 16384 x 2: GLA 1.10x, Mamba-2 1.04x, Gated DeltaNet 1.08x faster (kernels/README.md).
MIN_STATE_PROGRAMS = 256
# With one log decay per head (Mamba-2) the chunk's decay matrix exp(A_t - A_s), s <= t, is one [C, C] array whose
# exponents are all <= 0, so the output, dv and dq/dk kernels multiply whole chunks ([C, d_k] x [d_k, C],
# [C, C] x [C, d_v]) instead of 16-row sub-chunk pairs. False: the sub-chunk form for scalar gates too (the A/B).
SCALAR_GATE_FULL_WIDTH = True
# With a per-dimension gate (GLA), the kernels named here run one program per 16-row sub-chunk (the *_sub kernels:
# a sub-chunk's arrays live, n_sub times the programs) instead of one per chunk (every sub-chunk's q, k, A and
# partial results live at once), when d_k is at least SUB_CHUNK_MIN_DK. Timed on one H200 (kernels/README.md):
# at d_k 64, chunk 64 (the anchor shape, where the per-chunk dq/dk/dA kernel spills 1344 bytes) all three in the
# sub-chunk form make GLA's forward + backward 1.4x faster (8.82 -> 6.21 ms of kernels at 8x4096, 16 heads); at the
# LM's d_k 32 (little spilling, n_sub times the programs for the same work) they made the LM step slower (GLA
# 0.78x -> 0.71x the transformer's tokens/s at 4096x8), so smaller d_k keeps the per-chunk programs.
SUB_CHUNK_PROGRAMS: frozenset = frozenset({"gla_chunk_outputs", "gla_chunk_dv", "gla_chunk_dqk"})
SUB_CHUNK_MIN_DK = 64


# ---------------------------------------------------------------------------------------------------------------
# Pieces the kernels share


def _rows(i):
    """The rows of sub-chunk i inside a chunk's block."""
    return pl.ds(i * SUB, SUB)


def _row(ref, r):
    """Row r of a [rows, width] ref as a [1, width] fp32 array."""
    return ref[r, :].astype(jnp.float32)[None, :]


def _iotas(rows=None):
    """[rows, 1] row and [1, rows] column indices of a [rows, rows] block (a sub-chunk's by default)."""
    rows = SUB if rows is None else rows
    return (jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0), jax.lax.broadcasted_iota(jnp.int32, (1, rows), 1))


def _diag_scores(q_ref, k_ref, a_ref, start, per_dim, dtype):
    """[SUB, SUB] fp32 P[t, s] = sum_d q_td k_sd exp(A_td - A_sd) for t, s in the sub-chunk whose first row is
    `start` (a Python int or, in the *_sub kernels, traced), s <= t (0 above)."""
    rows = pl.ds(start, SUB)
    t, s = _iotas()
    q, a = q_ref[rows, :].astype(jnp.float32), a_ref[rows, :]
    if not per_dim:
        decay = jnp.where(s <= t, exp_nonpositive(a - a.reshape(1, SUB)), 0.0)  # a: [SUB, 1]
        return dot(q, k_ref[rows, :], dtype, trans_b=True) * decay
    scores = jnp.zeros((SUB, SUB), jnp.float32)
    for r in range(SUB):  # one key row at a time: a [SUB, d_k] decay, not [SUB, SUB, d_k]
        key, key_a = (ref[pl.ds(start + r, 1), :].astype(jnp.float32) for ref in (k_ref, a_ref))
        column = jnp.sum(q * key * exp_nonpositive(a - key_a), axis=1)  # (rows t < r are masked below)
        scores += jnp.where(s == r, column[:, None], 0.0)
    return jnp.where(s <= t, scores, 0.0)


def _query_factor(a_ref, i):
    """For query sub-chunk i > 0: (E, exp(A_i - E)) with E = A at the last row of sub-chunk i - 1, the reference
    that splits the decay to every earlier key sub-chunk into two factors <= 1 (`_key_factor`)."""
    edge = _row(a_ref, i * SUB - 1)
    return edge, exp_nonpositive(a_ref[_rows(i), :] - edge)


def _key_factor(a_ref, edge, j):
    """exp(E - A_j) for key sub-chunk j before the query sub-chunk whose reference is E: with the query's factor,
    (q_i exp(A_i - E)) (k_j exp(E - A_j))^T is P between the two sub-chunks."""
    return exp_nonpositive(edge - a_ref[_rows(j), :])


# ---------------------------------------------------------------------------------------------------------------
# Forward kernels


def _state_kernel(k_ref, v_ref, a_ref, h0_ref, *refs, chunk, n_chunks, dtype):
    """Chunk-start states h_ref [N, BK, BV] and the final state [BK, BV] of one (sequence, d_k block, d_v block);
    k_ref [T_pad, BK], v_ref [T_pad, BV], a_ref [T_pad, BK or 1] (in-chunk cumulative log decay), h0 [BK, BV]."""
    h_ref, final_ref = refs[-2:]  # (with poison_output, the aliased NaN buffers come first)

    def body(n, h):
        h_ref[n] = h
        span = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
        a, a_last = a_ref[span, :], a_ref[n * chunk + chunk - 1, :]
        k_e = k_ref[span, :].astype(jnp.float32) * exp_nonpositive(a_last[None, :] - a)
        return exp_nonpositive(a_last)[:, None] * h + dot(k_e, v_ref[span, :], dtype, trans_a=True)

    final_ref[...] = jax.lax.fori_loop(0, n_chunks, body, h0_ref[...])


def _output_kernel(q_ref, k_ref, v_ref, a_ref, h_ref, *refs, n_sub, per_dim, dtype):
    """o [C, BV] of one chunk and d_v block, and the diagonal [SUB, SUB] blocks of P stacked as [C, SUB] (the
    backward pass's dv kernel reads them rather than recomputing their per-row exps; every d_v block writes the same
    values): q_ref, k_ref [C, DK], v_ref [C, BV], a_ref [C, DK or 1], h_ref (the chunk-start state) [DK, BV]."""
    o_ref, p_diag_ref = refs[-2:]
    h = h_ref[...]
    for i in range(n_sub):
        rows = _rows(i)
        q, a = q_ref[rows, :].astype(jnp.float32), a_ref[rows, :]
        out = dot(q * exp_nonpositive(a), h, dtype)  # from the chunk-start state
        p_diag = _diag_scores(q_ref, k_ref, a_ref, i * SUB, per_dim, dtype)
        p_diag_ref[rows, :] = p_diag
        out += dot(p_diag, v_ref[rows, :], dtype)
        if i:
            edge, q_decay = _query_factor(a_ref, i)
            q_e = q * q_decay
        for j in range(i):
            k_e = k_ref[_rows(j), :].astype(jnp.float32) * _key_factor(a_ref, edge, j)
            out += dot(dot(q_e, k_e, dtype, trans_b=True), v_ref[_rows(j), :], dtype)
        o_ref[rows, :] = out.astype(o_ref.dtype)


def _output_kernel_sub(q_ref, k_ref, v_ref, a_ref, h_ref, *refs, n_sub, per_dim, dtype):
    """_output_kernel, one 16-row sub-chunk i per program (program axis 2 is d_v block * n_sub + i): o [SUB, BV] of
    sub-chunk i and P's diagonal block [SUB, SUB]. Inputs as _output_kernel's (the whole chunk)."""
    o_ref, p_diag_ref = refs[-2:]
    f32 = jnp.float32
    start = pl.multiple_of(pl.program_id(2) % n_sub * SUB, SUB)
    rows = pl.ds(start, SUB)
    q, a = q_ref[rows, :].astype(f32), a_ref[rows, :]
    out = dot(q * exp_nonpositive(a), h_ref[...], dtype)  # from the chunk-start state
    p_diag = _diag_scores(q_ref, k_ref, a_ref, start, per_dim, dtype)
    p_diag_ref[...] = p_diag
    out += dot(p_diag, v_ref[rows, :], dtype)
    edge = a_ref[pl.ds(jnp.maximum(start - 1, 0), 1), :]  # E (`_query_factor`; unused by sub-chunk 0)
    q_e = q * exp_nonpositive(a - edge)

    def earlier(j, acc):  # key sub-chunk j < i
        key_rows = pl.ds(pl.multiple_of(j * SUB, SUB), SUB)
        k_e = k_ref[key_rows, :].astype(f32) * exp_nonpositive(edge - a_ref[key_rows, :])
        return acc + dot(dot(q_e, k_e, dtype, trans_b=True), v_ref[key_rows, :], dtype)

    out += jax.lax.fori_loop(0, start // SUB, earlier, jnp.zeros(out.shape, f32))
    o_ref[...] = out.astype(o_ref.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Backward kernels


def _state_grad_kernel(q_ref, do_ref, a_ref, dfinal_ref, *refs, chunk, n_chunks, dtype):
    """Gradients of each chunk's end state dh_ref [N, BK, BV] and of the initial state [BK, BV]:
    dH_end(n - 1) = exp(A_last(n)) dH_end(n) + (q_n exp(A_n))^T do_n, from dH_end(N - 1) = d final state."""
    dh_ref, dinit_ref = refs[-2:]

    def body(step, dh):
        n = n_chunks - 1 - step
        dh_ref[n] = dh
        span = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
        a, a_last = a_ref[span, :], a_ref[n * chunk + chunk - 1, :]
        q_e = q_ref[span, :].astype(jnp.float32) * exp_nonpositive(a)
        return exp_nonpositive(a_last)[:, None] * dh + dot(q_e, do_ref[span, :], dtype, trans_a=True)

    dinit_ref[...] = jax.lax.fori_loop(0, n_chunks, body, dfinal_ref[...])


def _dv_kernel(q_ref, k_ref, a_ref, do_ref, dh_ref, p_diag_ref, *refs, n_sub, dtype, **_):
    """dv [C, BV] of one chunk and d_v block: dv_s = sum_{t >= s} P[t, s] do_t + (k_s exp(A_last - A_s)) dH_end;
    q_ref, k_ref [C, DK], a_ref [C, DK or 1], do_ref [C, BV], dh_ref (chunk-end state gradient) [DK, BV], p_diag_ref
    (P's diagonal blocks, from the forward pass's output kernel) [C, SUB]."""
    dv_ref = refs[-1]
    dh = dh_ref[...]
    a_last = _row(a_ref, n_sub * SUB - 1)
    queries = [None]  # q_i exp(A_i - E_i) and E_i of each query sub-chunk i > 0 (`_query_factor`)
    for i in range(1, n_sub):
        edge, q_decay = _query_factor(a_ref, i)
        queries.append((q_ref[_rows(i), :].astype(jnp.float32) * q_decay, edge))
    for j in range(n_sub):
        rows = _rows(j)
        k = k_ref[rows, :].astype(jnp.float32)
        dv = dot(k * exp_nonpositive(a_last - a_ref[rows, :]), dh, dtype)  # through the chunk-end state
        dv += dot(p_diag_ref[rows, :], do_ref[rows, :], dtype, trans_a=True)
        for i in range(j + 1, n_sub):
            q_e, edge = queries[i]
            k_e = k * _key_factor(a_ref, edge, j)
            dv += dot(dot(q_e, k_e, dtype, trans_b=True), do_ref[_rows(i), :], dtype, trans_a=True)
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)


def _dv_kernel_sub(q_ref, k_ref, a_ref, do_ref, dh_ref, p_diag_ref, *refs, n_sub, dtype, **_):
    """_dv_kernel, one 16-row key sub-chunk j per program (program axis 2 is d_v block * n_sub + j): dv [SUB, BV];
    p_diag_ref is sub-chunk j's diagonal block of P [SUB, SUB]; the other inputs as _dv_kernel's (the whole
    chunk)."""
    dv_ref = refs[-1]
    f32 = jnp.float32
    j = pl.program_id(2) % n_sub
    rows = pl.ds(pl.multiple_of(j * SUB, SUB), SUB)
    k, a = k_ref[rows, :].astype(f32), a_ref[rows, :]
    a_last = _row(a_ref, n_sub * SUB - 1)
    dv = dot(k * exp_nonpositive(a_last - a), dh_ref[...], dtype)  # through the chunk-end state
    dv += dot(p_diag_ref[...], do_ref[rows, :], dtype, trans_a=True)

    def later(i, acc):  # query sub-chunk i > j, split at its E (`_query_factor`)
        query_start = pl.multiple_of(i * SUB, SUB)
        query_rows = pl.ds(query_start, SUB)
        edge = a_ref[pl.ds(query_start - 1, 1), :]
        q_e = q_ref[query_rows, :].astype(f32) * exp_nonpositive(a_ref[query_rows, :] - edge)
        k_e = k * exp_nonpositive(edge - a)
        return acc + dot(dot(q_e, k_e, dtype, trans_b=True), do_ref[query_rows, :], dtype, trans_a=True)

    dv += jax.lax.fori_loop(j + 1, n_sub, later, jnp.zeros(dv.shape, f32))
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dqk_kernel(q_ref, k_ref, v_ref, a_ref, do_ref, h_ref, dh_ref, *refs, n_sub, n_vblocks, block_v, per_dim,
                dtype):
    """dq, dk [C, BK] and dA [C, BK] (the gradient of the cumulative log decay A, per key dimension) of one chunk
    and d_k block. q_ref, k_ref [C, BK]; v_ref, do_ref [C, DV]; a_ref [C, BK or 1]; h_ref (chunk-start state) and
    dh_ref (chunk-end state gradient) [BK, DV].

    With dP[t, s] = do_t . v_s:  dq_t = exp(A_t) (H do_t) + sum_{s <= t} dP[t, s] k_s exp(A_t - A_s),
    dk_s = exp(A_last - A_s) (dH v_s) + sum_{t >= s} dP[t, s] q_t exp(A_t - A_s),
    dA_t = q_t dq_t - k_t dk_t, plus at the chunk's last row what A_last does through the end state:
    exp(A_last) sum_v H dH + sum_s k_s exp(A_last - A_s) (dH v_s)."""
    dq_ref, dk_ref, da_ref = refs[-3:]
    f32 = jnp.float32
    # Sums over d_v, one block of columns at a time: the products with the states, and dP per sub-chunk pair.
    dq = [jnp.zeros((SUB, q_ref.shape[1]), f32) for _ in range(n_sub)]
    dk_state = [jnp.zeros((SUB, q_ref.shape[1]), f32) for _ in range(n_sub)]
    dp = {(i, j): jnp.zeros((SUB, SUB), f32) for i in range(n_sub) for j in range(i + 1)}
    state_term = jnp.zeros((q_ref.shape[1],), f32)
    for c in range(n_vblocks):
        cols = pl.ds(c * block_v, block_v)
        h, dh = h_ref[:, cols], dh_ref[:, cols]
        state_term += jnp.sum(h * dh, axis=1)
        for i in range(n_sub):
            do_i = do_ref[_rows(i), cols]
            dq[i] += dot(do_i, h, dtype, trans_b=True)
            dk_state[i] += dot(v_ref[_rows(i), cols], dh, dtype, trans_b=True)
            for j in range(i + 1):
                dp[i, j] += dot(do_i, v_ref[_rows(j), cols], dtype, trans_b=True)

    a_last = _row(a_ref, n_sub * SUB - 1)
    q = [q_ref[_rows(i), :].astype(f32) for i in range(n_sub)]
    k = [k_ref[_rows(i), :].astype(f32) for i in range(n_sub)]
    a = [a_ref[_rows(i), :] for i in range(n_sub)]
    last_term = exp_nonpositive(a_last)[0] * state_term
    dk = []
    for i in range(n_sub):
        dq[i] = exp_nonpositive(a[i]) * dq[i]
        dk.append(exp_nonpositive(a_last - a[i]) * dk_state[i])
        last_term += jnp.sum(k[i] * dk[i], axis=0)
    t, s = _iotas()
    for i in range(n_sub):
        if i:
            edge, q_decay = _query_factor(a_ref, i)
            q_e = q[i] * q_decay
        for j in range(i):  # query sub-chunk i, earlier key sub-chunk j
            k_decay = _key_factor(a_ref, edge, j)
            dq[i] += q_decay * dot(dp[i, j], k[j] * k_decay, dtype)
            dk[j] += k_decay * dot(dp[i, j], q_e, dtype, trans_a=True)
        dp_diag = jnp.where(s <= t, dp[i, i], 0.0)
        if per_dim:
            for r in range(SUB):  # row r as the key (for dq) and as the query (for dk)
                q_r, k_r, a_r = (_row(ref, i * SUB + r) for ref in (q_ref, k_ref, a_ref))
                dp_column = jnp.sum(jnp.where(s == r, dp_diag, 0.0), axis=1)[:, None]  # dP[t, r], 0 for t < r
                dp_row = jnp.sum(jnp.where(t == r, dp_diag, 0.0), axis=0)[:, None]  # dP[r, s], 0 for s > r
                # One exp for both: A is non-increasing, so -|A_x - A_r| is A_t - A_r on the rows t >= r that dq
                # uses and A_r - A_s on the rows s <= r that dk uses (the exps are most of this loop's work).
                decay = jnp.exp(-jnp.abs(a[i] - a_r))
                dq[i] += dp_column * k_r * decay
                dk[i] += dp_row * q_r * decay
        else:
            weights = dp_diag * exp_nonpositive(a[i] - a[i].reshape(1, SUB))
            dq[i] += dot(weights, k[i], dtype)
            dk[i] += dot(weights, q[i], dtype, trans_a=True)
    for i in range(n_sub):
        da = q[i] * dq[i] - k[i] * dk[i]
        if i == n_sub - 1:
            da += jnp.where(t == SUB - 1, last_term[None, :], 0.0)
        dq_ref[_rows(i), :] = dq[i].astype(dq_ref.dtype)
        dk_ref[_rows(i), :] = dk[i].astype(dk_ref.dtype)
        da_ref[_rows(i), :] = da


def _dqk_kernel_sub(q_ref, k_ref, v_ref, a_ref, do_ref, h_ref, dh_ref, *refs, n_sub, n_vblocks, block_v, dtype,
                    **_):
    """_dqk_kernel for a per-dimension gate, one 16-row sub-chunk i per program (program axis 2 is
    key block * n_sub + i): dq, dk and dA [SUB, BK] of sub-chunk i. The same sums as _dqk_kernel, which keeps every
    sub-chunk's q, k, A, dq, dk and dP live in one program; here a program holds one sub-chunk's, and recomputes the
    [SUB, SUB] blocks of dP that its dq (earlier key sub-chunks) and dk (later query sub-chunks) need. What A_last
    does through the chunk's end state is left out of dA (added after, `_end_state_term`): in the last sub-chunk's
    program it took whole-chunk products under a branch, which made the kernel spill (ptxas: 964 bytes at d_k 32,
    none without it)."""
    dq_ref, dk_ref, da_ref = refs[-3:]
    f32 = jnp.float32
    i = pl.program_id(2) % n_sub
    start = pl.multiple_of(i * SUB, SUB)
    rows = pl.ds(start, SUB)
    q, k, a = q_ref[rows, :].astype(f32), k_ref[rows, :].astype(f32), a_ref[rows, :]
    a_last = _row(a_ref, n_sub * SUB - 1)
    zeros = jnp.zeros(q.shape, f32)
    blocks = [pl.ds(b * block_v, block_v) for b in range(n_vblocks)]

    def dp(query_rows, key_rows):
        """[SUB, SUB] dP[t, s] = do_t . v_s for t in query_rows, s in key_rows (summed over the d_v blocks)."""
        return sum(dot(do_ref[query_rows, cols], v_ref[key_rows, cols], dtype, trans_b=True) for cols in blocks)

    # Through the chunk-start state (dq) and the chunk-end state gradient (dk).
    dq = exp_nonpositive(a) * sum(dot(do_ref[rows, cols], h_ref[:, cols], dtype, trans_b=True) for cols in blocks)
    dk = exp_nonpositive(a_last - a) * sum(dot(v_ref[rows, cols], dh_ref[:, cols], dtype, trans_b=True)
                                           for cols in blocks)

    # Earlier key sub-chunks j < i (dq), split at E = A on the last row before sub-chunk i (`_query_factor`).
    edge = a_ref[pl.ds(jnp.maximum(start - 1, 0), 1), :]

    def earlier(j, acc):
        key_rows = pl.ds(pl.multiple_of(j * SUB, SUB), SUB)
        k_e = k_ref[key_rows, :].astype(f32) * exp_nonpositive(edge - a_ref[key_rows, :])
        return acc + dot(dp(rows, key_rows), k_e, dtype)

    dq += exp_nonpositive(a - edge) * jax.lax.fori_loop(0, i, earlier, zeros)

    # Later query sub-chunks m > i (dk), each split at its own E.
    def later(m, acc):
        query_start = pl.multiple_of(m * SUB, SUB)
        query_rows = pl.ds(query_start, SUB)
        query_edge = a_ref[pl.ds(query_start - 1, 1), :]
        q_e = q_ref[query_rows, :].astype(f32) * exp_nonpositive(a_ref[query_rows, :] - query_edge)
        return acc + exp_nonpositive(query_edge - a) * dot(dp(query_rows, rows), q_e, dtype, trans_a=True)

    dk += jax.lax.fori_loop(i + 1, n_sub, later, zeros)

    # The diagonal block, one row at a time (as _dqk_kernel).
    t, s = _iotas()
    dp_diag = jnp.where(s <= t, dp(rows, rows), 0.0)
    for r in range(SUB):
        row = pl.ds(start + r, 1)
        q_r, k_r, a_r = q_ref[row, :].astype(f32), k_ref[row, :].astype(f32), a_ref[row, :]
        decay = jnp.exp(-jnp.abs(a - a_r))  # A_t - A_r for t >= r (dq), A_r - A_s for s <= r (dk)
        dq += jnp.sum(jnp.where(s == r, dp_diag, 0.0), axis=1)[:, None] * k_r * decay
        dk += jnp.sum(jnp.where(t == r, dp_diag, 0.0), axis=0)[:, None] * q_r * decay

    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    da_ref[...] = q * dq - k * dk  # (without the end state's term: `_end_state_term`)


# ---------------------------------------------------------------------------------------------------------------
# Whole-chunk kernels for a scalar gate (SCALAR_GATE_FULL_WIDTH): the same quantities as the three kernels above,
# with P = (q k^T) * D for the chunk's [C, C] decay matrix D.


def _decay_matrix(a_ref):
    """[C, C] fp32 D[t, s] = exp(A_t - A_s) for s <= t, 0 above; a_ref [C, 1] (a scalar gate's cumulative sums)."""
    a = a_ref[...]
    c = a.shape[0]
    t, s = _iotas(c)
    return jnp.where(s <= t, exp_nonpositive(a - a.reshape(1, c)), 0.0)


def _output_kernel_scalar(q_ref, k_ref, v_ref, a_ref, h_ref, *refs, dtype, **_):
    """_output_kernel for a scalar gate, on the whole chunk (o only: its dv kernel recomputes P)."""
    o_ref = refs[-1]
    q = q_ref[...]
    scores = dot(q, k_ref[...], dtype, trans_b=True) * _decay_matrix(a_ref)
    out = dot(q.astype(jnp.float32) * exp_nonpositive(a_ref[...]), h_ref[...], dtype)
    o_ref[...] = (out + dot(scores, v_ref[...], dtype)).astype(o_ref.dtype)


def _dv_kernel_scalar(q_ref, k_ref, a_ref, do_ref, dh_ref, *refs, dtype, **_):
    """_dv_kernel for a scalar gate, on the whole chunk."""
    dv_ref = refs[-1]
    a = a_ref[...]
    scores = dot(q_ref[...], k_ref[...], dtype, trans_b=True) * _decay_matrix(a_ref)
    k_e = k_ref[...].astype(jnp.float32) * exp_nonpositive(_row(a_ref, a.shape[0] - 1) - a)
    dv = dot(k_e, dh_ref[...], dtype) + dot(scores, do_ref[...], dtype, trans_a=True)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dqk_kernel_scalar(q_ref, k_ref, v_ref, a_ref, do_ref, h_ref, dh_ref, *refs, n_vblocks, block_v, dtype, **_):
    """_dqk_kernel for a scalar gate, on the whole chunk: dq, dk [C, BK] and da [C, 1] (the gate's gradient summed
    over the block's key dimensions)."""
    dq_ref, dk_ref, da_ref = refs[-3:]
    f32 = jnp.float32
    c, width = q_ref.shape
    dq = jnp.zeros((c, width), f32)  # H do_t, then the in-chunk part
    dk_state = jnp.zeros((c, width), f32)  # dH v_s
    dp = jnp.zeros((c, c), f32)  # dP[t, s] = do_t . v_s
    state_term = jnp.zeros((width,), f32)
    for b in range(n_vblocks):
        cols = pl.ds(b * block_v, block_v)
        h, dh, do, v = h_ref[:, cols], dh_ref[:, cols], do_ref[:, cols], v_ref[:, cols]
        state_term += jnp.sum(h * dh, axis=1)
        dq += dot(do, h, dtype, trans_b=True)
        dk_state += dot(v, dh, dtype, trans_b=True)
        dp += dot(do, v, dtype, trans_b=True)
    a = a_ref[...]
    a_last = _row(a_ref, c - 1)
    q, k = q_ref[...].astype(f32), k_ref[...].astype(f32)
    dk = exp_nonpositive(a_last - a) * dk_state
    last_term = exp_nonpositive(a_last)[0] * state_term + jnp.sum(k * dk, axis=0)
    weights = dp * _decay_matrix(a_ref)
    dq = exp_nonpositive(a) * dq + dot(weights, k, dtype)
    dk += dot(weights, q, dtype, trans_a=True)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    # dA_t = q_t dq_t - k_t dk_t summed over the block's key dimensions (plus what A_last does through the end
    # state, at the last row); the gate's gradient is its reverse cumulative sum over the chunk.
    t, s = _iotas(c)
    d_cum = jnp.sum(q * dq - k * dk, axis=1, keepdims=True) + jnp.where(t == c - 1, jnp.sum(last_term), 0.0)
    da_ref[...] = jnp.sum(jnp.where(s >= t, d_cum.reshape(1, c), 0.0), axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------------------------
# Launching the kernels


class _Layout(NamedTuple):
    """Sizes of one problem: the caller's and the padded ones the kernels see."""
    batch: int
    seq_len: int
    heads: int
    d_k: int
    d_v: int
    per_dim: bool  # the gate has one log decay per key dimension (GLA), not one per head (Mamba-2)
    shared_qk: bool  # q and k have one head that every head of v reads (Mamba-2's B and C): [B, T_pad, 1, DK]
    chunk: int
    t_pad: int  # whole chunks
    dk_pad: int  # powers of 2 >= 16
    dv_pad: int
    dtype: type  # matrix-product operands: bfloat16 where q, k and v all are, else float32

    @property
    def sequences(self):
        return self.batch * self.heads

    @property
    def n_chunks(self):
        return self.t_pad // self.chunk

    @property
    def gate_width(self):  # columns of the (padded) gate arrays
        return self.dk_pad if self.per_dim else 1

    @property
    def block_k(self):
        return min(self.dk_pad, MAX_BLOCK)

    @property
    def block_v(self):
        return min(self.dv_pad, MAX_BLOCK)

    @property
    def state_blocks(self):
        return state_tiles(self.sequences, self.dk_pad, self.dv_pad)


def state_tiles(sequences: int, dk_pad: int, dv_pad: int) -> tuple[int, int]:
    """(d_k block, d_v block) of the sequential kernels for `sequences` sequences of padded widths dk_pad, dv_pad:
    the other kernels' (up to MAX_BLOCK), narrowed, the wider of the two first, until they give
    MIN_STATE_PROGRAMS programs or both are SUB wide."""
    bk, bv = min(dk_pad, MAX_BLOCK), min(dv_pad, MAX_BLOCK)
    while sequences * (dk_pad // bk) * (dv_pad // bv) < MIN_STATE_PROGRAMS and max(bk, bv) > SUB:
        if bv >= bk:
            bv //= 2
        else:
            bk //= 2
    return bk, bv


def _layout(q, k, v, log_decay, chunk):
    batch, seq_len, heads, d_v = v.shape
    d_k = q.shape[-1]
    return _Layout(batch, seq_len, heads, d_k, d_v, log_decay.shape[-1] != 1, q.shape[2] != heads, chunk,
                   -(-seq_len // chunk) * chunk, padded_width(d_k), padded_width(d_v), operand_dtype(q, k, v))


# The kernels read and write the caller's [B, T, H, D] layout directly: a program's block is [rows, width] of one
# (batch, head) with the head a squeezed block dimension, so no transposes to and from a [B H, T, D] layout are
# made around the kernels (eight [B, T, H, D] arrays per layer and step). Arrays are padded only where T is not
# whole chunks or D not a power of 2 >= 16. Not yet timed against the [B H, T, D] layout.


class _Inputs(NamedTuple):
    q: jax.Array  # [B, T_pad, H, DK] in lay.dtype ([B, T_pad, 1, DK] with shared_qk)
    k: jax.Array  # [B, T_pad, H, DK] ([B, T_pad, 1, DK])
    v: jax.Array  # [B, T_pad, H, DV]
    a: jax.Array  # [B, T_pad, H, DK or 1] fp32: the log decay summed from each chunk's start (inclusive)


def _padded(x, lay: _Layout, width, dtype):
    """[B, T, H', D] -> [B, T_pad, H', width] in `dtype`, zero-padded (padding tokens write nothing)."""
    return pad_axis(pad_axis(x.astype(dtype), 1, lay.t_pad, 0), 3, width, 0)


def _unpadded(x, lay: _Layout, width):
    """[B, T_pad, H', >= width] -> [B, T, H', width]."""
    return x[:, :lay.seq_len, :, :width]


def _inputs(q, k, v, log_decay, lay: _Layout) -> _Inputs:
    a = _padded(log_decay, lay, lay.gate_width, jnp.float32)
    chunks = (lay.batch, lay.n_chunks, lay.chunk, *a.shape[2:])
    a = jnp.cumsum(a.reshape(chunks), axis=2).reshape(a.shape)
    return _Inputs(_padded(q, lay, lay.dk_pad, lay.dtype), _padded(k, lay, lay.dk_pad, lay.dtype),
                   _padded(v, lay, lay.dv_pad, lay.dtype), a)


def _seq_spec(lay: _Layout, rows, width, block_index, shared=False):
    """BlockSpec of a [rows, width] block of sequence s = b * H + h in a [B, T_pad, H, D] array (with `shared`,
    q or k of shared_qk: [B, T_pad, 1, D]). block_index(s, *program ids) -> (row block, column block)."""
    def index_map(s, *ids):
        row, col = block_index(s, *ids)
        return s // lay.heads, row, 0 if shared and lay.shared_qk else s % lay.heads, col
    return pl.BlockSpec((None, rows, None, width), index_map)


def _gate_spec(lay: _Layout, rows, dk_block, block_index):
    """BlockSpec of the gate: [rows, d_k block] per key dimension, or the one column of a scalar gate.
    block_index(*program ids) -> (row block, d_k block); the first program id is the sequence."""
    if lay.per_dim:
        return _seq_spec(lay, rows, dk_block, block_index)
    return _seq_spec(lay, rows, 1, lambda s, *ids: (block_index(s, *ids)[0], 0))


def _chunk_states(x: _Inputs, h0, lay: _Layout, cfg: ChunkConfig):
    """Chunk-start states [G, N, DK, DV] and the final state [G, DK, DV], fp32."""
    (bk, bv), g, t_pad, n = lay.state_blocks, lay.sequences, lay.t_pad, lay.n_chunks
    in_specs = [_seq_spec(lay, t_pad, bk, lambda s, i, j: (0, i), shared=True),
                _seq_spec(lay, t_pad, bv, lambda s, i, j: (0, j)),
                _gate_spec(lay, t_pad, bk, lambda s, i, j: (0, i)),
                pl.BlockSpec((None, bk, bv), lambda s, i, j: (s, i, j))]
    out_specs = [pl.BlockSpec((None, n, bk, bv), lambda s, i, j: (s, 0, i, j)),
                 pl.BlockSpec((None, bk, bv), lambda s, i, j: (s, i, j))]
    out_shape = [jax.ShapeDtypeStruct((g, n, lay.dk_pad, lay.dv_pad), jnp.float32),
                 jax.ShapeDtypeStruct((g, lay.dk_pad, lay.dv_pad), jnp.float32)]
    kernel = functools.partial(_state_kernel, chunk=lay.chunk, n_chunks=n, dtype=lay.dtype)
    return call(kernel, cfg, "gla_chunk_states", (g, lay.dk_pad // bk, lay.dv_pad // bv), [x.k, x.v, x.a, h0],
                 in_specs, out_specs, out_shape)


def _whole_chunk(lay: _Layout) -> bool:
    """Whether the output, dv and dq/dk kernels take whole chunks: a scalar gate (SCALAR_GATE_FULL_WIDTH)."""
    return SCALAR_GATE_FULL_WIDTH and not lay.per_dim


def _sub_chunk_split(lay: _Layout, name: str) -> int:
    """Programs per chunk (and d_v or d_k block) of kernel `name`: its sub-chunks where SUB_CHUNK_PROGRAMS names
    it (per-dimension gates, d_k >= SUB_CHUNK_MIN_DK), else 1."""
    unknown = sorted(set(SUB_CHUNK_PROGRAMS) - {"gla_chunk_outputs", "gla_chunk_dv", "gla_chunk_dqk"})
    if unknown:
        raise ValueError(f"SUB_CHUNK_PROGRAMS: unknown kernel {unknown[0]!r}; known: 'gla_chunk_outputs', "
                         "'gla_chunk_dv', 'gla_chunk_dqk'")
    sub = lay.per_dim and name in SUB_CHUNK_PROGRAMS and lay.d_k >= SUB_CHUNK_MIN_DK
    return lay.chunk // SUB if sub else 1


def _chunk_outputs(x: _Inputs, h_start, out_dtype, lay: _Layout, cfg: ChunkConfig):
    """o [B, T_pad, H, DV] in out_dtype."""
    g, c, bv, dk = lay.sequences, lay.chunk, lay.block_v, lay.dk_pad
    n_sub, split = c // SUB, _sub_chunk_split(lay, "gla_chunk_outputs")  # program axis 2: d_v block * split + i
    in_specs = [_seq_spec(lay, c, dk, lambda s, n, p: (n, 0), shared=True),
                _seq_spec(lay, c, dk, lambda s, n, p: (n, 0), shared=True),
                _seq_spec(lay, c, bv, lambda s, n, p: (n, p // split)),
                _gate_spec(lay, c, dk, lambda s, n, p: (n, 0)),
                pl.BlockSpec((None, None, dk, bv), lambda s, n, p: (s, n, 0, p // split))]
    rows = c // split  # of one program's outputs, at row block n * split + i
    out_specs = [_seq_spec(lay, rows, bv, lambda s, n, p: (n * split + p % split, p // split))]
    out_shape = [jax.ShapeDtypeStruct((lay.batch, lay.t_pad, lay.heads, lay.dv_pad), out_dtype)]
    whole_chunk = _whole_chunk(lay)
    if not whole_chunk:  # P's diagonal blocks, for the dv kernel
        out_specs.append(_seq_spec(lay, rows, SUB, lambda s, n, p: (n * split + p % split, 0)))
        out_shape.append(jax.ShapeDtypeStruct((lay.batch, lay.t_pad, lay.heads, SUB), jnp.float32))
    kernel = (_output_kernel_scalar if whole_chunk else _output_kernel_sub if split > 1 else _output_kernel)
    kernel = functools.partial(kernel, n_sub=n_sub, per_dim=lay.per_dim, dtype=lay.dtype)
    o, *p_diag = call(kernel, cfg, "gla_chunk_outputs", (g, lay.n_chunks, lay.dv_pad // bv * split),
                      [x.q, x.k, x.v, x.a, h_start], in_specs, out_specs, out_shape)
    return o, (p_diag[0] if p_diag else None)


def _state_grads(x: _Inputs, do, dfinal, lay: _Layout, cfg: ChunkConfig):
    """Gradients of the chunk-end states [G, N, DK, DV] and of the initial state [G, DK, DV], fp32."""
    (bk, bv), g, t_pad, n = lay.state_blocks, lay.sequences, lay.t_pad, lay.n_chunks
    in_specs = [_seq_spec(lay, t_pad, bk, lambda s, i, j: (0, i), shared=True),
                _seq_spec(lay, t_pad, bv, lambda s, i, j: (0, j)),
                _gate_spec(lay, t_pad, bk, lambda s, i, j: (0, i)),
                pl.BlockSpec((None, bk, bv), lambda s, i, j: (s, i, j))]
    out_specs = [pl.BlockSpec((None, n, bk, bv), lambda s, i, j: (s, 0, i, j)),
                 pl.BlockSpec((None, bk, bv), lambda s, i, j: (s, i, j))]
    out_shape = [jax.ShapeDtypeStruct((g, n, lay.dk_pad, lay.dv_pad), jnp.float32),
                 jax.ShapeDtypeStruct((g, lay.dk_pad, lay.dv_pad), jnp.float32)]
    kernel = functools.partial(_state_grad_kernel, chunk=lay.chunk, n_chunks=n, dtype=lay.dtype)
    return call(kernel, cfg, "gla_chunk_state_grads", (g, lay.dk_pad // bk, lay.dv_pad // bv),
                 [x.q, do, x.a, dfinal], in_specs, out_specs, out_shape)


def _value_grads(x: _Inputs, do, dh_end, p_diag, out_dtype, lay: _Layout, cfg: ChunkConfig):
    """dv [B, T_pad, H, DV] in out_dtype. p_diag: P's diagonal blocks [B, T_pad, H, SUB] from the forward pass (the
    sub-chunk kernels), or None (the whole-chunk kernel recomputes P)."""
    g, c, bv, dk = lay.sequences, lay.chunk, lay.block_v, lay.dk_pad
    n_sub, split = c // SUB, _sub_chunk_split(lay, "gla_chunk_dv")  # program axis 2: d_v block * split + j
    rows = c // split  # of one program's outputs (and P's diagonal blocks), at row block n * split + j
    in_specs = [_seq_spec(lay, c, dk, lambda s, n, p: (n, 0), shared=True),
                _seq_spec(lay, c, dk, lambda s, n, p: (n, 0), shared=True),
                _gate_spec(lay, c, dk, lambda s, n, p: (n, 0)),
                _seq_spec(lay, c, bv, lambda s, n, p: (n, p // split)),
                pl.BlockSpec((None, None, dk, bv), lambda s, n, p: (s, n, 0, p // split))]
    inputs = [x.q, x.k, x.a, do, dh_end]
    if p_diag is not None:
        in_specs.append(_seq_spec(lay, rows, SUB, lambda s, n, p: (n * split + p % split, 0)))
        inputs.append(p_diag)
    out_specs = [_seq_spec(lay, rows, bv, lambda s, n, p: (n * split + p % split, p // split))]
    out_shape = [jax.ShapeDtypeStruct((lay.batch, lay.t_pad, lay.heads, lay.dv_pad), out_dtype)]
    kernel = _dv_kernel_scalar if _whole_chunk(lay) else _dv_kernel_sub if split > 1 else _dv_kernel
    kernel = functools.partial(kernel, n_sub=n_sub, dtype=lay.dtype)
    (dv,) = call(kernel, cfg, "gla_chunk_dv", (g, lay.n_chunks, lay.dv_pad // bv * split), inputs, in_specs,
                 out_specs, out_shape)
    return dv


def _query_key_grads(x: _Inputs, do, h_start, dh_end, q_dtype, k_dtype, lay: _Layout, cfg: ChunkConfig):
    """dq, dk [B, T_pad, H, DK] in q's and k's dtypes (per head, fp32, with shared_qk), and fp32: dA
    [B, T_pad, H, DK], the gradient of the in-chunk cumulative log decay (the sub-chunk kernel), or for a scalar
    gate through the whole-chunk kernel da [B, T_pad, H, d_k blocks], the gradient of the log decay itself summed
    over each block's key dimensions."""
    g, c, bk, dv = lay.sequences, lay.chunk, lay.block_k, lay.dv_pad
    n_kblocks, n_sub = lay.dk_pad // bk, c // SUB
    whole_chunk = _whole_chunk(lay)
    split = _sub_chunk_split(lay, "gla_chunk_dqk")  # program axis 2: key block * split + sub-chunk
    chunk_qk = _seq_spec(lay, c, bk, lambda s, n, p: (n, p // split), shared=True)
    chunk_v = _seq_spec(lay, c, dv, lambda s, n, p: (n, 0))
    state = pl.BlockSpec((None, None, bk, dv), lambda s, n, p: (s, n, p // split, 0))
    in_specs = [chunk_qk, chunk_qk, chunk_v, _gate_spec(lay, c, bk, lambda s, n, p: (n, p // split)), chunk_v, state,
                state]
    grad = _seq_spec(lay, c // split, bk, lambda s, n, p: (n * split + p % split, p // split))
    gate_grad = _seq_spec(lay, c, 1, lambda s, n, i: (n, i)) if whole_chunk else grad
    out_specs = [grad, grad, gate_grad]
    if lay.shared_qk:  # per-head gradients in fp32: their sum over the heads rounds once, to q's / k's dtype
        q_dtype = k_dtype = jnp.float32
    rows = (lay.batch, lay.t_pad, lay.heads)
    out_shape = [jax.ShapeDtypeStruct((*rows, lay.dk_pad), dtype) for dtype in (q_dtype, k_dtype)]
    out_shape.append(jax.ShapeDtypeStruct((*rows, n_kblocks if whole_chunk else lay.dk_pad), jnp.float32))
    kernel = _dqk_kernel_scalar if whole_chunk else _dqk_kernel_sub if split > 1 else _dqk_kernel
    kernel = functools.partial(kernel, n_sub=n_sub, n_vblocks=dv // lay.block_v, block_v=lay.block_v,
                               per_dim=lay.per_dim, dtype=lay.dtype)
    return call(kernel, cfg, "gla_chunk_dqk", (g, lay.n_chunks, n_kblocks * split),
                 [x.q, x.k, x.v, x.a, do, h_start, dh_end], in_specs, out_specs, out_shape)


# ---------------------------------------------------------------------------------------------------------------
# The custom VJP


def _forward(q, k, v, log_decay, initial_state, cfg: ChunkConfig):
    """((o, final state), P's diagonal blocks or None)."""
    lay = _layout(q, k, v, log_decay, cfg.chunk_size)
    x = _inputs(q, k, v, log_decay, lay)
    h_start, final = _chunk_states(x, state_rows(initial_state, lay), lay, cfg)
    o, p_diag = _chunk_outputs(x, h_start, v.dtype, lay, cfg)
    return (_unpadded(o, lay, lay.d_v), final[:, :lay.d_k, :lay.d_v].reshape(initial_state.shape)), p_diag


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _chunk_gla(q, k, v, log_decay, initial_state, cfg: ChunkConfig):
    return _forward(q, k, v, log_decay, initial_state, cfg)[0]


def _chunk_gla_fwd(q, k, v, log_decay, initial_state, cfg: ChunkConfig):
    # Saved: the inputs, and with the sub-chunk kernels P's diagonal blocks ([T, SUB] fp32 per sequence, whose
    # per-row exps are most of the dv kernel's work otherwise). The backward pass recomputes the gate sums and the
    # chunk states (one cheap kernel) rather than keeping [G, N, DK, DV] states alive.
    out, p_diag = _forward(q, k, v, log_decay, initial_state, cfg)
    return out, (q, k, v, log_decay, initial_state, p_diag)


def _chunk_gla_bwd(cfg: ChunkConfig, saved, cotangents):
    q, k, v, log_decay, initial_state, p_diag = saved
    d_out, d_final = cotangents
    lay = _layout(q, k, v, log_decay, cfg.chunk_size)
    x = _inputs(q, k, v, log_decay, lay)
    h_start, final = _chunk_states(x, state_rows(initial_state, lay), lay, cfg)
    do = _padded(d_out, lay, lay.dv_pad, lay.dtype)
    dh_end, d_initial = _state_grads(x, do, state_rows(d_final, lay), lay, cfg)
    dv = _value_grads(x, do, dh_end, p_diag, v.dtype, lay, cfg)
    dq, dk, da = _query_key_grads(x, do, h_start, dh_end, q.dtype, k.dtype, lay, cfg)
    if not _whole_chunk(lay):
        # The sub-chunk kernel returns dA, the gradient of the in-chunk cumulative sum A; a's is its reverse
        # cumulative sum over the chunk. (The whole-chunk kernel takes that sum itself: in XLA, on Mamba-2's
        # [G, T, d_k] fp32 dA, it cost 9.3 ms of a 57 ms step at 4096 x 8 on an H200. For GLA, in the kernel's
        # 16-row form it made no difference to the step and tripled the compile time.)
        chunks = (lay.batch, lay.n_chunks, lay.chunk, lay.heads, lay.dk_pad)
        da = jax.lax.cumsum(da.reshape(chunks), axis=2, reverse=True)
        if _sub_chunk_split(lay, "gla_chunk_dqk") > 1:  # A_last reaches every row of the reverse sum
            da = da + _end_state_term(h_start, final, dh_end, lay)
        da = da.reshape(lay.batch, lay.t_pad, lay.heads, lay.dk_pad)
    if not lay.per_dim:  # one gate for all key dimensions: the sum of their gradients
        da = jnp.sum(da, axis=-1, keepdims=True)
    d_initial = d_initial[:, :lay.d_k, :lay.d_v].reshape(initial_state.shape).astype(initial_state.dtype)
    dq, dk = (_qk_grad(x, lay, like) for x, like in ((dq, q), (dk, k)))
    return (dq, dk, _unpadded(dv, lay, lay.d_v), _unpadded(da, lay, log_decay.shape[-1]).astype(log_decay.dtype),
            d_initial)


def _end_state_term(h_start, final, dh_end, lay: _Layout):
    """[B, N, 1, H, DK]: what each chunk's A_last does through its end state, sum_v H_end * dH_end (H_end = exp(A_last)
    H + (K exp(A_last - A))^T V, the next chunk's start state or the final state, so the kernel's sum
    exp(A_last) sum_v H dH + sum_s k_s exp(A_last - A_s) (dH v_s) is this one product)."""
    h_end = jnp.concatenate([h_start[:, 1:], final[:, None]], axis=1)  # [G, N, DK, DV]
    term = jnp.sum(h_end * dh_end, axis=-1)  # [G, N, DK]
    return jnp.moveaxis(term.reshape(lay.batch, lay.heads, lay.n_chunks, 1, lay.dk_pad), 1, 3)


def _qk_grad(grad, lay: _Layout, like):
    """A per-head gradient of q or k as `like`'s shape: summed over the heads that share it (shared_qk)."""
    grad = _unpadded(grad, lay, lay.d_k)
    if lay.shared_qk:
        grad = jnp.sum(grad.astype(jnp.float32), axis=2, keepdims=True)
    return grad.astype(like.dtype)


_chunk_gla.defvjp(_chunk_gla_fwd, _chunk_gla_bwd)


def _check_arguments(q, k, v, log_decay, initial_state, chunk_size):
    if q.ndim != 4:
        raise ValueError(f"q: expected [B, T, H, d_k] or [B, T, 1, d_k], got shape {q.shape}")
    if k.shape != q.shape:
        raise ValueError(f"k: expected the shape of q {q.shape}, got {k.shape}")
    if v.ndim != 4 or v.shape[:2] != q.shape[:2] or q.shape[2] not in (1, v.shape[2]):
        raise ValueError(f"v: expected [B, T, H, d_v] with B, T = {q.shape[:2]} and H = {q.shape[2]} (q's heads) or "
                         f"any H when q has one head, got shape {v.shape}")
    batch, seq_len, heads, d_k = (*v.shape[:3], q.shape[3])
    if log_decay.shape not in ((batch, seq_len, heads, d_k), (batch, seq_len, heads, 1)):
        raise ValueError(f"log_decay: expected [B, T, H, d_k] {(batch, seq_len, heads, d_k)} or [B, T, H, 1] "
                         f"{(batch, seq_len, heads, 1)}, got shape {log_decay.shape}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"{name}: expected float32 or bfloat16, got {x.dtype}")
    if not jnp.issubdtype(log_decay.dtype, jnp.floating):
        raise ValueError(f"log_decay: expected a floating dtype, got {log_decay.dtype}")
    want_state = (batch, heads, d_k, v.shape[-1])
    if initial_state is not None and initial_state.shape != want_state:
        raise ValueError(f"initial_state: expected [B, H, d_k, d_v] {want_state}, got shape {initial_state.shape}")
    if chunk_size < SUB or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size: expected a power of 2 >= {SUB}, got {chunk_size}")
    if seq_len == 0:
        raise ValueError("q: the sequence (axis 1) is empty")
    if not isinstance(log_decay, jax.core.Tracer) and np.any(np.asarray(log_decay, np.float32) > 0):
        raise ValueError("log_decay: must be <= 0 (a decay exp(log_decay) <= 1); got positive entries")


def chunk_gla(q, k, v, log_decay, initial_state=None, *, chunk_size: int = 64, interpret: bool = False,
              poison_output: bool = False, num_warps: int | None = None):
    """Gated linear attention, S_t = diag(exp(a_t)) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, in chunks.

    Args:
      q, k: `[B, T, H, d_k]`, or `[B, T, 1, d_k]`: one q and k that every head reads (Mamba-2's C and B; no copy
        per head is made, and their gradients are summed over the heads); v: `[B, T, H, d_v]`; float32 or bfloat16
        (matrix products take bf16 operands with fp32 accumulation where q, k and v all are bf16).
      log_decay: a_t <= 0, `[B, T, H, d_k]` (a decay per key dimension, GLA) or `[B, T, H, 1]` (one per head,
        Mamba-2). Computed in float32.
      initial_state: S_0, `[B, H, d_k, d_v]`, or None for zeros.
      chunk_size: C, tokens per chunk, a power of 2 >= 16 (T is padded to whole chunks with tokens that write
        nothing). num_warps: Triton warps per program (GPU); None: 4 with bf16 operands, 8 with fp32 ones
        (chunk_common.DEFAULT_WARPS).
      interpret: run the kernels in interpret mode (any device, the CPU included).
      poison_output: start the kernels' output buffers as NaN (tests: an element a kernel fails to write shows).

    Returns:
      o `[B, T, H, d_v]` in v's dtype and the final state `[B, H, d_k, d_v]` float32. Differentiable in q, k, v,
      log_decay and initial_state (the backward pass is Pallas kernels too).
    """
    _check_arguments(q, k, v, log_decay, initial_state, chunk_size)
    if initial_state is None:
        initial_state = jnp.zeros((v.shape[0], v.shape[2], q.shape[3], v.shape[3]), jnp.float32)
    cfg = ChunkConfig(int(chunk_size), default_num_warps(num_warps, q, k, v), bool(interpret),
                      bool(poison_output))
    return _chunk_gla(q, k, v, log_decay, initial_state, cfg)
