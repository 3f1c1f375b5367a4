"""Log-linear attention over the Mamba-2 base: a scalar decay per head and token (docs/loglinear.md section 2).

For a query at position t and a key at s <= t (0-indexed, absolute positions), with level(t, s) the Fenwick
level of `fenwick.py`:

    o_t = sum_{s <= t} lambda_t[level(t, s)] * exp(G_t - G_s) * (q_t . k_s) * v_s,      G = cumsum(g)

Implementations (`impl=`):
  dense      the materialised T x T reference.
  recurrent  `jax.lax.scan` over time with one d_k x d_v state per level and the binary-counter merge; the
             decode form, `loglinear_step`, is its body. O(log T) state.
  chunked    the training path: a masked matmul inside each chunk of C tokens, and for each Fenwick level above
             the chunk one batched matmul of the queries of a block of chunks against the summed state of the
             block of chunks that is their bucket. O(T log T) work, O(T) memory.
  pallas     chunked with the in-chunk part (`kernels.loglinear_chunk`) and the reads from the levels above the chunk
             (`kernels.loglinear_levels`: every level in one pass over the tokens) as Pallas kernels, forward and
             backward: Triton on GPUs, interpret mode elsewhere. The chunk and block states, the initial and final
             states stay in jax.numpy. float32 or bfloat16 q, k, v; chunk_size 16, 32 or 64.
  auto       recurrent for a single token; for sequences on a GPU, pallas where the kernels take the inputs
             (measured on one H200, the bf16 LM train step: 1.18x faster than chunked at 4096 x 8 and 1.15x at
             16384 x 2, with 8-10% less memory; experiments/results/bench_models.md); chunked otherwise.

A state (`FenwickState`) holds one d_k x d_v matrix per level, relative to the last token seen, and the number of
tokens seen. `return_final_state=True` returns it; `initial_state=` continues from it, so a chunked prefill
can hand over to `loglinear_step` decoding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ramjax.ops.loglinear.fenwick import (
    IMPLS,
    FenwickState,
    block_grid,
    block_sources,
    check_args,
    checkpoint_chunked,
    chunk_grid,
    chunk_levels,
    level_index,
    level_representatives,
    levels_above_chunk,
    loglinear_init,
    merge_and_insert,
    prefix_read,
    read_levels,
    state_in_dtype,
)
from ramjax.ops.shared import numerics, per_shard

ATTENTION_IMPLS = (*IMPLS, "pallas")
PALLAS_CHUNK_SIZES = (16, 32, 64)  # what kernels.loglinear_chunk takes
# impl="pallas" reads the levels above the chunk by kernels.loglinear_levels where q (as the matrix products take
# it) has one of these dtypes, else by one batched matmul per level in XLA. Read statically for sm_90a at d 64
# (experiments/results/kernel_registers.md), the bf16 kernels do not spill at 4 warps; the fp32 ones spill 16-27 KB
# a thread even at 8. On an H200 the bf16 kernel takes 3.6 of 72 ms off the LM step at 4096 x 8
# (experiments/results/linear_ops_gpu.md, 2026-12-02 06:45).
LEVELS_KERNEL_DTYPES = frozenset({"bfloat16"})


# ----------------------------------------------------------------------------------------------------------
# The final state of impl="dense" and impl="chunked".


def _final_state(k, v, g, positions, state, num_level):
    """The per-level states after the last of these tokens, with the earlier state (if any) folded in."""
    last = positions[-1]
    # Log decay from each token to the last one: the sum of g after it.
    decay_to_end = numerics.exclusive_cumsum(g, axis=1, reverse=True)  # [B, T, H]
    onehot = jax.nn.one_hot(level_index(last, positions), num_level, dtype=k.dtype)  # [T, L]
    levels = jnp.einsum("tl,bth,bthk,bthv->bhlkv", onehot, jnp.exp(decay_to_end), k, v)
    if state is not None:
        old_levels, old_position = state
        reps = level_representatives(old_position, num_level)
        moved = jax.nn.one_hot(level_index(last, reps), num_level, dtype=k.dtype)  # [L_old, L_new]
        decay_all = jnp.exp(jnp.sum(g, axis=1))  # [B, H]
        levels = levels + jnp.einsum("ln,bh,bhlkv->bhnkv", moved, decay_all, old_levels)
        start = old_position
    else:
        start = jnp.int32(0)
    return FenwickState(levels, (start + positions.shape[0]).astype(jnp.int32))


# ----------------------------------------------------------------------------------------------------------
# impl="dense"


def _attention_dense(q, k, v, g, level_weights, initial_state):
    seq_len = q.shape[1]
    start = jnp.int32(0) if initial_state is None else initial_state.position
    positions = start + jnp.arange(seq_len, dtype=jnp.int32)
    g_cum = jnp.cumsum(g, axis=1)  # [B, T, H]
    causal = positions[:, None] >= positions[None, :]
    log_decay = jnp.where(causal[None, :, :, None], g_cum[:, :, None, :] - g_cum[:, None, :, :], -jnp.inf)
    levels = level_index(positions[:, None], positions[None, :])  # [T, S]
    lam = jnp.take_along_axis(
        level_weights, jnp.broadcast_to(levels[None, :, None, :], level_weights.shape[:3] + (seq_len,)), axis=-1
    )  # [B, T, H, S]
    weights = lam * jnp.exp(jnp.swapaxes(log_decay, 2, 3))  # [B, T, H, S]
    scores = jnp.einsum("bthk,bshk->bths", q, k)
    o = jnp.einsum("bths,bshv->bthv", weights * scores, v)
    if initial_state is not None:
        o = o + prefix_read(q * jnp.exp(g_cum)[..., None], level_weights, positions, initial_state)
    return o, positions


# ----------------------------------------------------------------------------------------------------------
# impl="recurrent" (the decode step, `loglinear_step`, is its body)


def _attention_recurrent(q, k, v, g, level_weights, initial_state):
    batch, seq_len, heads, d_k = q.shape
    num_level = level_weights.shape[-1]
    if initial_state is None:
        initial_state = loglinear_init(batch, heads, num_level, d_k, v.shape[-1], q.dtype)

    def step(state, inputs):
        q_t, k_t, v_t, g_t, lam_t = inputs
        levels = merge_and_insert(state.levels, state.position, k_t, v_t, g_t)
        return FenwickState(levels, state.position + 1), read_levels(levels, q_t, lam_t)

    time_major = [jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, level_weights)]
    final, o = jax.lax.scan(step, initial_state, time_major)
    return jnp.moveaxis(o, 0, 1), final


# ----------------------------------------------------------------------------------------------------------
# impl="chunked"


def _intra_chunk_xla(qc, kc, vc, g_in, lc, chunk_size, operand_dtype):
    """Inside each chunk: a masked C x C matmul. qc, kc [B, N, C, H, dk], vc [B, N, C, H, dv], g_in (the log decay
    from the chunk's start, inclusive) [B, N, C, H], lc [B, N, C, H, L] -> [B, N, C, H, dv]."""
    num_level = lc.shape[-1]
    # Pairs above the diagonal (masked below) may name levels past L; clip so the gather stays in range.
    lvl = jnp.asarray(np.minimum(chunk_levels(chunk_size), num_level - 1), jnp.int32)
    lam = jnp.take_along_axis(
        lc, jnp.broadcast_to(lvl[None, None, :, None, :], lc.shape[:4] + (chunk_size,)), axis=-1
    )  # [B, N, C, H, C]
    log_decay = g_in[:, :, :, None, :] - g_in[:, :, None, :, :]  # [B, N, C(t), C(s), H]
    # s = t gets the constant exponent 0 rather than g_t - g_t (whose gradient terms cancel badly).
    strict = np.tril(np.ones((chunk_size, chunk_size), bool), -1)[None, None, :, :, None]
    diagonal = np.eye(chunk_size, dtype=bool)[None, None, :, :, None]
    log_decay = jnp.where(strict, log_decay, jnp.where(diagonal, 0.0, -jnp.inf))
    weights = lam * jnp.exp(jnp.moveaxis(log_decay, 4, 3))  # [B, N, C(t), H, C(s)]
    scores = numerics.matmul("bnthk,bnshk->bnths", qc, kc, operand_dtype)
    return numerics.matmul("bnths,bnshv->bnthv", weights * scores, vc, operand_dtype)


def _intra_chunk_pallas(q, k, v, g_in, level_weights, chunk_size):
    """What `_intra_chunk_xla` computes, by `kernels.loglinear_chunk` (interpret mode off GPUs), on [B, N*C, H, ...]
    arrays: q, k, v as given (16-bit operands stay 16-bit), g_in and level_weights in float32; float32 out."""
    from kernels import loglinear_chunk

    return loglinear_chunk.loglinear_intra_chunk(q, k, v, g_in, level_weights, chunk_size=chunk_size,
                                                 interpret=jax.default_backend() != "gpu", out_dtype=jnp.float32)


def _levels_pallas(q, g_in, weights, block_states, chunk_size, first_chunk):
    """What the queries read from the levels above their chunk, by `kernels.loglinear_levels` (interpret mode off
    GPUs): q [B, T, H, dk], g_in [B, T, H], weights [B, N, C, H, M] (0 where a chunk does not read), block_states
    [B, S, H, dk, dv] in the order of `loglinear_levels.level_groups`; float32 [B, T, H, dv] out."""
    from kernels import loglinear_levels

    weights = weights.reshape(*g_in.shape, weights.shape[-1])
    return loglinear_levels.loglinear_levels_read(q, g_in, weights, block_states.astype(jnp.float32),
                                                  chunk_size=chunk_size, first_chunk=first_chunk,
                                                  interpret=jax.default_backend() != "gpu")


def _combine_blocks(left, right):
    """(state, log decay) of two adjacent blocks as one: the left state decayed across the right block, plus the
    right state (each block's state is decayed to its end)."""
    (left_state, left_decay), (right_state, right_decay) = left, right
    return jnp.exp(right_decay)[..., None, None] * left_state + right_state, left_decay + right_decay


def _attention_chunked_aligned(q, k, v, g, level_weights, chunk_size, first_chunk, operand_dtype=None,
                               intra_kernel=False):
    """The sequence's own pairs (no earlier state). Token 0 sits at absolute position first_chunk * C.

    Shapes: q, k [B, N*C, H, dk] (or, with `intra_kernel`, [B, N*C, 1, dk]: one head every head reads), v
    [B, N*C, H, dv], g [B, N*C, H], level_weights [B, N*C, H, L]. With
    `operand_dtype` (16-bit q, k, v) the matrix products take operands of that dtype and accumulate in float32.
    `intra_kernel`: the in-chunk part by the Pallas kernels (impl="pallas"), and the levels above the chunk too where
    q's dtype is in LEVELS_KERNEL_DTYPES.
    """
    batch, seq_len, heads, d_v = v.shape
    num_chunks = seq_len // chunk_size
    chunk_bits = chunk_size.bit_length() - 1  # log2 C

    def chunked(a):
        return a.reshape(batch, num_chunks, chunk_size, *a.shape[2:])

    qc, kc, vc, gc, lc = map(chunked, (q, k, v, g, level_weights))
    levels_kernel = intra_kernel and jnp.dtype(q.dtype).name in LEVELS_KERNEL_DTYPES
    g_in = jnp.cumsum(gc, axis=2)  # log decay from the chunk start, inclusive [B, N, C, H]

    if intra_kernel:
        o = chunked(_intra_chunk_pallas(q, k, v, g_in.reshape(g.shape), level_weights, chunk_size))
    else:
        o = _intra_chunk_xla(qc, kc, vc, g_in, lc, chunk_size, operand_dtype)

    # Each chunk's keys summed into one state, decayed to the chunk's end.
    chunk_log_decay = g_in[:, :, -1]  # [B, N, H]
    to_end = jnp.exp(numerics.exclusive_cumsum(gc, axis=2, reverse=True))  # [B, N, C, H]
    if kc.shape[3] == heads:
        chunk_states = numerics.matmul("bnchk,bnchv->bnhkv", to_end[..., None] * kc, vc, operand_dtype)
    else:  # one k head: the per-head decay goes on v, so no per-head copy of k is made
        chunk_states = numerics.matmul("bnck,bnchv->bnhkv", kc[:, :, :, 0], to_end[..., None] * vc, operand_dtype)

    # Above the chunk: level chunk_bits + m reads, for the chunks of an odd block of 2^(m-1) chunks, the
    # summed state of the even block just before it (blocks aligned to absolute chunk indices).
    levels = levels_above_chunk(first_chunk, num_chunks)
    # The summed states they read, as a tree (empty blocks: no keys, no decay, as the padding chunks).
    sources = [state for state, _ in block_sources((chunk_states, chunk_log_decay), (0.0, 0.0), _combine_blocks,
                                                   first_chunk, len(levels))]
    reader_weights = []
    for m, block_state in zip(levels, sources):
        level = chunk_bits + m
        half, lead, groups = block_grid(first_chunk, num_chunks, m)
        pad = ((0, 0), (lead, groups * 2 * half - lead - num_chunks))

        def grouped(a):  # [B, N, ...] -> [B, groups, 2, half, ...] on the absolute chunk grid
            return jnp.pad(a, pad + ((0, 0),) * (a.ndim - 2)).reshape(batch, groups, 2, half, *a.shape[2:])

        def ungrouped(a):  # [B, groups, 2, half, ...] -> [B, N, ...]
            return a.reshape(batch, groups * 2 * half, *a.shape[4:])[:, lead : lead + num_chunks]

        # Decay from the end of the source block to each reading chunk's start: the earlier reading chunks.
        before = numerics.exclusive_cumsum(grouped(chunk_log_decay)[:, :, 1], axis=2)  # [B, G, half, H]
        if levels_kernel:  # kernels.loglinear_levels: each token's weight of this level, 0 where it does not read
            reading = jnp.stack([jnp.zeros_like(before), jnp.exp(before)], axis=2)  # [B, G, 2, half, H]
            reader_weights.append(ungrouped(reading)[:, :, None] * lc[..., level])  # [B, N, C, H]
            continue
        reader_decay = jnp.exp(before[:, :, :, None] + grouped(g_in)[:, :, 1])  # [B, G, half, C, H]
        reader_q = grouped(qc)[:, :, 1] * (reader_decay * grouped(lc[..., level])[:, :, 1])[..., None]
        read = numerics.matmul("bgichk,bghkv->bgichv", reader_q, block_state, operand_dtype)  # [B, G, half, C, H, dv]
        read = jnp.concatenate([jnp.zeros_like(read), read], axis=2).reshape(batch, groups * 2 * half, *read.shape[3:])
        o = o + read[:, lead : lead + num_chunks]
    if levels_kernel and sources:
        o = o + chunked(_levels_pallas(q, g_in.reshape(g.shape), jnp.stack(reader_weights, axis=-1),
                                       jnp.concatenate(sources, axis=1), chunk_size, first_chunk))
    return o.reshape(batch, seq_len, heads, d_v)


def _attention_chunked(q, k, v, g, level_weights, initial_state, chunk_size, operand_dtype=None, intra_kernel=False):
    # One q and k head for all heads (the Mamba-2 base's C and B): the Pallas kernels read it as it is; for the
    # XLA form it is copied per head here, inside the checkpointed function with recompute=True, so the backward
    # pass keeps the one head, not the copies.
    if not intra_kernel:
        q, k = (_per_head(a, v.shape[2]) for a in (q, k))
    seq_len = q.shape[1]
    start, lead, _ = grid = chunk_grid(initial_state, seq_len, chunk_size)
    padded = [grid.pad(a) for a in (q, k, v, g, level_weights)]
    o = _attention_chunked_aligned(*padded, chunk_size, start // chunk_size, operand_dtype, intra_kernel)
    o = o[:, lead : lead + seq_len]
    positions = start + jnp.arange(seq_len, dtype=jnp.int32)
    if initial_state is not None:
        o = o + prefix_read(q * jnp.exp(jnp.cumsum(g, axis=1))[..., None], level_weights, positions, initial_state)
    return o, positions


def _pallas_problem(q, k, v, chunk_size) -> str | None:
    """What `kernels.loglinear_chunk` cannot take (a message naming the argument), or None."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in (jnp.float32, jnp.bfloat16):
            return f"{name}: impl='pallas' takes float32 or bfloat16, got {x.dtype}"
    if chunk_size not in PALLAS_CHUNK_SIZES:
        return f"chunk_size: impl='pallas' needs a power of 2 from 16 to 64, got {chunk_size}"
    return None


def _per_head(x, heads):
    """q or k with `heads` heads: a one-head q or k broadcast to them, a per-head one as it is."""
    return jnp.broadcast_to(x, (*x.shape[:2], heads, x.shape[3]))


def _resolve_impl(impl, q, k, v, chunk_size):
    """What impl="auto" stands for (see the module docstring)."""
    impl = numerics.resolve_sequence_impl(impl, q.shape[1])
    if impl != "chunked" or jax.default_backend() != "gpu":
        return impl
    return "pallas" if _pallas_problem(q, k, v, chunk_size) is None else "chunked"


# ----------------------------------------------------------------------------------------------------------
# Public API


def loglinear_step(state: FenwickState, q, k, v, g, level_weights) -> tuple[jax.Array, FenwickState]:
    """One token: q, k `[batch, heads, d_k]`, v `[batch, heads, d_v]`, g `[batch, heads]`, level_weights
    `[batch, heads, L]` -> (o `[batch, heads, d_v]`, state)."""
    levels = merge_and_insert(state.levels, state.position, k, v, g)
    return read_levels(levels, q, level_weights), FenwickState(levels, state.position + 1)


def loglinear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    level_weights: jax.Array,
    *,
    impl: str = "auto",
    chunk_size: int = 64,
    initial_state: FenwickState | None = None,
    return_final_state: bool = False,
    recompute: bool = True,
    sharding=None,
):
    """Log-linear attention with a scalar decay per head and token (the Mamba-2 base).

    Args:
      q, k: `[batch, time, heads, d_k]`, or `[batch, time, 1, d_k]`: one q and k that every head reads (Mamba-2's
        C and B; with recompute the backward pass keeps the one head, not a copy per head).
      v: `[batch, time, heads, d_v]`.
      g: `[batch, time, heads]` log decays, <= 0.
      level_weights: `[batch, time, heads, L]` lambda, L >= num_levels(position + time); extra levels unused.
      impl: "auto", "dense", "recurrent", "chunked" or "pallas" (see the module docstring).
      chunk_size: C for impl="chunked", a power of two (16, 32 or 64 for impl="pallas").
      initial_state: a `FenwickState` to continue from (its position says where this sequence starts).
      return_final_state: also return the state after the last token.
      recompute: impl="chunked" and "pallas": the backward pass reruns the op's forward from its inputs instead of
        keeping its intermediates (the in-chunk [C, C] weights, the chunk states, every level's reads) alive.
      sharding: the `NamedSharding` of the `[batch, time, heads, ...]` arguments under a mesh, or None: where the
        Pallas kernels run (impl "pallas", no initial or final state), each device runs them on its own batch rows
        and heads (`ramjax.ops.shared.per_shard`) instead of XLA gathering the arguments around them.

    Returns:
      o `[batch, time, heads, d_v]` in v's dtype, and the final `FenwickState` when asked.
    """
    q, k, v, g, level_weights = map(jnp.asarray, (q, k, v, g, level_weights))
    check_args(q, k, v, g, level_weights, impl, chunk_size, initial_state, ATTENTION_IMPLS, shared_qk=True)
    if impl == "pallas" and (problem := _pallas_problem(q, k, v, chunk_size)):
        raise ValueError(problem)
    out_dtype = v.dtype
    dtype = jnp.result_type(jnp.float32, q.dtype, k.dtype, v.dtype)
    impl = _resolve_impl(impl, q, k, v, chunk_size)
    if impl == "pallas" and initial_state is None and not return_final_state and per_shard.spans_devices(sharding):
        run = functools.partial(loglinear_attention, impl="pallas", chunk_size=chunk_size, recompute=recompute)
        return per_shard.run_sequences_per_shard(run, sharding, (q, k, v, g, level_weights))
    # bf16 training: the chunked forms keep 16-bit q, k, v as matrix-product operands (float32 accumulation);
    # everything else (decays, level weights, states) is in the compute dtype.
    operand_dtype = numerics.operand_dtype(q, k, v)
    if impl not in ("chunked", "pallas") or operand_dtype is None:
        q, k, v = (a.astype(dtype) for a in (q, k, v))
    g, level_weights = g.astype(dtype), level_weights.astype(dtype)
    g = numerics.floor_log_decay(g)
    if initial_state is not None:
        initial_state = state_in_dtype(initial_state, dtype)
    if impl not in ("chunked", "pallas"):  # the chunked forms take a shared q, k head themselves
        q, k = (_per_head(a, v.shape[2]) for a in (q, k))
    if impl == "recurrent":
        o, final = _attention_recurrent(q, k, v, g, level_weights, initial_state)
    else:
        if impl == "dense":
            o, positions = _attention_dense(q, k, v, g, level_weights, initial_state)
        else:
            # recompute: the step's peak memory falls by ~40% (docs/loglinear.md section 7).
            chunked = checkpoint_chunked(_attention_chunked, 5, (6, 7, 8)) if recompute else _attention_chunked
            o, positions = chunked(q, k, v, g, level_weights, initial_state, chunk_size, operand_dtype,
                                   impl == "pallas")
        final = None
        if return_final_state:
            final = _final_state(_per_head(k, v.shape[2]), v, g, positions, initial_state, level_weights.shape[-1])
    o = o.astype(out_dtype)
    return (o, final) if return_final_state else o
