"""The Fenwick levels above the chunk of log-linear attention over the gated delta rule (the Gated DeltaNet base;
docs/loglinear.md section 3) as Pallas kernels (Triton lowering): the two walks over the chunks that XLA can only
do with d_k x d_k transition matrices and their prefix products, and the per-chunk gradients.

One sequence (a batch row and head), chunks n = 0 .. N-1 of C tokens from the sequence's first token. Per chunk
the caller gives (from the WY / UT representation of the chunk, in jax.numpy):
  W [C, d_k] and U [C, d_v]           V' = U - W S: what the chunk's tokens write into a state S met at its start,
  K~ = (Gamma_C / Gamma) K [C, d_k]   the keys decayed to the chunk's end, gamma = Gamma_C the chunk's decay,
  Q~ [C, d_k]                         the effective queries, reading a chunk-start state through the chunk,
so a state crosses the chunk as S -> gamma S + K~^T (U - W S), and one that the chunk's tokens do not write into
(values zero) as S -> gamma S - K~^T (W S).

At level m >= 1 above the chunk, chunks pair up in blocks of 2^(m-1): a chunk in the odd block of its pair reads
the summed state of the even block, carried through the odd block's earlier chunks. One state per level does both:
it restarts at 0 at each pair's first chunk ("keep" = 0), takes the chunks of the even block with their values,
those of the odd block without ("read" = 1), and in the odd block is read before each chunk moves it on:

    S_in(n) = keep_n S_out(n - 1),   r_m(n) = read_n lam_m(n) * (Q~_n S_in(n)),
    S_out(n) = gamma_n S_in(n) + K~_n^T ((1 - read_n) U_n - W_n S_in(n)).

`level_walk` returns every chunk's S_in(n) and/or the weighted reads r_m; `level_walk_grads` walks back, given dO
(every level's reads add into the same output), and returns the gradient of every chunk's S_out(n):

    Lambda(n) = gamma_n dS_out(n) - W_n^T (K~_n dS_out(n)) + read_n Q~_n^T (lam_m(n) * dO_n),
    dS_out(n - 1) = keep_n Lambda(n).

The per-chunk gradients of W, U, K~, gamma, Q~ and lam follow from S_in and dS_out (`level_chunk_grads`, summed over
the levels; the caller, ramjax.ops.loglinear.delta_levels, can form them in jax.numpy instead).

Kernels (G sequences, T a whole number of chunks, d_k and d_v padded to powers of 2 >= 16): the two walks with grid
(G, levels, d_v blocks), each program one level's walk over all chunks of one sequence and d_v block (blocks
narrowed to 16 where there are few programs, as `gated_delta_chunk.state_block_v` does); the per-chunk gradients
with grid (G, chunks), each program summing over the levels.
Matrix products take operands in the inputs' dtype with fp32 accumulation (IEEE fp32 for fp32); the walks carry
fp32 states and store them (and their gradients) in the inputs' dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.chunk_common import ChunkConfig, call, dot
from kernels.gated_delta_chunk import state_block_v

MIN_CHUNK = 16  # the smallest block Triton's dot takes


def level_flags(num_chunks: int) -> tuple[jax.Array, jax.Array]:
    """(keep, read), each [levels, N, 1] fp32, for the levels m = 1 .. bit_length(N - 1) above the chunk at which
    two of N chunks (from chunk 0) can meet: keep = 0 at a pair's first chunk, read = 1 in the odd block."""
    levels = max(num_chunks - 1, 0).bit_length()
    n = jnp.arange(num_chunks, dtype=jnp.int32)[None, :, None]
    m = jnp.arange(1, levels + 1, dtype=jnp.int32)[:, None, None]
    keep = (n % (2**m) != 0).astype(jnp.float32)
    read = ((n // 2 ** (m - 1)) % 2 == 1).astype(jnp.float32)
    return keep, read


def _walk_kernel(ke_ref, w_ref, u_ref, q_ref, gamma_ref, keep_ref, read_ref, lam_ref, *refs, chunk, n_chunks,
                 dtype, store_states, store_reads):
    """S_in [N, DK, BV] (if store_states) and r [T_pad, BV] (if store_reads) of one (sequence, level, d_v block):
    ke_ref, w_ref, q_ref [T_pad, DK], u_ref [T_pad, BV], gamma_ref [N, 1], keep_ref, read_ref [N, 1] (this level),
    lam_ref [T_pad, 1]."""
    outputs = list(refs[len(refs) - store_states - store_reads:])
    s_ref = outputs.pop(0) if store_states else None
    r_ref = outputs.pop(0) if store_reads else None

    def body(n, h):
        span = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
        keep, read, gamma = keep_ref[n, :], read_ref[n, :], gamma_ref[n, :]  # [1] each
        h = keep[:, None] * h
        if store_states:
            s_ref[n] = h.astype(s_ref.dtype)
        if store_reads:
            r_ref[span, :] = (read[:, None] * lam_ref[span, :]) * dot(q_ref[span, :], h, dtype)
        vn = (1.0 - read[:, None]) * u_ref[span, :].astype(jnp.float32) - dot(w_ref[span, :], h, dtype)
        return gamma[:, None] * h + dot(ke_ref[span, :], vn, dtype, trans_a=True)

    jax.lax.fori_loop(0, n_chunks, body, jnp.zeros((ke_ref.shape[1], u_ref.shape[1]), jnp.float32))


def _walk_grad_kernel(ke_ref, w_ref, q_ref, gamma_ref, keep_ref, read_ref, lam_ref, do_ref, *refs, chunk, n_chunks,
                      dtype):
    """dS_out [N, DK, BV] of one (sequence, level, d_v block), walking the chunks backwards: inputs as
    `_walk_kernel`'s, with do_ref [T_pad, BV] the output's gradient."""
    ds_ref = refs[-1]

    def body(step, dh):
        n = n_chunks - 1 - step
        span = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
        keep, read, gamma = keep_ref[n, :], read_ref[n, :], gamma_ref[n, :]
        ds_ref[n] = dh.astype(ds_ref.dtype)
        dvn = dot(ke_ref[span, :], dh, dtype)  # [C, BV]: the gradient of V'
        lam_do = (read[:, None] * lam_ref[span, :]) * do_ref[span, :].astype(jnp.float32)
        grad_in = (gamma[:, None] * dh - dot(w_ref[span, :], dvn, dtype, trans_a=True)
                   + dot(q_ref[span, :], lam_do, dtype, trans_a=True))
        return keep[:, None] * grad_in

    jax.lax.fori_loop(0, n_chunks, body, jnp.zeros(ds_ref.shape[1:], jnp.float32))


def _chunk_grads_kernel(ke_ref, w_ref, u_ref, q_ref, do_ref, lam_ref, read_ref, s_ref, ds_ref, *refs, levels,
                        dtype):
    """The per-chunk gradients of one (sequence, chunk), summed over the levels: d K~, d W, d Q~ [C, DK], d U
    [C, DV], d gamma [1, 1] and d lam [levels, C, 1]. ke_ref, w_ref, q_ref [C, DK], u_ref, do_ref [C, DV], lam_ref
    [levels, C, 1], read_ref [levels] (this chunk), s_ref (S_in), ds_ref (dS_out) [levels, DK, DV]."""
    d_ke_ref, d_w_ref, d_q_ref, d_u_ref, d_gamma_ref, d_lam_ref = refs[-6:]
    ke, w, q = ke_ref[...], w_ref[...], q_ref[...]
    u, do = u_ref[...].astype(jnp.float32), do_ref[...].astype(jnp.float32)
    d_ke = jnp.zeros(ke.shape, jnp.float32)
    d_w, d_q = jnp.zeros_like(d_ke), jnp.zeros_like(d_ke)
    d_u = jnp.zeros(u.shape, jnp.float32)
    d_gamma = jnp.zeros((1, 1), jnp.float32)
    for m in range(levels):  # static: a handful of levels
        read = read_ref[m:m + 1][:, None]  # [1, 1]
        state, d_state = s_ref[m].astype(jnp.float32), ds_ref[m].astype(jnp.float32)
        d_vn = dot(ke, d_state, dtype)  # [C, DV]: the gradient of V' = (1 - read) U - W S_in
        vn = (1.0 - read) * u - dot(w, state, dtype)
        d_ke += dot(vn, d_state, dtype, trans_b=True)
        d_u += (1.0 - read) * d_vn
        d_w -= dot(d_vn, state, dtype, trans_b=True)
        d_gamma += jnp.sum(jnp.sum(d_state * state, axis=1)[:, None], axis=0)[None, :]
        d_q += dot((read * lam_ref[m]) * do, state, dtype, trans_b=True)
        d_lam_ref[m] = read * jnp.sum(do * dot(q, state, dtype), axis=1)[:, None]
    d_ke_ref[...], d_w_ref[...], d_q_ref[...], d_u_ref[...] = d_ke, d_w, d_q, d_u
    d_gamma_ref[...] = d_gamma


def _check(ke, w, u, q, gamma, lam, chunk):
    sequences, t_pad, dk = ke.shape
    if chunk < MIN_CHUNK or chunk & (chunk - 1):
        raise ValueError(f"chunk_size: expected a power of 2 >= {MIN_CHUNK}, got {chunk}")
    if t_pad % chunk:
        raise ValueError(f"ke: time axis {t_pad} is not a whole number of chunks of {chunk}")
    for name, x in (("w", w), ("q", q)):
        if x.shape != ke.shape:
            raise ValueError(f"{name}: expected the shape of ke {ke.shape}, got {x.shape}")
    if u.ndim != 3 or u.shape[:2] != (sequences, t_pad):
        raise ValueError(f"u: expected [G, T_pad, DV] with G, T_pad = {sequences}, {t_pad}, got {u.shape}")
    for name, width in (("dk", dk), ("dv", u.shape[2])):
        if width < MIN_CHUNK or width & (width - 1):
            raise ValueError(f"{name}: the padded width must be a power of 2 >= {MIN_CHUNK}, got {width}")
    n_chunks = t_pad // chunk
    if gamma.shape != (sequences, n_chunks, 1):
        raise ValueError(f"gamma: expected [G, N, 1] = {(sequences, n_chunks, 1)}, got {gamma.shape}")
    levels = max(n_chunks - 1, 0).bit_length()
    if lam.shape != (sequences, levels, t_pad, 1):
        raise ValueError(f"lam: expected [G, levels, T_pad, 1] = {(sequences, levels, t_pad, 1)}, got {lam.shape}")
    return sequences, t_pad, dk, u.shape[2], n_chunks, levels


def level_walk(ke, w, u, q, gamma, lam, cfg: ChunkConfig, *, store_states: bool = True, store_reads: bool = True):
    """Every chunk's state S_in [G, levels, N, DK, DV] (if store_states) and the weighted reads r
    [G, levels, T_pad, DV] fp32 (if store_reads), as a list. The walk carries fp32 states; it stores them in the
    operands' dtype (bf16 where ke is: the products that read them round them to it anyway).

    ke, w, q: [G, T_pad, DK]; u: [G, T_pad, DV] (operands in ke's dtype, fp32 or bf16, with fp32 accumulation);
    gamma: [G, N, 1] fp32; lam: [G, levels, T_pad, 1] fp32, the weight of level m at each token (m = 1 .. levels
    above the chunk)."""
    if not (store_states or store_reads):
        raise ValueError("level_walk: store_states or store_reads must be True (nothing to return)")
    sequences, t_pad, dk, dv, n, levels = _check(ke, w, u, q, gamma, lam, cfg.chunk_size)
    keep, read = level_flags(n)
    bv = state_block_v(sequences * levels, dv)  # narrowed where there are few walks (occupancy)
    full_k = pl.BlockSpec((None, t_pad, dk), lambda s, m, j: (s, 0, 0))
    per_level = pl.BlockSpec((None, n, 1), lambda s, m, j: (m, 0, 0))
    in_specs = [full_k, full_k, pl.BlockSpec((None, t_pad, bv), lambda s, m, j: (s, 0, j)), full_k,
                pl.BlockSpec((None, n, 1), lambda s, m, j: (s, 0, 0)), per_level, per_level,
                pl.BlockSpec((None, None, t_pad, 1), lambda s, m, j: (s, m, 0, 0))]
    out_specs, out_shape = [], []
    if store_states:
        out_specs.append(pl.BlockSpec((None, None, n, dk, bv), lambda s, m, j: (s, m, 0, 0, j)))
        out_shape.append(jax.ShapeDtypeStruct((sequences, levels, n, dk, dv), ke.dtype))
    if store_reads:
        out_specs.append(pl.BlockSpec((None, None, t_pad, bv), lambda s, m, j: (s, m, 0, j)))
        out_shape.append(jax.ShapeDtypeStruct((sequences, levels, t_pad, dv), jnp.float32))
    kernel = functools.partial(_walk_kernel, chunk=cfg.chunk_size, n_chunks=n, dtype=ke.dtype,
                               store_states=store_states, store_reads=store_reads)
    return list(call(kernel, cfg, "loglinear_delta_walk", (sequences, levels, dv // bv),
                     [ke, w, u, q, gamma, keep, read, lam], in_specs, out_specs, out_shape))


def level_walk_grads(ke, w, q, gamma, lam, do, cfg: ChunkConfig):
    """The gradient of every chunk's S_out, [G, levels, N, DK, DV] in ke's dtype (carried in fp32), given do
    [G, T_pad, DV] the gradient of the reads summed over the levels; other arguments as `level_walk`'s."""
    sequences, t_pad, dk, dv, n, levels = _check(ke, w, do, q, gamma, lam, cfg.chunk_size)
    keep, read = level_flags(n)
    bv = state_block_v(sequences * levels, dv)  # narrowed where there are few walks (occupancy)
    full_k = pl.BlockSpec((None, t_pad, dk), lambda s, m, j: (s, 0, 0))
    per_level = pl.BlockSpec((None, n, 1), lambda s, m, j: (m, 0, 0))
    in_specs = [full_k, full_k, full_k, pl.BlockSpec((None, n, 1), lambda s, m, j: (s, 0, 0)), per_level, per_level,
                pl.BlockSpec((None, None, t_pad, 1), lambda s, m, j: (s, m, 0, 0)),
                pl.BlockSpec((None, t_pad, bv), lambda s, m, j: (s, 0, j))]
    out_specs = [pl.BlockSpec((None, None, n, dk, bv), lambda s, m, j: (s, m, 0, 0, j))]
    out_shape = [jax.ShapeDtypeStruct((sequences, levels, n, dk, dv), ke.dtype)]
    kernel = functools.partial(_walk_grad_kernel, chunk=cfg.chunk_size, n_chunks=n, dtype=ke.dtype)
    (ds,) = call(kernel, cfg, "loglinear_delta_walk_grads", (sequences, levels, dv // bv),
                 [ke, w, q, gamma, keep, read, lam, do], in_specs, out_specs, out_shape)
    return ds


def level_chunk_grads(ke, w, u, q, lam, do, states, d_states, cfg: ChunkConfig):
    """The gradients of ke, w, q [G, T_pad, DK], u [G, T_pad, DV], gamma [G, N, 1] and lam [G, levels, T_pad, 1],
    all fp32, from every chunk's S_in (`level_walk`) and dS_out (`level_walk_grads`), one program per (sequence,
    chunk) summing over the levels."""
    sequences, t_pad, dk = ke.shape
    dv, chunk, levels = u.shape[2], cfg.chunk_size, states.shape[1]
    n = t_pad // chunk
    _, read = level_flags(n)
    read = jnp.transpose(read[..., 0])  # [N, levels]
    chunk_k = pl.BlockSpec((None, chunk, dk), lambda s, c: (s, c, 0))
    chunk_v = pl.BlockSpec((None, chunk, dv), lambda s, c: (s, c, 0))
    per_level = pl.BlockSpec((None, levels, chunk, 1), lambda s, c: (s, 0, c, 0))
    state = pl.BlockSpec((None, levels, None, dk, dv), lambda s, c: (s, 0, c, 0, 0))
    in_specs = [chunk_k, chunk_k, chunk_v, chunk_k, chunk_v, per_level,
                pl.BlockSpec((None, levels), lambda s, c: (c, 0)), state, state]
    out_specs = [chunk_k, chunk_k, chunk_k, chunk_v, pl.BlockSpec((None, 1, 1), lambda s, c: (s, c, 0)), per_level]
    f32 = jnp.float32
    out_shape = [jax.ShapeDtypeStruct((sequences, t_pad, dk), f32)] * 3 + [
        jax.ShapeDtypeStruct((sequences, t_pad, dv), f32), jax.ShapeDtypeStruct((sequences, n, 1), f32),
        jax.ShapeDtypeStruct((sequences, levels, t_pad, 1), f32)]
    kernel = functools.partial(_chunk_grads_kernel, levels=levels, dtype=ke.dtype)
    return call(kernel, cfg, "loglinear_delta_chunk_grads", (sequences, n),
                [ke, w, u, q, do, lam, read, states, d_states], in_specs, out_specs, out_shape)
