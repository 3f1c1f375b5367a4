"""The levels above the chunk of the log-linear Gated DeltaNet by `kernels.loglinear_delta_levels` (impl="pallas"
of `loglinear_gated_delta`): the two walks over the chunks and the backward pass's per-chunk gradients are Pallas
kernels (Triton on GPUs, interpret mode elsewhere); the per-chunk pieces (W, U, K~, gamma, Q~) come from
`ramjax.ops.gated_delta.chunked` in jax.numpy, which differentiates them.

What it replaces in impl="chunked": for each level, the source blocks' summed states as a tree of (P, U) maps and
the exclusive prefix products of the chunk transitions P [d_k, d_k] over the reading block. Here a state crosses a
chunk as gamma S + K~^T ((1 - read) U - W S) (kernels/loglinear_delta_levels.py), so no d_k x d_k matrix is formed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.chunk_common import ChunkConfig, default_num_warps, padded_width
from kernels.loglinear_delta_levels import level_chunk_grads, level_flags, level_walk, level_walk_grads
from kernels.shapes import pad_axis
from ramjax.ops.loglinear.fenwick import levels_above_chunk

# The backward pass's per-chunk gradients (of W, U, K~, gamma, Q~, lambda) by one Pallas kernel per (sequence, chunk)
# summing over the levels (True), or by batched products in jax.numpy (False), which form several [levels x tokens x
# d_v] fp32 intermediates. On an H200 (experiments/results/bench_models.md, 2026-12-02 23:07) the kernel's step was
# 296 ms at 4096 x 8 against 172 ms with the products, but 12.2 GB against 19.5 GB at peak; XLA's chunked form (impl
# "chunked", what "auto" picks) took 178 ms and 13.2 GB. The kernel stays the default as the least-memory path.
CHUNK_GRADS_KERNEL = True


def _to_rows(x, width):
    """[B, N, H, C, d] -> [B * H, N * C, width], zero-padded."""
    batch, chunks, heads, chunk, d = x.shape
    x = jnp.transpose(x, (0, 2, 1, 3, 4)).reshape(batch * heads, chunks * chunk, d)
    return pad_axis(x, 2, width, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _levels(ke, w, u, q, gamma, lam, cfg: ChunkConfig):
    (reads,) = level_walk(ke, w, u, q, gamma, lam, cfg, store_states=False)
    return reads.sum(axis=1)


def _levels_fwd(ke, w, u, q, gamma, lam, cfg: ChunkConfig):
    # Saved: the inputs only; the backward pass reruns the forward walk for the chunk-start states.
    return _levels(ke, w, u, q, gamma, lam, cfg), (ke, w, u, q, gamma, lam)


def _levels_bwd(cfg: ChunkConfig, saved, d_out):
    ke, w, u, q, gamma, lam = saved
    sequences, t_pad, _ = ke.shape
    chunk = cfg.chunk_size
    n = t_pad // chunk
    (states,) = level_walk(ke, w, u, q, gamma, lam, cfg, store_reads=False)  # S_in [G, M, N, DK, DV]
    d_out = d_out.astype(jnp.float32)
    d_states = level_walk_grads(ke, w, q, gamma, lam, d_out, cfg)  # dS_out [G, M, N, DK, DV]
    if CHUNK_GRADS_KERNEL:
        d_ke, d_w, d_q, d_u, d_gamma, d_lam = level_chunk_grads(ke, w, u, q, lam, d_out, states, d_states, cfg)
        return (d_ke.astype(ke.dtype), d_w.astype(w.dtype), d_u.astype(u.dtype), d_q.astype(q.dtype),
                d_gamma.astype(gamma.dtype), d_lam.astype(lam.dtype))
    _, read = level_flags(n)
    read = read[..., 0]  # [M, N]
    write = 1.0 - read

    def chunks(x):  # [G, T_pad, d] -> [G, N, C, d] fp32
        return x.astype(jnp.float32).reshape(sequences, n, chunk, x.shape[-1])

    ke_c, w_c, u_c, q_c, do_c = map(chunks, (ke, w, u, q, d_out))
    lam_c = lam[..., 0].reshape(sequences, lam.shape[1], n, chunk)  # [G, M, N, C]
    # S_out = gamma S_in + K~^T V', V' = (1 - read) U - W S_in.
    states, d_states = states.astype(jnp.float32), d_states.astype(jnp.float32)
    d_vn = jnp.einsum("gnck,gmnkv->gmncv", ke_c, d_states)
    vn = write[None, :, :, None, None] * u_c[:, None] - jnp.einsum("gnck,gmnkv->gmncv", w_c, states)
    d_ke = jnp.einsum("gmncv,gmnkv->gnck", vn, d_states)
    d_u = jnp.einsum("mn,gmncv->gncv", write, d_vn)
    d_w = -jnp.einsum("gmncv,gmnkv->gnck", d_vn, states)
    d_gamma = jnp.einsum("gmnkv,gmnkv->gn", d_states, states)[..., None]
    # r_m = read lam_m (Q~ S_in).
    weight = lam_c * read[None, :, :, None]  # [G, M, N, C]
    d_q = jnp.einsum("gmnc,gncv,gmnkv->gnck", weight, do_c, states)
    q_reads = jnp.einsum("gnck,gmnkv->gmncv", q_c, states)
    d_lam = read[None, :, :, None] * jnp.einsum("gncv,gmncv->gmnc", do_c, q_reads)

    def rows(x, like):
        return x.reshape(like.shape).astype(like.dtype)

    return (rows(d_ke, ke), rows(d_w, w), rows(d_u, u), rows(d_q, q), rows(d_gamma, gamma),
            d_lam.reshape(lam.shape).astype(lam.dtype))


_levels.defvjp(_levels_fwd, _levels_bwd)


def levels_above_chunk_pallas(q_eff, w, u, to_end, gamma_end, level_weights, chunk_bits: int,
                              operand_dtype: str = "float32"):
    """What every token reads from the Fenwick levels above its chunk, for a sequence starting at position 0.
    The kernels' matrix products take `operand_dtype` operands (q_eff, W, U, K~ rounded to it) and accumulate in
    float32; states, decays and weights are float32.

    q_eff, w, to_end: [B, N, H, C, dk]; u: [B, N, H, C, dv] (`ramjax.ops.gated_delta.chunked.ChunkPieces`);
    gamma_end [B, N, H]; level_weights [B, N, C, H, L] (lambda per token and level; level chunk_bits + m is level m
    above the chunk). Returns float32 [B, N, C, H, dv]."""
    batch, chunks, heads, chunk, d_k = q_eff.shape
    d_v = u.shape[-1]
    levels = len(levels_above_chunk(0, chunks))
    if levels == 0:
        return jnp.zeros((batch, chunks, chunk, heads, d_v), jnp.float32)
    dk_pad, dv_pad = padded_width(d_k), padded_width(d_v)
    dtype = jnp.dtype(operand_dtype)
    q, ke, w, u = (_to_rows(x, width).astype(dtype) for x, width in ((q_eff, dk_pad), (to_end, dk_pad), (w, dk_pad),
                                                                    (u, dv_pad)))
    cfg = ChunkConfig(chunk, default_num_warps(None, q, ke, u), jax.default_backend() != "gpu", False)
    if level_weights.shape[-1] < chunk_bits + 1 + levels:
        raise ValueError(f"level_weights: {level_weights.shape[-1]} levels, but {chunks} chunks of {chunk} need "
                         f"{chunk_bits + 1 + levels}")
    lam = level_weights[..., chunk_bits + 1: chunk_bits + 1 + levels]  # [B, N, C, H, M]
    lam = jnp.transpose(lam, (0, 3, 4, 1, 2)).reshape(batch * heads, levels, chunks * chunk, 1)
    gamma = jnp.transpose(gamma_end, (0, 2, 1)).reshape(batch * heads, chunks, 1).astype(jnp.float32)
    out = _levels(ke, w, u, q, gamma, lam.astype(jnp.float32), cfg)
    out = out[:, :, :d_v].reshape(batch, heads, chunks, chunk, d_v)
    return jnp.transpose(out, (0, 2, 3, 1, 4))
