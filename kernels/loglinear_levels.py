"""The Fenwick levels above the chunk of log-linear attention over a scalar decay (the Mamba-2 base;
docs/loglinear.md section 3) as Pallas kernels (Triton lowering), with a custom VJP whose backward pass is two
Pallas kernels.

Chunks of C tokens sit on a grid aligned to absolute chunk indices: this sequence's chunk n is absolute chunk
a = first_chunk + n. At level m >= 1 above the chunk, chunks pair up in blocks of 2^(m-1): chunk a reads at level m
when it lies in the odd block of its pair (bit m - 1 of a is set), and what it reads is one summed state of the even
block before it, S_m(n) = `block_states[offset_m + group]`, group the pair's index counted from the first pair this
sequence touches (`level_groups` gives each level's offset and padding). With e_t = exp(Gc_t) (Gc the log decay
from the chunk's start, inclusive) and w[t, m] the caller's weight of level m at token t (lambda of that level
times the decay from the block's end to the chunk's start),

    o_t = e_t * sum_{m: chunk(t) reads at m} w[t, m] * (q_t . S_m(chunk(t)))          ([d_v] per token)

The caller (ramjax.ops.loglinear) forms the block states and weights in jax.numpy: they are per chunk or per block,
small beside the per-token work here, which was one batched matmul and two full passes over o per level.

Backward, with r_tm = q_t S_m and dO_t:
    dw[t, m] = e_t (r_tm . dO_t),   dGc_t = sum_m w[t, m] dw[t, m],   dq_t = e_t sum_m w[t, m] S_m dO_t,
    dS[j] = sum over the tokens t of the chunks that read entry j of e_t w[t, m] q_t dO_t^T.

Kernels (G = B * H sequences, T a whole number of chunks, d_k and d_v padded to powers of 2 >= 16, the weights'
M columns to a power of 2 >= 16):
  _read_kernel       grid (G, chunks, d_v blocks): o of one chunk and d_v block, every level in one pass;
  _token_grad_kernel grid (G, chunks): dq, dw and dGc of one chunk;
  _state_grad_kernel grid (G, state entries, d_v blocks): dS of one entry, a loop over the chunks that read it.

Numerics: exponents are <= 0 (Gc, and the caller's decays); matrix products take bf16 operands where q is bf16
(states rounded to bf16 for the product, fp32 accumulation), IEEE fp32 otherwise; the output, the weights' and
states' gradients are fp32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.chunk_common import (ChunkConfig, call, default_num_warps, dot, exp_nonpositive, from_rows,
                                  head_summed, operand_dtype, padded_width, shared_rows, to_rows)
from kernels.shapes import pad_axis

MIN_CHUNK = 16  # the smallest block Triton's dot takes
MAX_BLOCK = 64  # d_v block width


class LevelGroups(NamedTuple):
    """Level m above the chunk on this sequence's chunk grid: `front` padding chunks put its first chunk on the
    absolute grid of pairs of 2^(m-1)-chunk blocks; `groups` pairs cover the sequence; its summed states are
    entries `offset` .. offset + groups - 1 of the caller's `block_states`."""
    level: int  # m >= 1
    front: int
    groups: int
    offset: int


