"""The in-chunk part of log-linear attention over a scalar decay (the Mamba-2 base; docs/loglinear.md section 2) as
Pallas kernels (Triton lowering), with a custom VJP whose backward pass is a Pallas kernel too.

Per batch b and head h, in chunks of C tokens aligned to absolute positions that are multiples of C, with Gc_t the
log decay summed from the chunk's start (inclusive, <= 0 and non-increasing), lambda_t the level-weight row of token
t and, for t >= s in the same chunk,

    H[t, s] = lambda_t[lvl(t, s)] * D[t, s],    D[t, s] = exp(Gc_t - Gc_s) (s < t),  D[t, t] = 1,
    lvl(t, s) = 0 if s == t else bit_length((t mod C) XOR (s mod C))      (levels 0 .. log2 C)

the kernels compute O = P V with P = H * (Q K^T) (0 above the diagonal). The levels above the chunk, which read
other chunks' summed states, are not here (ramjax.ops.loglinear_attention adds them in jax.numpy).

Backward, with dP = dO V^T and S = Q K^T:
    dV = P^T dO,   dS = dP * H,   dQ = dS K,   dK = dS^T Q,
    dlambda_t[l] = sum_s (dP * D * S)[t, s] [lvl(t, s) = l],
    dGc_t = sum_s E[t, s] - sum_t' E[t', t],   E = dP * H * S on the strict lower triangle
(the diagonal's D = exp(0) is a constant: it has no Gc-gradient, rather than two opposite terms that cancel only up
to rounding).

Kernels (G = B * H sequences; T padded to whole chunks with tokens that write nothing, d_k and d_v to powers of 2
>= 16, the level weights' in-chunk columns (log2 C + 1 of them) to a power of 2 >= 16 with zeros):
  _output_kernel    grid (G, chunks, d_v blocks): O of one chunk and d_v block;
  _gradient_kernel  grid (G, chunks): dq, dk, dv, dGc and dlambda of one chunk, looping over d_v blocks for dP and
                    dV.

Numerics: the [C, C] decay matrix is formed directly from masked differences Gc_t - Gc_s <= 0 (the minimum with 0
guards against rounding; nothing positive is ever exponentiated), so C x C products at the chunk's full width are
safe at any decay strength. The levels are computed in the kernel from the row and column indices. Matrix products
take bf16 operands where q, k and v all are bf16 (fp32 accumulation; P and dS are rounded to bf16 before they
multiply), IEEE fp32 products otherwise; decays, level weights and their gradients are fp32.
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
MAX_CHUNK = 64  # [C, C] fp32 matrices in registers: a dozen at C = 64
MAX_BLOCK = 64  # d_v block width


# ---------------------------------------------------------------------------------------------------------------
# Pieces the kernels share


def _iotas(c):
    """[c, 1] row and [1, c] column indices of a [c, c] block."""
    return jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0), jax.lax.broadcasted_iota(jnp.int32, (1, c), 1)


def _levels(t, s, chunk):
    """[C, C] int32 lvl(t, s): 0 where s == t, else bit_length(t XOR s) (t, s < C: at most log2 C)."""
    x = jnp.bitwise_xor(t, s)
    lvl = jnp.zeros(x.shape, jnp.int32)
    bit = 1
    while bit < chunk:
        lvl += jnp.where(x >= bit, 1, 0)
        bit *= 2
    return lvl


def _decays(gc, t, s):
    """[C, C] D[t, s] = exp(Gc_t - Gc_s) below the diagonal, 1 on it, 0 above; gc [C, 1] fp32."""
    below = exp_nonpositive(gc - gc.reshape(1, gc.shape[0]))
    return jnp.where(s < t, below, jnp.where(s == t, 1.0, 0.0))


def _level_weights(lam_ref, lvl, n_levels):
    """[C, C] fp32 lambda_t[lvl(t, s)]: lam_ref [C, >= n_levels]."""
    weights = jnp.zeros(lvl.shape, jnp.float32)
    for level in range(n_levels):
        weights = jnp.where(lvl == level, lam_ref[:, level].astype(jnp.float32)[:, None], weights)
    return weights


class _Chunk(NamedTuple):
    """What both kernels form for one chunk, [C, C] fp32 each."""
    lvl: jax.Array  # the Fenwick level of each pair
    decays: jax.Array  # D (0 above the diagonal)
    weights: jax.Array  # H = lambda[lvl] * D
    scores: jax.Array  # S = Q K^T


def _chunk(q_ref, k_ref, gc_ref, lam_ref, n_levels, dtype):
    c = q_ref.shape[0]
    t, s = _iotas(c)
    lvl = _levels(t, s, c)
    decays = _decays(gc_ref[...], t, s)
    weights = decays * _level_weights(lam_ref, lvl, n_levels)
    return _Chunk(lvl, decays, weights, dot(q_ref[...], k_ref[...], dtype, trans_b=True))


# ---------------------------------------------------------------------------------------------------------------
# The kernels


def _output_kernel(q_ref, k_ref, v_ref, gc_ref, lam_ref, *refs, n_levels, dtype):
    """O [C, BV] of one chunk and d_v block: q_ref, k_ref [C, DK], v_ref [C, BV], gc_ref [C, 1], lam_ref [C, LP]."""
    o_ref = refs[-1]  # (with poison_output, the aliased NaN buffer comes first)
    x = _chunk(q_ref, k_ref, gc_ref, lam_ref, n_levels, dtype)
    o_ref[...] = dot(x.weights * x.scores, v_ref[...], dtype).astype(o_ref.dtype)


def _gradient_kernel(q_ref, k_ref, v_ref, gc_ref, lam_ref, do_ref, *refs, n_levels, n_vblocks, block_v, dtype):
    """dq, dk [C, DK], dv [C, DV], dGc [C, 1] and dlambda [C, LP] of one chunk: q_ref, k_ref [C, DK]; v_ref,
    do_ref [C, DV]; gc_ref [C, 1]; lam_ref [C, LP]."""
    dq_ref, dk_ref, dv_ref, dgc_ref, dlam_ref = refs[-5:]
    c = q_ref.shape[0]
    t, s = _iotas(c)
    x = _chunk(q_ref, k_ref, gc_ref, lam_ref, n_levels, dtype)
    p = x.weights * x.scores
    dp = jnp.zeros((c, c), jnp.float32)
    for j in range(n_vblocks):
        cols = pl.ds(j * block_v, block_v)
        do = do_ref[:, cols]
        dp += dot(do, v_ref[:, cols], dtype, trans_b=True)
        dv_ref[:, cols] = dot(p, do, dtype, trans_a=True).astype(dv_ref.dtype)
    ds = dp * x.weights
    dq_ref[...] = dot(ds, k_ref[...], dtype).astype(dq_ref.dtype)
    dk_ref[...] = dot(ds, q_ref[...], dtype, trans_a=True).astype(dk_ref.dtype)
    dh = dp * x.scores  # the gradient of H
    e = jnp.where(s < t, dh * x.weights, 0.0)  # of the exponents Gc_t - Gc_s
    dgc_ref[...] = jnp.sum(e, axis=1)[:, None] - jnp.sum(e, axis=0).reshape(-1)[:, None]
    dlam_pairs = dh * x.decays  # of lambda_t[lvl(t, s)], 0 above the diagonal
    column = jax.lax.broadcasted_iota(jnp.int32, (1, dlam_ref.shape[1]), 1)
    dlam = jnp.zeros(dlam_ref.shape, jnp.float32)
    for level in range(n_levels):
        per_token = jnp.sum(jnp.where(x.lvl == level, dlam_pairs, 0.0), axis=1)[:, None]
        dlam = jnp.where(column == level, per_token, dlam)
    dlam_ref[...] = dlam


# ---------------------------------------------------------------------------------------------------------------
# Launching the kernels


class _Layout(NamedTuple):
    """Sizes of one problem: the caller's and the padded ones the kernels see."""
    batch: int
    seq_len: int
    heads: int
    d_k: int
    d_v: int
    num_level: int  # the caller's level-weight columns
    chunk: int
    t_pad: int  # whole chunks
    dk_pad: int  # powers of 2 >= 16
    dv_pad: int
    lam_pad: int  # the in-chunk level columns, padded to a power of 2 >= 16
    dtype: type  # matrix-product operands: bfloat16 where q, k and v all are, else float32
    shared_qk: bool  # q and k have one head that every head of v reads (Mamba-2's C and B): [B, T_pad, DK] rows

    @property
    def sequences(self):
        return self.batch * self.heads

    @property
    def n_chunks(self):
        return self.t_pad // self.chunk

    @property
    def chunk_levels(self):  # levels 0 .. log2 C
        return self.chunk.bit_length()

    @property
    def used_levels(self):  # the caller's columns the kernels read
        return min(self.num_level, self.chunk_levels)

    @property
    def block_v(self):
        return min(self.dv_pad, MAX_BLOCK)


