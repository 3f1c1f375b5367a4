"""The chunked gated delta rule (Gated DeltaNet) as Pallas kernels (Triton lowering), with a custom VJP whose
backward pass is Pallas kernels too.

Per batch b and head h, with a_t <= 0 a scalar log decay and beta_t in [0, 1]:

    S_t = exp(a_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T q_t,    S_0 = initial_state (or 0)

In chunks of C tokens (the design of fla's chunk_gated_delta_rule, written anew), with g_t = a_1 + ... + a_t the log
decay from the chunk's start (g <= 0, non-increasing), Gamma = diag(exp(g)), D[i, j] = exp(g_i - g_j) for j <= i
(0 above the diagonal) and S the state at the chunk's start, the WY / UT representation of the chunk is

    L = strict_lower(D * K K^T),   T = (I + diag(beta) L)^-1 diag(beta),   W = T Gamma K,   U = T V,

and then

    V' = U - W S                                  (the values each token actually writes, "v_new")
    O  = Gamma Q S + (D * Q K^T) V'
    S_next = exp(g_C) S + (exp(g_C - g) K)^T V'

Kernels (G = B * H sequences; d_k, d_v padded to powers of 2 >= 16, T to whole chunks with tokens that write
nothing: k = v = 0, beta = 0, a = 0):
  _wy_kernel          grid (G, chunks): T by block doubling in fp32 (INVERSE_PRECISION), then W and U;
  _state_kernel       grid (G, d_v blocks): walks the chunks (all of d_k in one program: W S sums over it), storing
                      each chunk's start state, V' and the final state;
  _output_kernel      grid (G, chunks, d_v blocks): O per chunk;
  _state_grad_kernel  grid (G, d_v blocks): the adjoint walks the chunks backwards, storing each chunk's end-state
                      gradient dH, the gradient of V' (dV' = (D * Q K^T)^T dO + exp(g_C - g) K dH) and the initial
                      state's gradient: dS = exp(g_C) dH + (Gamma Q)^T dO - W^T dV';
  _grad_kernel        grid (G, chunks): dq, dk, dv, dbeta and dg (the gradient of the cumulative log decay) of one
                      chunk, recomputing T and W; through the inverse, dM = -M^-T dM^-1 M^-T.

Numerics: no positive number is ever exponentiated (every decay ratio is exp of a difference <= 0, masked; the
minimum with 0 guards against rounding). The inverse (I + diag(beta) L)^-1 and its gradient are computed with fp32
products (IEEE, or TF32 x 3: INVERSE_PRECISION) whatever the inputs' dtype (block doubling as ramjax.ops.gated_delta's
chunked form does it: every intermediate is the inverse of a block-diagonal part, moderate for unit-norm keys and
beta in [0, 1]). Other matrix products take operands in the inputs' dtype (bf16 or fp32) with fp32 accumulation;
decays, sums and states are fp32. Where a decay ratio is exp(g_i - g_i) = 1 (the diagonal of D, the chunk's last
key decayed to the chunk's end), its gradient with respect to g is left out rather than formed as two opposite
terms that would cancel only up to rounding.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kernels.chunk_common import (ChunkConfig, call, default_num_warps, dot, exp_nonpositive, from_rows,
                                  operand_dtype, padded_width, state_rows, to_rows)

MIN_CHUNK = 16  # the smallest block Triton's dot takes
MAX_BLOCK = 64  # d_v block width where a kernel tiles it
# The kernels that walk the chunks one after another (states, state gradients) have one program per (sequence, d_v
# block): with few sequences most of a GPU idles while each program takes T / C steps. Their d_v blocks narrow
# (down to 16) until there are at least this many programs, about two per SM of an H200; as in
# kernels/gla_chunk.py (timed there: the LM step at 16384 x 2 is 1.08x faster than with full-width blocks).
MIN_STATE_PROGRAMS = 256
# The backward pass's per-chunk gradients in two kernels (True: _grad_kernel_outputs for the O = Gamma Q S +
# (D * Q K^T) V' and S_next side, _grad_kernel_wy for the V' = U - W S side, their dk and dg summed after) or one
# (False: _grad_kernel). The one kernel holds about fifteen [C, C] / [C, d] fp32 tiles at once (~60k values at
# chunk 64, d 64), likely spilling; it is half of the op's time in the LM step (14.5 of 30.6 ms at 4096 x 8,
# experiments/results/profile_train_step_gpu.md). Timed on an H200 at 16384 x 2: 85.2 ms against 86.0, within the
# run-to-run spread (experiments/results/bench_models.md, 2026-12-03 19:44): off.
GRAD_KERNEL_SPLIT = False
# What the custom VJP keeps for the backward pass: the inputs only (False: the backward pass reruns the WY and
# chunk-state kernels, 5.3 of the op's 30.6 ms at 4096 x 8 in the LM step, profile_train_step_gpu.md), or also W,
# the chunk-start states and V' (True: no rerun, for [T, d_k] + [N, d_k, d_v] fp32 + [T, d_v] more memory per
# layer). Timed on an H200 at 4096 x 8 (experiments/results/bench_models.md, 2026-12-02 23:07): the step 63.4 ms
# against 65.2, the peak 11.4 GB against 8.49 (1.94x the transformer's against 1.44x): off.
SAVE_FORWARD = False
# The matrix products of the chunk inverse (I + diag(beta) L)^-1 and of its gradient (14 [C, C] products per chunk
# in the backward kernel, 12 in the WY kernel): "ieee", full fp32 products on the CUDA cores, or "tf32x3", each
# product as three TF32 tensor-core products (the operands split into a high and a low TF32 part; about fp32's
# accuracy, where one TF32 product would lose the inverse). With bf16 operands the kernels' other products are on
# the tensor cores already, so these fp32 ones are likely a large part of the WY and backward kernels' time.
# Interpret mode computes them in IEEE fp32 whatever this says (CPUs have no TF32). Timed on an H200 at chunk 32:
# the LM step 2-3% faster (63.1 ms against 65.0 at 4096 x 8, 84.4 against 86.0 at 16384 x 2) (experiments/results/bench_models.md, 2026-12-03 19:44);
# again 65.1 -> 62.9 and 85.9 -> 84.1 ms on 2026-12-03 22:50, when its GPU accuracy test
# (test_tf32x3_inverse_matches_float64_recurrence_on_a_gpu: chunk 64, aligned keys, fp32 tolerance against the
# float64 recurrence) passed on the H200: the default since then.
INVERSE_PRECISION = "tf32x3"
INVERSE_PRECISIONS = ("ieee", "tf32x3")
# Without SAVE_FORWARD the backward pass reruns the WY kernel, which forms each chunk's inverse, and then the
# gradients kernel forms it again. True: the rerun WY kernel also writes the inverse ([G, T_pad, C] fp32, alive only
# within the backward pass: 34 MB per layer at 4096 x 8 with 8 heads and C 32) and the gradients kernel reads it,
# dropping the inverse's 10-12 fp32 products and their registers from the op's largest kernel. Timed on an H200
# at 4096 x 8: 65.8 ms against 65.0 (experiments/results/bench_models.md, 2026-12-03 19:44): off.
REUSE_INVERSE = False


# ---------------------------------------------------------------------------------------------------------------
# Pieces the kernels share


def _iotas(c):
    """[c, 1] row and [1, c] column indices of a [c, c] block."""
    return jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0), jax.lax.broadcasted_iota(jnp.int32, (1, c), 1)


def _column_to_row(x):
    """[c, 1] -> [1, c]."""
    return x.reshape(1, x.shape[0])


def _row_to_column(x):
    """[1, c] or [c] -> [c, 1]."""
    return x.reshape(-1)[:, None]


def _row_minus_column_sums(e):
    """sum_j e[i, j] - sum_j e[j, i] as [c, 1]: the g-gradient of a matrix of exp(g_i - g_j) factors."""
    return jnp.sum(e, axis=1)[:, None] - _row_to_column(jnp.sum(e, axis=0))


def _decay_matrix(g):
    """[c, c] D[i, j] = exp(g_i - g_j) for j <= i, 0 above the diagonal; g [c, 1] cumulative log decays."""
    t, s = _iotas(g.shape[0])
    return jnp.where(s <= t, exp_nonpositive(g - _column_to_row(g)), 0.0)


def _inverse_precision(cfg: ChunkConfig):
    """The `precision` of the inverse's products under INVERSE_PRECISION (IEEE fp32 in interpret mode)."""
    if INVERSE_PRECISION not in INVERSE_PRECISIONS:
        raise ValueError(f"kernels.gated_delta_chunk.INVERSE_PRECISION: {INVERSE_PRECISION!r} is not one of "
                         f"{INVERSE_PRECISIONS}")
    if INVERSE_PRECISION == "ieee" or cfg.interpret:
        return jax.lax.Precision.HIGHEST
    return jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def _unit_lower_inverse(a, precision):
    """(I + a)^-1 for a strictly lower-triangular [c, c] fp32 a, by block doubling in fp32 products at `precision`.

    X starts as I (the inverse of the unit diagonal); each round merges pairs of diagonal blocks of width w into
    blocks of width 2w: with E the entries of a linking the two halves of each 2w block, the merged inverse is
    X - X E X (exact: E X E = 0)."""
    c = a.shape[0]
    t, s = _iotas(c)
    x = jnp.where(t == s, 1.0, 0.0).astype(jnp.float32)
    width = 1
    while width < c:
        link = ((t // (2 * width)) == (s // (2 * width))) & ((t // width) % 2 == 1) & ((s // width) % 2 == 0)
        step = dot(x, jnp.where(link, a, 0.0), jnp.float32, precision=precision)
        x = x - dot(step, x, jnp.float32, precision=precision)
        width *= 2
    return x


def _wy(k, g, beta, dtype, precision, inverse=None):
    """The chunk's (I + diag(beta) L)^-1 [C, C] fp32 (formed here, or the given `inverse`), L = strict_lower(D * K
    K^T) [C, C] and D [C, C]. k [C, DK] fp32, g and beta [C, 1] fp32."""
    t, s = _iotas(k.shape[0])
    d = _decay_matrix(g)
    lower = jnp.where(s < t, d * dot(k, k, dtype, trans_b=True), 0.0)
    if inverse is None:
        inverse = _unit_lower_inverse(beta * lower, precision)
    return inverse, lower, d


# ---------------------------------------------------------------------------------------------------------------
# Forward kernels


def _wy_kernel(k_ref, v_ref, g_ref, beta_ref, *refs, dtype, precision, with_inverse=False):
    """W [C, DK] and U [C, DV] of one chunk (and with_inverse: the inverse [C, C] fp32 too): k_ref [C, DK], v_ref
    [C, DV], g_ref, beta_ref [C, 1]."""
    # (with poison_output, the aliased NaN buffers come first)
    w_ref, u_ref, inverse_ref = refs[-3:] if with_inverse else (*refs[-2:], None)
    k, g, beta = k_ref[...].astype(jnp.float32), g_ref[...], beta_ref[...]
    inverse, _, _ = _wy(k, g, beta, dtype, precision)
    if with_inverse:
        inverse_ref[...] = inverse
    t_mat = inverse * _column_to_row(beta)  # T = (I + diag(beta) L)^-1 diag(beta)
    w_ref[...] = dot(t_mat, k * exp_nonpositive(g), dtype).astype(w_ref.dtype)
    u_ref[...] = dot(t_mat, v_ref[...], dtype).astype(u_ref.dtype)


def _state_kernel(k_ref, w_ref, u_ref, g_ref, h0_ref, *refs, chunk, n_chunks, dtype):
    """Chunk-start states h_ref [N, DK, BV], V' [T_pad, BV] and the final state [DK, BV] of one (sequence, d_v
    block): k_ref, w_ref [T_pad, DK], u_ref [T_pad, BV], g_ref [T_pad, 1], h0 [DK, BV]."""
    h_ref, vn_ref, final_ref = refs[-3:]

    def body(n, h):
        h_ref[n] = h
        span = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
        g, g_last = g_ref[span, :], g_ref[n * chunk + chunk - 1, :]
        vn = u_ref[span, :].astype(jnp.float32) - dot(w_ref[span, :], h, dtype)
        vn_ref[span, :] = vn.astype(vn_ref.dtype)
        k_e = k_ref[span, :].astype(jnp.float32) * exp_nonpositive(g_last[None, :] - g)
        return exp_nonpositive(g_last)[:, None] * h + dot(k_e, vn, dtype, trans_a=True)

    final_ref[...] = jax.lax.fori_loop(0, n_chunks, body, h0_ref[...])


def _output_kernel(q_ref, k_ref, vn_ref, g_ref, h_ref, *refs, dtype):
    """o [C, BV] of one chunk and d_v block: q_ref, k_ref [C, DK], vn_ref (V') [C, BV], g_ref [C, 1], h_ref (the
    chunk-start state) [DK, BV]."""
    o_ref = refs[-1]
    q, g = q_ref[...].astype(jnp.float32), g_ref[...]
    scores = dot(q, k_ref[...], dtype, trans_b=True) * _decay_matrix(g)
    out = dot(q * exp_nonpositive(g), h_ref[...], dtype) + dot(scores, vn_ref[...], dtype)
    o_ref[...] = out.astype(o_ref.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Backward kernels


def _state_grad_kernel(q_ref, k_ref, w_ref, g_ref, do_ref, dfinal_ref, *refs, chunk, n_chunks, dtype):
    """Chunk-end state gradients dh_ref [N, DK, BV], dV' [T_pad, BV] and the initial state's gradient [DK, BV] of
    one (sequence, d_v block), walking the chunks backwards from dH = d final state:
    dV' = (D * Q K^T)^T dO + exp(g_C - g) K dH,  dH <- exp(g_C) dH + (Gamma Q)^T dO - W^T dV'."""
    dh_ref, dvn_ref, dinit_ref = refs[-3:]

    def body(step, dh):
        n = n_chunks - 1 - step
        dh_ref[n] = dh
        span = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
        g, g_last = g_ref[span, :], g_ref[n * chunk + chunk - 1, :]
        q, k, do = q_ref[span, :].astype(jnp.float32), k_ref[span, :].astype(jnp.float32), do_ref[span, :]
        scores = dot(q, k, dtype, trans_b=True) * _decay_matrix(g)
        k_e = k * exp_nonpositive(g_last[None, :] - g)
        dvn = dot(scores, do, dtype, trans_a=True) + dot(k_e, dh, dtype)
        dvn_ref[span, :] = dvn
        return (exp_nonpositive(g_last)[:, None] * dh + dot(q * exp_nonpositive(g), do, dtype, trans_a=True)
                - dot(w_ref[span, :], dvn, dtype, trans_a=True))

    dinit_ref[...] = jax.lax.fori_loop(0, n_chunks, body, dfinal_ref[...])


def _output_side_grads(q, k, g, g_last, do, h, dh, vn, dtype):
    """(dq, dk's part, dg's part) of one chunk from O = Gamma Q S + (D * Q K^T) V' and S_next = exp(g_C) S +
    (exp(g_C - g) K)^T V'. q, k [C, DK] fp32; g [C, 1], g_last (its last row) [1, 1]; do, vn [C, DV]; h (chunk-start
    state), dh (chunk-end state gradient) [DK, DV]."""
    c = q.shape[0]
    t, s = _iotas(c)
    gamma = exp_nonpositive(g)  # [C, 1]
    qk = dot(q, k, dtype, trans_b=True)
    dp = dot(do, vn, dtype, trans_b=True) * _decay_matrix(g)  # d(Q K^T), masked to j <= i
    dq_state = gamma * dot(do, h, dtype, trans_b=True)
    dq = dq_state + dot(dp, k, dtype)
    # the chunk's last key has no g-gradient through S_next: its ratio is exp(0)
    dk_end = exp_nonpositive(g_last - g) * dot(vn, dh, dtype, trans_b=True)
    dk = dot(dp, q, dtype, trans_a=True) + dk_end
    through_end = jnp.where(t < c - 1, jnp.sum(k * dk_end, axis=1)[:, None], 0.0)
    last = jnp.sum(through_end) + jnp.sum(exp_nonpositive(g_last)) * jnp.sum(h * dh)
    dg = (jnp.sum(q * dq_state, axis=1)[:, None] + _row_minus_column_sums(jnp.where(s < t, dp * qk, 0.0))
          - through_end + jnp.where(t == c - 1, last, 0.0))
    return dq, dk, dg


def _wy_side_grads(k, v, g, beta, h, dvn, dtype, precision, inverse=None):
    """(dk's part, dv, dg's part, dbeta) of one chunk from V' = U - W S, U = T V, W = T Gamma K, recomputing T (or
    from the WY kernel's `inverse`). k [C, DK], v [C, DV] fp32; g, beta [C, 1]; h (chunk-start state) [DK, DV]; dvn
    (dV') [C, DV]."""
    t, s = _iotas(k.shape[0])
    gamma = exp_nonpositive(g)
    inverse, lower, d = _wy(k, g, beta, dtype, precision, inverse)
    beta_row = _column_to_row(beta)
    t_mat = inverse * beta_row
    kd = k * gamma  # Gamma K
    dw = -dot(dvn, h, dtype, trans_b=True)
    dv = dot(t_mat, dvn, dtype, trans_a=True)
    dkd = dot(t_mat, dw, dtype, trans_a=True)
    dt = dot(dvn, v, dtype, trans_b=True) + dot(dw, kd, dtype, trans_b=True)
    # T = M^-1 diag(beta), M = I + diag(beta) L: d M = -M^-T d(M^-1) M^-T (fp32 at the inverse's precision),
    # strictly lower part
    f32 = jnp.float32
    dm = -dot(dot(inverse, dt * beta_row, f32, trans_a=True, precision=precision), inverse, f32, trans_b=True,
              precision=precision)
    dm = jnp.where(s < t, dm, 0.0)
    dl = beta * dm
    dkk = dl * d  # L = strict_lower(D * K K^T)
    dk = gamma * dkd + dot(dkk, k, dtype) + dot(dkk, k, dtype, trans_a=True)
    dg = jnp.sum(kd * dkd, axis=1)[:, None] + _row_minus_column_sums(dl * lower)
    dbeta = _row_to_column(jnp.sum(dt * inverse, axis=0)) + jnp.sum(dm * lower, axis=1)[:, None]
    return dk, dv, dg, dbeta


def _grad_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, do_ref, h_ref, dh_ref, vn_ref, dvn_ref, *refs, dtype,
                 precision, with_inverse=False):
    """dq, dk [C, DK], dv [C, DV], dg and dbeta [C, 1] of one chunk (dg: the gradient of the cumulative log decay).
    q_ref, k_ref [C, DK]; v_ref, do_ref, vn_ref (V'), dvn_ref (dV', all of V's gradient) [C, DV]; g_ref, beta_ref
    [C, 1]; h_ref (chunk-start state), dh_ref (chunk-end state gradient) [DK, DV]; with_inverse: then the WY
    kernel's inverse [C, C]."""
    dq_ref, dk_ref, dv_ref, dg_ref, dbeta_ref = refs[-5:]
    inverse = refs[0][...] if with_inverse else None
    q, k, v = (ref[...].astype(jnp.float32) for ref in (q_ref, k_ref, v_ref))
    g, h = g_ref[...], h_ref[...]
    g_last = g_ref[q.shape[0] - 1, :][None, :]
    dq, dk_out, dg_out = _output_side_grads(q, k, g, g_last, do_ref[...], h, dh_ref[...], vn_ref[...], dtype)
    dk_wy, dv, dg_wy, dbeta = _wy_side_grads(k, v, g, beta_ref[...], h, dvn_ref[...], dtype, precision, inverse)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = (dk_out + dk_wy).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    dg_ref[...] = dg_out + dg_wy
    dbeta_ref[...] = dbeta


def _grad_kernel_outputs(q_ref, k_ref, g_ref, do_ref, h_ref, dh_ref, vn_ref, *refs, dtype):
    """_grad_kernel's output side alone (GRAD_KERNEL_SPLIT): dq, and fp32 parts of dk and dg."""
    dq_ref, dk_ref, dg_ref = refs[-3:]
    q, k = (ref[...].astype(jnp.float32) for ref in (q_ref, k_ref))
    g_last = g_ref[q.shape[0] - 1, :][None, :]
    dq, dk_ref[...], dg_ref[...] = _output_side_grads(q, k, g_ref[...], g_last, do_ref[...], h_ref[...],
                                                      dh_ref[...], vn_ref[...], dtype)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _grad_kernel_wy(k_ref, v_ref, g_ref, beta_ref, h_ref, dvn_ref, *refs, dtype, precision, with_inverse=False):
    """_grad_kernel's WY side alone (GRAD_KERNEL_SPLIT): dv, dbeta, and fp32 parts of dk and dg."""
    dk_ref, dv_ref, dg_ref, dbeta_ref = refs[-4:]
    inverse = refs[0][...] if with_inverse else None
    k, v = (ref[...].astype(jnp.float32) for ref in (k_ref, v_ref))
    dk_ref[...], dv, dg_ref[...], dbeta_ref[...] = _wy_side_grads(k, v, g_ref[...], beta_ref[...], h_ref[...],
                                                                  dvn_ref[...], dtype, precision, inverse)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Launching the kernels


class _Layout(NamedTuple):
    """Sizes of one problem: the caller's and the padded ones the kernels see."""
    batch: int
    seq_len: int
    heads: int
    d_k: int
    d_v: int
    chunk: int
    t_pad: int  # whole chunks
    dk_pad: int  # powers of 2 >= 16
    dv_pad: int
    dtype: type  # matrix-product operands (not the inverse's): bfloat16 where q, k and v all are, else float32

    @property
    def sequences(self):
        return self.batch * self.heads

    @property
    def n_chunks(self):
        return self.t_pad // self.chunk

    @property
    def block_v(self):
        return min(self.dv_pad, MAX_BLOCK)

    @property
    def state_block_v(self):
        return state_block_v(self.sequences, self.dv_pad)


def state_block_v(sequences: int, dv_pad: int) -> int:
    """The d_v block of the sequential kernels: block_v, halved until there are MIN_STATE_PROGRAMS programs or it
    is MIN_CHUNK wide."""
    bv = min(dv_pad, MAX_BLOCK)
    while sequences * (dv_pad // bv) < MIN_STATE_PROGRAMS and bv > MIN_CHUNK:
        bv //= 2
    return bv


def _layout(q, k, v, chunk):
    batch, seq_len, heads, d_k = q.shape
    d_v = v.shape[-1]
    return _Layout(batch, seq_len, heads, d_k, d_v, chunk, -(-seq_len // chunk) * chunk, padded_width(d_k),
                   padded_width(d_v), operand_dtype(q, k, v))


class _Inputs(NamedTuple):
    q: jax.Array  # [G, T_pad, DK] in lay.dtype
    k: jax.Array  # [G, T_pad, DK]
    v: jax.Array  # [G, T_pad, DV]
    g: jax.Array  # [G, T_pad, 1] fp32: the log decay summed from each chunk's start (inclusive)
    beta: jax.Array  # [G, T_pad, 1] fp32 (0 on padding tokens)


def _inputs(q, k, v, log_decay, beta, lay: _Layout) -> _Inputs:
    g = to_rows(log_decay[..., None], lay, 1, jnp.float32)
    g = jnp.cumsum(g.reshape(lay.sequences, lay.n_chunks, lay.chunk, 1), axis=2).reshape(g.shape)
    return _Inputs(to_rows(q, lay, lay.dk_pad, lay.dtype), to_rows(k, lay, lay.dk_pad, lay.dtype),
                   to_rows(v, lay, lay.dv_pad, lay.dtype), g, to_rows(beta[..., None], lay, 1, jnp.float32))


def _chunk_spec(c, width):
    """[C, width] block of a [G, T_pad, width] array on a (sequence, chunk, ...) grid."""
    return pl.BlockSpec((None, c, width), lambda s, n, *_: (s, n, 0))


def _wy_pieces(x: _Inputs, lay: _Layout, cfg: ChunkConfig, with_inverse: bool = False):
    """W [G, T_pad, DK] and U [G, T_pad, DV] in lay.dtype, and with_inverse each chunk's inverse [G, T_pad, C] fp32
    (else None)."""
    g, c = lay.sequences, lay.chunk
    in_specs = [_chunk_spec(c, lay.dk_pad), _chunk_spec(c, lay.dv_pad), _chunk_spec(c, 1), _chunk_spec(c, 1)]
    out_specs = [_chunk_spec(c, lay.dk_pad), _chunk_spec(c, lay.dv_pad)] + [_chunk_spec(c, c)] * with_inverse
    out_shape = [jax.ShapeDtypeStruct((g, lay.t_pad, lay.dk_pad), lay.dtype),
                 jax.ShapeDtypeStruct((g, lay.t_pad, lay.dv_pad), lay.dtype)] + [
                     jax.ShapeDtypeStruct((g, lay.t_pad, c), jnp.float32)] * with_inverse
    kernel = functools.partial(_wy_kernel, dtype=lay.dtype, precision=_inverse_precision(cfg),
                               with_inverse=with_inverse)
    pieces = call(kernel, cfg, "gated_delta_wy", (g, lay.n_chunks), [x.k, x.v, x.g, x.beta], in_specs, out_specs,
                  out_shape)
    return (*pieces, None) if not with_inverse else tuple(pieces)


def _chunk_states(x: _Inputs, w, u, h0, lay: _Layout, cfg: ChunkConfig):
    """Chunk-start states [G, N, DK, DV] fp32, V' [G, T_pad, DV] in lay.dtype and the final state [G, DK, DV]."""
    g, bv, t_pad, n, dk = lay.sequences, lay.state_block_v, lay.t_pad, lay.n_chunks, lay.dk_pad
    full_k = pl.BlockSpec((None, t_pad, dk), lambda s, j: (s, 0, 0))
    in_specs = [full_k, full_k, pl.BlockSpec((None, t_pad, bv), lambda s, j: (s, 0, j)),
                pl.BlockSpec((None, t_pad, 1), lambda s, j: (s, 0, 0)),
                pl.BlockSpec((None, dk, bv), lambda s, j: (s, 0, j))]
    out_specs = [pl.BlockSpec((None, n, dk, bv), lambda s, j: (s, 0, 0, j)),
                 pl.BlockSpec((None, t_pad, bv), lambda s, j: (s, 0, j)),
                 pl.BlockSpec((None, dk, bv), lambda s, j: (s, 0, j))]
    out_shape = [jax.ShapeDtypeStruct((g, n, dk, lay.dv_pad), jnp.float32),
                 jax.ShapeDtypeStruct((g, t_pad, lay.dv_pad), lay.dtype),
                 jax.ShapeDtypeStruct((g, dk, lay.dv_pad), jnp.float32)]
    kernel = functools.partial(_state_kernel, chunk=lay.chunk, n_chunks=n, dtype=lay.dtype)
    return call(kernel, cfg, "gated_delta_states", (g, lay.dv_pad // bv), [x.k, w, u, x.g, h0], in_specs,
                 out_specs, out_shape)


def _chunk_outputs(x: _Inputs, vn, h_start, out_dtype, lay: _Layout, cfg: ChunkConfig):
    """o [G, T_pad, DV] in out_dtype."""
    g, c, bv, dk = lay.sequences, lay.chunk, lay.block_v, lay.dk_pad
    v_block = pl.BlockSpec((None, c, bv), lambda s, n, j: (s, n, j))
    in_specs = [_chunk_spec(c, dk), _chunk_spec(c, dk), v_block, _chunk_spec(c, 1),
                pl.BlockSpec((None, None, dk, bv), lambda s, n, j: (s, n, 0, j))]
    out_shape = [jax.ShapeDtypeStruct((g, lay.t_pad, lay.dv_pad), out_dtype)]
    kernel = functools.partial(_output_kernel, dtype=lay.dtype)
    (o,) = call(kernel, cfg, "gated_delta_outputs", (g, lay.n_chunks, lay.dv_pad // bv),
                 [x.q, x.k, vn, x.g, h_start], in_specs, [v_block], out_shape)
    return o


def _state_grads(x: _Inputs, w, do, dfinal, lay: _Layout, cfg: ChunkConfig):
    """Chunk-end state gradients [G, N, DK, DV], dV' [G, T_pad, DV] and the initial state's gradient [G, DK, DV],
    all fp32."""
    g, bv, t_pad, n, dk = lay.sequences, lay.state_block_v, lay.t_pad, lay.n_chunks, lay.dk_pad
    full_k = pl.BlockSpec((None, t_pad, dk), lambda s, j: (s, 0, 0))
    v_block = pl.BlockSpec((None, t_pad, bv), lambda s, j: (s, 0, j))
    in_specs = [full_k, full_k, full_k, pl.BlockSpec((None, t_pad, 1), lambda s, j: (s, 0, 0)), v_block,
                pl.BlockSpec((None, dk, bv), lambda s, j: (s, 0, j))]
    out_specs = [pl.BlockSpec((None, n, dk, bv), lambda s, j: (s, 0, 0, j)), v_block,
                 pl.BlockSpec((None, dk, bv), lambda s, j: (s, 0, j))]
    out_shape = [jax.ShapeDtypeStruct((g, n, dk, lay.dv_pad), jnp.float32),
                 jax.ShapeDtypeStruct((g, t_pad, lay.dv_pad), jnp.float32),
                 jax.ShapeDtypeStruct((g, dk, lay.dv_pad), jnp.float32)]
    kernel = functools.partial(_state_grad_kernel, chunk=lay.chunk, n_chunks=n, dtype=lay.dtype)
    return call(kernel, cfg, "gated_delta_state_grads", (g, lay.dv_pad // bv), [x.q, x.k, w, x.g, do, dfinal],
                 in_specs, out_specs, out_shape)


def _chunk_grads(x: _Inputs, do, h_start, dh_end, vn, dvn, dtypes, lay: _Layout, cfg: ChunkConfig, inverse=None):
    """dq, dk [G, T_pad, DK], dv [G, T_pad, DV] (in dtypes), dg and dbeta [G, T_pad, 1] fp32. inverse: the WY
    kernel's [G, T_pad, C] (REUSE_INVERSE), or None to form it again."""
    g, c, dk, dv = lay.sequences, lay.chunk, lay.dk_pad, lay.dv_pad
    state = pl.BlockSpec((None, None, dk, dv), lambda s, n: (s, n, 0, 0))
    chunk_k, chunk_v, column = _chunk_spec(c, dk), _chunk_spec(c, dv), _chunk_spec(c, 1)
    in_specs = [chunk_k, chunk_k, chunk_v, column, column, chunk_v, state, state, chunk_v, chunk_v]
    out_specs = [chunk_k, chunk_k, chunk_v, column, column]
    q_dtype, k_dtype, v_dtype = dtypes
    out_shape = [jax.ShapeDtypeStruct((g, lay.t_pad, dk), q_dtype), jax.ShapeDtypeStruct((g, lay.t_pad, dk), k_dtype),
                 jax.ShapeDtypeStruct((g, lay.t_pad, dv), v_dtype)] + [
                     jax.ShapeDtypeStruct((g, lay.t_pad, 1), jnp.float32)] * 2
    with_inverse = inverse is not None
    extra_inputs, extra_specs = ([inverse], [_chunk_spec(c, c)]) if with_inverse else ([], [])
    if not GRAD_KERNEL_SPLIT:
        kernel = functools.partial(_grad_kernel, dtype=lay.dtype, precision=_inverse_precision(cfg),
                                   with_inverse=with_inverse)
        return call(kernel, cfg, "gated_delta_grads", (g, lay.n_chunks),
                     [x.q, x.k, x.v, x.g, x.beta, do, h_start, dh_end, vn, dvn] + extra_inputs,
                     in_specs + extra_specs, out_specs, out_shape)
    f32_k, f32_column = (jax.ShapeDtypeStruct((g, lay.t_pad, width), jnp.float32) for width in (dk, 1))
    dq, dk_out, dg_out = call(functools.partial(_grad_kernel_outputs, dtype=lay.dtype), cfg,
                              "gated_delta_grads_outputs", (g, lay.n_chunks),
                              [x.q, x.k, x.g, do, h_start, dh_end, vn],
                              [chunk_k, chunk_k, column, chunk_v, state, state, chunk_v], [chunk_k, chunk_k, column],
                              [out_shape[0], f32_k, f32_column])
    wy_kernel = functools.partial(_grad_kernel_wy, dtype=lay.dtype, precision=_inverse_precision(cfg),
                                  with_inverse=with_inverse)
    dk_wy, dv, dg_wy, dbeta = call(wy_kernel, cfg, "gated_delta_grads_wy",
                                   (g, lay.n_chunks), [x.k, x.v, x.g, x.beta, h_start, dvn] + extra_inputs,
                                   [chunk_k, chunk_v, column, column, state, chunk_v] + extra_specs,
                                   [chunk_k, chunk_v, column, column], [f32_k, out_shape[2], f32_column, f32_column])
    return dq, (dk_out + dk_wy).astype(k_dtype), dv, dg_out + dg_wy, dbeta


# ---------------------------------------------------------------------------------------------------------------
# The custom VJP


def _run_forward(q, k, v, log_decay, beta, initial_state, cfg: ChunkConfig, with_inverse: bool = False):
    lay = _layout(q, k, v, cfg.chunk_size)
    x = _inputs(q, k, v, log_decay, beta, lay)
    w, u, inverse = _wy_pieces(x, lay, cfg, with_inverse)
    h_start, vn, final = _chunk_states(x, w, u, state_rows(initial_state, lay), lay, cfg)
    return lay, x, w, h_start, vn, final, inverse


def _forward_and_pieces(q, k, v, log_decay, beta, initial_state, cfg: ChunkConfig):
    """((o, final state), (W, chunk-start states, V'))."""
    lay, x, w, h_start, vn, final, _ = _run_forward(q, k, v, log_decay, beta, initial_state, cfg)
    o = _chunk_outputs(x, vn, h_start, v.dtype, lay, cfg)
    return (from_rows(o, lay, lay.d_v), final[:, :lay.d_k, :lay.d_v].reshape(initial_state.shape)), (w, h_start, vn)


def _forward(q, k, v, log_decay, beta, initial_state, cfg: ChunkConfig):
    return _forward_and_pieces(q, k, v, log_decay, beta, initial_state, cfg)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _chunk_gated_delta(q, k, v, log_decay, beta, initial_state, cfg: ChunkConfig):
    return _forward(q, k, v, log_decay, beta, initial_state, cfg)


def _chunk_gated_delta_fwd(q, k, v, log_decay, beta, initial_state, cfg: ChunkConfig):
    # Saved: the inputs, and with SAVE_FORWARD W, the chunk states and V'. Without it the backward pass recomputes
    # W, U, the chunk states and V' (two kernels) rather than keeping [G, N, DK, DV] states alive.
    out, pieces = _forward_and_pieces(q, k, v, log_decay, beta, initial_state, cfg)
    return out, (q, k, v, log_decay, beta, initial_state, pieces if SAVE_FORWARD else None)


def _chunk_gated_delta_bwd(cfg: ChunkConfig, saved, cotangents):
    q, k, v, log_decay, beta, initial_state, forward = saved
    d_out, d_final = cotangents
    if forward is None:  # rerun the forward kernels (with REUSE_INVERSE the WY kernel also hands over its inverse)
        lay, x, w, h_start, vn, _, inverse = _run_forward(q, k, v, log_decay, beta, initial_state, cfg,
                                                          with_inverse=REUSE_INVERSE)
    else:
        lay = _layout(q, k, v, cfg.chunk_size)
        x = _inputs(q, k, v, log_decay, beta, lay)
        (w, h_start, vn), inverse = forward, None
    do = to_rows(d_out, lay, lay.dv_pad, lay.dtype)
    dh_end, dvn, d_initial = _state_grads(x, w, do, state_rows(d_final, lay), lay, cfg)
    dq, dk, dv, d_cum, dbeta = _chunk_grads(x, do, h_start, dh_end, vn, dvn, (q.dtype, k.dtype, v.dtype), lay, cfg,
                                            inverse)
    # g = in-chunk cumulative sum of a, so da_t = sum of dg over the chunk's tokens from t on.
    d_cum = d_cum.reshape(lay.sequences, lay.n_chunks, lay.chunk)
    da = jax.lax.cumsum(d_cum, axis=2, reverse=True).reshape(lay.sequences, lay.t_pad, 1)
    d_initial = d_initial[:, :lay.d_k, :lay.d_v].reshape(initial_state.shape).astype(initial_state.dtype)
    return (from_rows(dq, lay, lay.d_k), from_rows(dk, lay, lay.d_k), from_rows(dv, lay, lay.d_v),
            from_rows(da, lay, 1)[..., 0].astype(log_decay.dtype),
            from_rows(dbeta, lay, 1)[..., 0].astype(beta.dtype), d_initial)


_chunk_gated_delta.defvjp(_chunk_gated_delta_fwd, _chunk_gated_delta_bwd)


def _check_arguments(q, k, v, log_decay, beta, initial_state, chunk_size):
    if q.ndim != 4:
        raise ValueError(f"q: expected [B, T, H, d_k], got shape {q.shape}")
    batch, seq_len, heads, d_k = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k: expected the shape of q {q.shape}, got {k.shape}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v: expected [B, T, H, d_v] = [{batch}, {seq_len}, {heads}, d_v], got shape {v.shape}")
    for name, x in (("log_decay", log_decay), ("beta", beta)):
        if x.shape != q.shape[:3]:
            raise ValueError(f"{name}: expected shape [B, T, H] {q.shape[:3]}, got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}: expected a floating dtype, got {x.dtype}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"{name}: expected float32 or bfloat16, got {x.dtype}")
    want_state = (batch, heads, d_k, v.shape[-1])
    if initial_state is not None and initial_state.shape != want_state:
        raise ValueError(f"initial_state: expected [B, H, d_k, d_v] {want_state}, got shape {initial_state.shape}")
    if chunk_size < MIN_CHUNK or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size: expected a power of 2 >= {MIN_CHUNK}, got {chunk_size}")
    if seq_len == 0:
        raise ValueError("q: the sequence (axis 1) is empty")
    if not isinstance(log_decay, jax.core.Tracer) and np.any(np.asarray(log_decay, np.float32) > 0):
        raise ValueError("log_decay: must be <= 0 (a decay exp(log_decay) <= 1); got positive entries")


def chunk_gated_delta(q, k, v, log_decay, beta, initial_state=None, *, chunk_size: int = 64,
                      interpret: bool = False, poison_output: bool = False, num_warps: int | None = None):
    """The gated delta rule, S_t = exp(a_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T q_t,
    in chunks (the WY / UT representation).

    Args:
      q, k: `[B, T, H, d_k]`; v: `[B, T, H, d_v]`; float32 or bfloat16 (matrix products take bf16 operands with
        fp32 accumulation where q, k and v all are bf16; the chunk's (I + diag(beta) L)^-1 always
        takes fp32 products: TF32 x 3 on a GPU by default, INVERSE_PRECISION; IEEE in interpret mode).
        k is used as given (the layer L2-normalises it).
      log_decay: a_t <= 0, `[B, T, H]`; beta: `[B, T, H]`, in [0, 1] for a contraction. Computed in float32.
      initial_state: S_0, `[B, H, d_k, d_v]`, or None for zeros.
      chunk_size: C, tokens per chunk, a power of 2 >= 16 (T is padded to whole chunks with tokens that write
        nothing). num_warps: Triton warps per program (GPU); None: 4 with bf16 operands, 8 with fp32 ones
        (chunk_common.DEFAULT_WARPS).
      interpret: run the kernels in interpret mode (any device, the CPU included).
      poison_output: start the kernels' output buffers as NaN (tests: an element a kernel fails to write shows).

    Returns:
      o `[B, T, H, d_v]` in v's dtype and the final state `[B, H, d_k, d_v]` float32. Differentiable in q, k, v,
      log_decay, beta and initial_state (the backward pass is Pallas kernels too).
    """
    _check_arguments(q, k, v, log_decay, beta, initial_state, chunk_size)
    if initial_state is None:
        initial_state = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), jnp.float32)
    cfg = ChunkConfig(int(chunk_size), default_num_warps(num_warps, q, k, v), bool(interpret),
                      bool(poison_output))
    return _chunk_gated_delta(q, k, v, log_decay, beta, initial_state, cfg)