def level_groups(first_chunk: int, num_chunks: int) -> list[LevelGroups]:
    """The levels above the chunk at which two of these chunks can meet (m = 1 .. bit_length(first XOR last)),
    with where their block states sit in `block_states` (levels in order, groups in order)."""
    last = first_chunk + num_chunks - 1
    out, offset = [], 0
    for m in range(1, (first_chunk ^ last).bit_length() + 1):
        front = first_chunk % (2**m)
        groups = -(-(front + num_chunks) // 2**m)
        out.append(LevelGroups(m, front, groups, offset))
        offset += groups
    return out


# ---------------------------------------------------------------------------------------------------------------
# The kernels


def _reads(n, level: LevelGroups):
    """(whether chunk n reads at this level, the block_states entry it reads), traced int32 scalars."""
    position = level.front + n
    return (position // 2**(level.level - 1)) % 2 == 1, level.offset + position // 2**level.level


def _weight(w_ref, column, reads):
    """[C, 1] fp32 column `column` of the weights, 0 where the chunk does not read."""
    return jnp.where(reads, w_ref[:, pl.ds(column, 1)].astype(jnp.float32), 0.0)


def _read_kernel(q_ref, gc_ref, w_ref, s_ref, *refs, levels, dtype):
    """o [C, BV] of one chunk and d_v block: q_ref [C, DK], gc_ref [C, 1], w_ref [C, MP], s_ref [S, DK, BV]."""
    o_ref = refs[-1]
    n = pl.program_id(1)
    q = q_ref[...]
    acc = jnp.zeros(o_ref.shape, jnp.float32)
    for i, level in enumerate(levels):
        reads, entry = _reads(n, level)
        acc += dot(q, s_ref[entry], dtype) * _weight(w_ref, i, reads)
    o_ref[...] = (acc * exp_nonpositive(gc_ref[...])).astype(o_ref.dtype)


def _token_grad_kernel(q_ref, gc_ref, w_ref, s_ref, do_ref, *refs, levels, dtype):
    """dq [C, DK], dw [C, MP] and dGc [C, 1] of one chunk: s_ref [S, DK, DV], do_ref [C, DV]."""
    dq_ref, dw_ref, dgc_ref = refs[-3:]
    n = pl.program_id(1)
    q, do = q_ref[...], do_ref[...]
    e = exp_nonpositive(gc_ref[...])
    column = jax.lax.broadcasted_iota(jnp.int32, (1, dw_ref.shape[1]), 1)
    dq = jnp.zeros(dq_ref.shape, jnp.float32)
    dw = jnp.zeros(dw_ref.shape, jnp.float32)
    dgc = jnp.zeros(dgc_ref.shape, jnp.float32)
    for i, level in enumerate(levels):
        reads, entry = _reads(n, level)
        state = s_ref[entry]
        weight = _weight(w_ref, i, reads)
        dw_level = jnp.where(reads, e * jnp.sum(dot(q, state, dtype) * do.astype(jnp.float32), axis=1,
                                                keepdims=True), 0.0)
        dw = jnp.where(column == i, dw_level, dw)
        dgc += weight * dw_level
        dq += dot(do, state, dtype, trans_b=True) * (e * weight)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dw_ref[...] = dw
    dgc_ref[...] = dgc


def _state_grad_kernel(q_ref, gc_ref, w_ref, do_ref, *refs, levels, num_chunks, chunk, dtype):
    """dS [DK, BV] of one block_states entry: q_ref [T, DK], gc_ref [T, 1], w_ref [T, MP], do_ref [T, BV] (the
    whole sequence; the loop reads the chunks of the odd block that read this entry)."""
    ds_ref = refs[-1]
    j = pl.program_id(1)
    # Which level and group entry j is (levels in order of their offsets), from static tables.
    column = jnp.int32(0)
    first, stop = jnp.int32(0), jnp.int32(0)
    for i, level in enumerate(levels):
        size = 2**level.level
        start = (j - level.offset) * size + size // 2 - level.front  # the odd block's first chunk
        mine = j >= level.offset
        column = jnp.where(mine, i, column)
        first = jnp.where(mine, jnp.maximum(start, 0), first)
        stop = jnp.where(mine, jnp.minimum(start + size // 2, num_chunks), stop)
    columns = jax.lax.broadcasted_iota(jnp.int32, (1, w_ref.shape[1]), 1)

    def body(n, acc):
        rows = pl.ds(n * chunk, chunk)
        weight = jnp.sum(jnp.where(columns == column, w_ref[rows, :].astype(jnp.float32), 0.0), axis=1,
                         keepdims=True)
        scaled = q_ref[rows, :].astype(jnp.float32) * (weight * exp_nonpositive(gc_ref[rows, :]))
        return acc + dot(scaled, do_ref[rows, :], dtype, trans_a=True)

    ds_ref[...] = jax.lax.fori_loop(first, jnp.maximum(first, stop), body, jnp.zeros(ds_ref.shape, jnp.float32))


# ---------------------------------------------------------------------------------------------------------------
# Launching the kernels


class _Layout(NamedTuple):
    batch: int
    seq_len: int
    heads: int
    d_k: int
    d_v: int
    num_weights: int  # M, the caller's weight columns (levels above the chunk)
    entries: int  # S, the block_states entries
    chunk: int
    first_chunk: int
    dk_pad: int
    dv_pad: int
    w_pad: int
    dtype: type
    shared_q: bool  # q has one head that every head reads (Mamba-2's C): [B, T, DK] rows

    @property
    def sequences(self):
        return self.batch * self.heads

    @property
    def t_pad(self):  # (the sequence is whole chunks already)
        return self.seq_len

    @property
    def n_chunks(self):
        return self.seq_len // self.chunk

    @property
    def levels(self):
        return tuple(level_groups(self.first_chunk, self.n_chunks))

    @property
    def block_v(self):
        return min(self.dv_pad, MAX_BLOCK)


def _layout(q, weights, block_states, chunk, first_chunk):
    batch, seq_len, heads, _ = weights.shape
    d_k = q.shape[-1]
    return _Layout(batch, seq_len, heads, d_k, block_states.shape[-1], weights.shape[-1], block_states.shape[1], chunk,
                   first_chunk, padded_width(d_k), padded_width(block_states.shape[-1]),
                   padded_width(weights.shape[-1]), operand_dtype(q, q, q),
                   q.shape[2] != heads)


class _Inputs(NamedTuple):
    q: jax.Array  # [G, T, DK] in lay.dtype ([B, T, DK] with shared_q)
    gc: jax.Array  # [G, T, 1] fp32
    w: jax.Array  # [G, T, MP] fp32
    s: jax.Array  # [G, S, DK, DV] fp32


def _inputs(q, g_cum, weights, block_states, lay: _Layout) -> _Inputs:
    s = jnp.moveaxis(block_states, 2, 1).reshape(lay.sequences, lay.entries, lay.d_k, lay.d_v)
    s = pad_axis(pad_axis(s.astype(jnp.float32), 2, lay.dk_pad, 0.0), 3, lay.dv_pad, 0.0)
    q_rows = shared_rows if lay.shared_q else to_rows
    return _Inputs(q_rows(q, lay, lay.dk_pad, lay.dtype), to_rows(g_cum[..., None], lay, 1, jnp.float32),
                   to_rows(weights, lay, lay.w_pad, jnp.float32), s)


def _chunk_spec(c, width):
    """[C, width] block of a [G, T, width] array on a (sequence, chunk, ...) grid."""
    return pl.BlockSpec((None, c, width), lambda s, n, *_: (s, n, 0))


def _q_row(lay: _Layout):
    """Sequence s's row of q: its own, or with shared_q its batch row's one head."""
    return (lambda s: s // lay.heads) if lay.shared_q else (lambda s: s)


def _read(x: _Inputs, lay: _Layout, cfg: ChunkConfig):
    g, c, bv, row = lay.sequences, lay.chunk, lay.block_v, _q_row(lay)
    in_specs = [pl.BlockSpec((None, c, lay.dk_pad), lambda s, n, j: (row(s), n, 0)), _chunk_spec(c, 1),
                _chunk_spec(c, lay.w_pad),
                pl.BlockSpec((None, lay.entries, lay.dk_pad, bv), lambda s, n, j: (s, 0, 0, j))]
    out_spec = pl.BlockSpec((None, c, bv), lambda s, n, j: (s, n, j))
    kernel = functools.partial(_read_kernel, levels=lay.levels, dtype=lay.dtype)
    (o,) = call(kernel, cfg, "loglinear_levels_read", (g, lay.n_chunks, lay.dv_pad // bv), [x.q, x.gc, x.w, x.s],
                in_specs, [out_spec], [jax.ShapeDtypeStruct((g, lay.t_pad, lay.dv_pad), jnp.float32)])
    return o


def _token_grads(x: _Inputs, do, q_dtype, lay: _Layout, cfg: ChunkConfig):
    g, c, row = lay.sequences, lay.chunk, _q_row(lay)
    in_specs = [pl.BlockSpec((None, c, lay.dk_pad), lambda s, n: (row(s), n, 0)), _chunk_spec(c, 1),
                _chunk_spec(c, lay.w_pad),
                pl.BlockSpec((None, lay.entries, lay.dk_pad, lay.dv_pad), lambda s, n: (s, 0, 0, 0)),
                _chunk_spec(c, lay.dv_pad)]
    out_specs = [_chunk_spec(c, lay.dk_pad), _chunk_spec(c, lay.w_pad), _chunk_spec(c, 1)]
    out_shape = [jax.ShapeDtypeStruct((g, lay.t_pad, lay.dk_pad), q_dtype),
                 jax.ShapeDtypeStruct((g, lay.t_pad, lay.w_pad), jnp.float32),
                 jax.ShapeDtypeStruct((g, lay.t_pad, 1), jnp.float32)]
    kernel = functools.partial(_token_grad_kernel, levels=lay.levels, dtype=lay.dtype)
    return call(kernel, cfg, "loglinear_levels_token_grads", (g, lay.n_chunks), [x.q, x.gc, x.w, x.s, do],
                in_specs, out_specs, out_shape)


def _state_grads(x: _Inputs, do, lay: _Layout, cfg: ChunkConfig):
    g, t, bv, row = lay.sequences, lay.t_pad, lay.block_v, _q_row(lay)
    whole = lambda width: pl.BlockSpec((None, t, width), lambda s, j, p: (s, 0, 0))  # noqa: E731
    in_specs = [pl.BlockSpec((None, t, lay.dk_pad), lambda s, j, p: (row(s), 0, 0)), whole(1), whole(lay.w_pad),
                pl.BlockSpec((None, t, bv), lambda s, j, p: (s, 0, p))]
    out_spec = pl.BlockSpec((None, None, lay.dk_pad, bv), lambda s, j, p: (s, j, 0, p))
    kernel = functools.partial(_state_grad_kernel, levels=lay.levels, num_chunks=lay.n_chunks, chunk=lay.chunk,
                               dtype=lay.dtype)
    (ds,) = call(kernel, cfg, "loglinear_levels_state_grads", (g, lay.entries, lay.dv_pad // bv),
                 [x.q, x.gc, x.w, do], in_specs, [out_spec],
                 [jax.ShapeDtypeStruct((g, lay.entries, lay.dk_pad, lay.dv_pad), jnp.float32)])
    return ds


# ---------------------------------------------------------------------------------------------------------------
# The custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _levels_read(q, g_cum, weights, block_states, cfg: ChunkConfig, first_chunk: int):
    lay = _layout(q, weights, block_states, cfg.chunk_size, first_chunk)
    return from_rows(_read(_inputs(q, g_cum, weights, block_states, lay), lay, cfg), lay, lay.d_v)


def _levels_read_fwd(q, g_cum, weights, block_states, cfg: ChunkConfig, first_chunk: int):
    # Saved: the inputs only (per-token work is recomputed from them).
    return _levels_read(q, g_cum, weights, block_states, cfg, first_chunk), (q, g_cum, weights, block_states)


def _levels_read_bwd(cfg: ChunkConfig, first_chunk: int, saved, d_out):
    q, g_cum, weights, block_states = saved
    lay = _layout(q, weights, block_states, cfg.chunk_size, first_chunk)
    x = _inputs(q, g_cum, weights, block_states, lay)
    do = to_rows(d_out, lay, lay.dv_pad, lay.dtype)
    dq, dw, dgc = _token_grads(x, do, q.dtype, lay, cfg)
    ds = _state_grads(x, do, lay, cfg)[:, :, :lay.d_k, :lay.d_v]
    ds = jnp.moveaxis(ds.reshape(lay.batch, lay.heads, lay.entries, lay.d_k, lay.d_v), 1, 2)
    dq = head_summed(dq, lay, lay.d_k).astype(q.dtype) if lay.shared_q else from_rows(dq, lay, lay.d_k)
    return (dq, from_rows(dgc, lay, 1)[..., 0].astype(g_cum.dtype),
            from_rows(dw, lay, lay.num_weights).astype(weights.dtype), ds.astype(block_states.dtype))


_levels_read.defvjp(_levels_read_fwd, _levels_read_bwd)


def _check_arguments(q, g_cum, weights, block_states, chunk_size, first_chunk):
    if q.ndim != 4:
        raise ValueError(f"q: expected [B, T, H, d_k], got shape {q.shape}")
    batch, seq_len, q_heads, d_k = q.shape
    heads = g_cum.shape[2] if g_cum.ndim == 3 else q_heads
    if q_heads not in (1, heads):
        raise ValueError(f"q: expected {heads} heads (g_cum's) or one that every head reads, got shape {q.shape}")
    if q.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"q: expected float32 or bfloat16, got {q.dtype}")
    if chunk_size < MIN_CHUNK or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size: expected a power of 2 >= {MIN_CHUNK}, got {chunk_size}")
    if seq_len == 0 or seq_len % chunk_size:
        raise ValueError(f"q: the sequence (axis 1, {seq_len}) must be a positive whole number of chunks of "
                         f"{chunk_size}")
    if first_chunk < 0:
        raise ValueError(f"first_chunk: must be >= 0, got {first_chunk}")
    levels = level_groups(first_chunk, seq_len // chunk_size)
    if g_cum.shape[:2] != q.shape[:2] or g_cum.ndim != 3:
        raise ValueError(f"g_cum: expected [B, T, H] with B, T = {q.shape[:2]}, got shape {g_cum.shape}")
    if weights.shape != (batch, seq_len, heads, len(levels)):
        raise ValueError(f"weights: expected [B, T, H, M] with M = {len(levels)} levels above the chunk, "
                         f"{(batch, seq_len, heads, len(levels))}, got shape {weights.shape}")
    entries = sum(level.groups for level in levels)
    if block_states.ndim != 5 or block_states.shape[:4] != (batch, entries, heads, d_k):
        raise ValueError(f"block_states: expected [B, S, H, d_k, d_v] with S = {entries} entries "
                         f"(level_groups), got shape {block_states.shape}")


def loglinear_levels_read(q, g_cum, weights, block_states, *, chunk_size: int, first_chunk: int = 0,
                          interpret: bool = False, poison_output: bool = False, num_warps: int | None = None):
    """What the queries read from the Fenwick levels above their chunk (see the module docstring).

    Args:
      q: `[B, T, H, d_k]`, or `[B, T, 1, d_k]`: one head that every head reads (its gradient the sum over the
        heads); float32 or bfloat16 (bf16 matrix-product operands with fp32 accumulation); T whole chunks.
      g_cum: `[B, T, H]` Gc, the log decay summed from each chunk's start (inclusive), <= 0.
      weights: `[B, T, H, M]` fp32: column i weighs level levels[i] (`level_groups(first_chunk, T / C)`); read only
        where the token's chunk reads at that level.
      block_states: `[B, S, H, d_k, d_v]`: the summed states, entry offset + group for each level (`level_groups`).
      chunk_size: C, a power of 2 >= 16.
      first_chunk: the absolute index of the first chunk (the grid the levels pair blocks on).
      interpret: run the kernels in interpret mode (any device, the CPU included).
      poison_output: start the kernels' output buffers as NaN (tests: an element a kernel fails to write shows).
      num_warps: Triton warps per program (GPU); None: 4 with bf16 q, 8 with fp32 (chunk_common.DEFAULT_WARPS).

    Returns:
      o `[B, T, H, d_v]` fp32. Differentiable in q, g_cum, weights and block_states.
    """
    _check_arguments(q, g_cum, weights, block_states, chunk_size, first_chunk)
    cfg = ChunkConfig(int(chunk_size), default_num_warps(num_warps, q, q, q), bool(interpret), bool(poison_output))
    return _levels_read(q, g_cum.astype(jnp.float32), weights.astype(jnp.float32), block_states, cfg,
                        int(first_chunk))