def _layout(q, k, v, level_weights, chunk):
    batch, seq_len, heads, d_v = v.shape
    d_k = q.shape[-1]
    return _Layout(batch, seq_len, heads, d_k, d_v, level_weights.shape[-1], chunk, -(-seq_len // chunk) * chunk,
                   padded_width(d_k), padded_width(d_v), padded_width(chunk.bit_length()), operand_dtype(q, k, v),
                   q.shape[2] != heads)


class _Inputs(NamedTuple):
    q: jax.Array  # [G, T_pad, DK] in lay.dtype ([B, T_pad, DK] with shared_qk)
    k: jax.Array  # [G, T_pad, DK] ([B, T_pad, DK])
    v: jax.Array  # [G, T_pad, DV]
    gc: jax.Array  # [G, T_pad, 1] fp32
    lam: jax.Array  # [G, T_pad, LP] fp32: the in-chunk level weights, zeros past them


def _inputs(q, k, v, g_cum, level_weights, lay: _Layout) -> _Inputs:
    lam = level_weights[..., :lay.used_levels]
    qk_rows = shared_rows if lay.shared_qk else to_rows
    return _Inputs(qk_rows(q, lay, lay.dk_pad, lay.dtype), qk_rows(k, lay, lay.dk_pad, lay.dtype),
                   to_rows(v, lay, lay.dv_pad, lay.dtype), to_rows(g_cum[..., None], lay, 1, jnp.float32),
                   to_rows(lam, lay, lay.lam_pad, jnp.float32))


def _chunk_spec(c, width):
    """[C, width] block of a [G, T_pad, width] array on a (sequence, chunk, ...) grid."""
    return pl.BlockSpec((None, c, width), lambda s, n, *_: (s, n, 0))


def _qk_spec(lay: _Layout):
    """q's and k's [C, DK] block: their sequence's, or with shared_qk the batch row's one head."""
    if lay.shared_qk:
        return pl.BlockSpec((None, lay.chunk, lay.dk_pad), lambda s, n, *_: (s // lay.heads, n, 0))
    return _chunk_spec(lay.chunk, lay.dk_pad)


def _outputs(x: _Inputs, out_dtype, lay: _Layout, cfg: ChunkConfig):
    """O [G, T_pad, DV] in out_dtype."""
    g, c, bv = lay.sequences, lay.chunk, lay.block_v
    v_block = pl.BlockSpec((None, c, bv), lambda s, n, j: (s, n, j))
    in_specs = [_qk_spec(lay), _qk_spec(lay), v_block, _chunk_spec(c, 1), _chunk_spec(c, lay.lam_pad)]
    out_shape = [jax.ShapeDtypeStruct((g, lay.t_pad, lay.dv_pad), out_dtype)]
    kernel = functools.partial(_output_kernel, n_levels=lay.chunk_levels, dtype=lay.dtype)
    (o,) = call(kernel, cfg, "loglinear_chunk_outputs", (g, lay.n_chunks, lay.dv_pad // bv),
                 [x.q, x.k, x.v, x.gc, x.lam], in_specs, [v_block], out_shape)
    return o


def _gradients(x: _Inputs, do, dtypes, lay: _Layout, cfg: ChunkConfig):
    """dq, dk [G, T_pad, DK] (per sequence, also with shared_qk), dv [G, T_pad, DV] (in dtypes), dGc [G, T_pad, 1]
    and dlambda [G, T_pad, LP] fp32."""
    g, c, dk, dv = lay.sequences, lay.chunk, lay.dk_pad, lay.dv_pad
    chunk_k, chunk_v, column, lam = (_chunk_spec(c, width) for width in (dk, dv, 1, lay.lam_pad))
    q_dtype, k_dtype, v_dtype = dtypes
    out_shape = [jax.ShapeDtypeStruct((g, lay.t_pad, dk), q_dtype), jax.ShapeDtypeStruct((g, lay.t_pad, dk), k_dtype),
                 jax.ShapeDtypeStruct((g, lay.t_pad, dv), v_dtype),
                 jax.ShapeDtypeStruct((g, lay.t_pad, 1), jnp.float32),
                 jax.ShapeDtypeStruct((g, lay.t_pad, lay.lam_pad), jnp.float32)]
    kernel = functools.partial(_gradient_kernel, n_levels=lay.chunk_levels, n_vblocks=dv // lay.block_v,
                               block_v=lay.block_v, dtype=lay.dtype)
    return call(kernel, cfg, "loglinear_chunk_grads", (g, lay.n_chunks), [x.q, x.k, x.v, x.gc, x.lam, do],
                 [_qk_spec(lay), _qk_spec(lay), chunk_v, column, lam, chunk_v],
                 [chunk_k, chunk_k, chunk_v, column, lam], out_shape)


# ---------------------------------------------------------------------------------------------------------------
# The custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _intra_chunk(q, k, v, g_cum, level_weights, cfg: ChunkConfig, out_dtype):
    lay = _layout(q, k, v, level_weights, cfg.chunk_size)
    o = _outputs(_inputs(q, k, v, g_cum, level_weights, lay), out_dtype, lay, cfg)
    return from_rows(o, lay, lay.d_v)


def _intra_chunk_fwd(q, k, v, g_cum, level_weights, cfg: ChunkConfig, out_dtype):
    # Saved: the inputs only; the backward kernel recomputes the [C, C] weights and scores.
    return _intra_chunk(q, k, v, g_cum, level_weights, cfg, out_dtype), (q, k, v, g_cum, level_weights)


def _intra_chunk_bwd(cfg: ChunkConfig, out_dtype, saved, d_out):
    q, k, v, g_cum, level_weights = saved
    lay = _layout(q, k, v, level_weights, cfg.chunk_size)
    x = _inputs(q, k, v, g_cum, level_weights, lay)
    do = to_rows(d_out, lay, lay.dv_pad, lay.dtype)
    dq, dk, dv, dgc, dlam = _gradients(x, do, (q.dtype, k.dtype, v.dtype), lay, cfg)
    dlam = pad_axis(from_rows(dlam, lay, lay.used_levels), 3, lay.num_level, 0.0)  # no gradient past the chunk
    if lay.shared_qk:  # one head read by all: its gradient is the sum of theirs
        dq, dk = (head_summed(grad, lay, lay.d_k).astype(like.dtype) for grad, like in ((dq, q), (dk, k)))
    else:
        dq, dk = from_rows(dq, lay, lay.d_k), from_rows(dk, lay, lay.d_k)
    return (dq, dk, from_rows(dv, lay, lay.d_v),
            from_rows(dgc, lay, 1)[..., 0].astype(g_cum.dtype), dlam.astype(level_weights.dtype))


_intra_chunk.defvjp(_intra_chunk_fwd, _intra_chunk_bwd)


def _check_arguments(q, k, v, g_cum, level_weights, chunk_size):
    if q.ndim != 4:
        raise ValueError(f"q: expected [B, T, H, d_k], got shape {q.shape}")
    batch, seq_len, q_heads, _ = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k: expected the shape of q {q.shape}, got {k.shape}")
    if v.ndim != 4 or v.shape[:2] != q.shape[:2] or q_heads not in (1, v.shape[2]):
        raise ValueError(f"v: expected [B, T, H, d_v] = [{batch}, {seq_len}, H, d_v] with H = q's heads "
                         f"({q_heads}), or any H where q and k have one head, got shape {v.shape}")
    heads = v.shape[2]
    if g_cum.shape != v.shape[:3]:
        raise ValueError(f"g_cum: expected [B, T, H] {v.shape[:3]}, got shape {g_cum.shape}")
    if level_weights.ndim != 4 or level_weights.shape[:3] != v.shape[:3] or level_weights.shape[3] == 0:
        raise ValueError(f"level_weights: expected [B, T, H, L] = [{batch}, {seq_len}, {heads}, L >= 1], got shape "
                         f"{level_weights.shape}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"{name}: expected float32 or bfloat16, got {x.dtype}")
    for name, x in (("g_cum", g_cum), ("level_weights", level_weights)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}: expected a floating dtype, got {x.dtype}")
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size: expected a power of 2 from {MIN_CHUNK} to {MAX_CHUNK}, got {chunk_size}")
    if seq_len == 0:
        raise ValueError("q: the sequence (axis 1) is empty")


def loglinear_intra_chunk(q, k, v, g_cum, level_weights, *, chunk_size: int = 64, interpret: bool = False,
                          poison_output: bool = False, num_warps: int | None = None, out_dtype=None):
    """The in-chunk part of log-linear attention with a scalar decay (see the module docstring).

    Args:
      q, k: `[B, T, H, d_k]`, or `[B, T, 1, d_k]`: one head that every head of v reads (Mamba-2's C and B; its
        gradient is the sum over the heads); v: `[B, T, H, d_v]`; float32 or bfloat16 (bf16 matrix-product
        operands with fp32 accumulation where all three are bf16).
      g_cum: `[B, T, H]` Gc, the log decay summed from each chunk's start (inclusive): chunks of `chunk_size`
        tokens from token 0, which the caller places at an absolute position that is a multiple of chunk_size.
        Computed in float32.
      level_weights: `[B, T, H, L]` lambda; the first log2(chunk_size) + 1 columns are read (levels the chunk
        does not reach get no gradient; where L is smaller, the missing levels weigh 0). Computed in float32.
      chunk_size: C, a power of 2 from 16 to 64 (T is padded to whole chunks with tokens that write nothing).
      interpret: run the kernels in interpret mode (any device, the CPU included).
      poison_output: start the kernels' output buffers as NaN (tests: an element a kernel fails to write shows).
      num_warps: Triton warps per program (GPU); None: 4 with bf16 operands, 8 with fp32 ones
        (chunk_common.DEFAULT_WARPS).
      out_dtype: O's dtype (default: v's).

    Returns:
      O_intra `[B, T, H, d_v]`: sum over s <= t in t's chunk of lambda_t[lvl(t, s)] exp(Gc_t - Gc_s) (q_t . k_s)
      v_s. Differentiable in q, k, v, g_cum and level_weights (the backward pass is a Pallas kernel too).
    """
    _check_arguments(q, k, v, g_cum, level_weights, chunk_size)
    cfg = ChunkConfig(int(chunk_size), default_num_warps(num_warps, q, k, v), bool(interpret),
                      bool(poison_output))
    return _intra_chunk(q, k, v, g_cum, level_weights, cfg, jnp.dtype(out_dtype or v.dtype))
