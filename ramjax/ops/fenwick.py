"""Log-linear attention over a Fenwick-tree partition of the past (docs/loglinear.md sections 1-2).

For a query at position t and a key at s <= t (0-indexed, absolute positions):

    level(t, s) = 0 if s == t else bit_length(t XOR s)
    o_t = sum_{s <= t} lambda_t[level(t, s)] * exp(G_t - G_s) * (q_t . k_s) * v_s,      G = cumsum(g)

Level l >= 1 of t holds the 2^(l-1) keys in [(t >> l) << l, ((t >> l) << l) + 2^(l-1)), present only when bit
l - 1 of t is set. Implementations (`impl=`):
  dense      the materialised T x T reference.
  recurrent  `jax.lax.scan` over time with one d_k x d_v state per level and the binary-counter merge; the
             decode form, `loglinear_step`, is its body. O(log T) state.
  chunked    the training path: a masked matmul inside each chunk of C tokens, and for each Fenwick level above
             the chunk one batched matmul of the queries of a block of chunks against the summed state of the
             block of chunks that is their bucket. O(T log T) work, O(T) memory.
  auto       chunked for sequences, recurrent for a single token.

A state (`FenwickState`) holds one d_k x d_v matrix per level, relative to the last token seen, and the number of
tokens seen. `return_final_state=True` returns it; `initial_state=` continues from it, so a chunked prefill
can hand over to `loglinear_step` decoding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ramjax.ops import _checks, precision

IMPLS = ("auto", "dense", "recurrent", "chunked")


class FenwickState(NamedTuple):
    """Per-level states after `position` tokens; level l is relative to the last token, position - 1."""

    levels: jax.Array  # [batch, heads, L, d_k, d_v]
    position: jax.Array  # int32 scalar: tokens seen so far


# ----------------------------------------------------------------------------------------------------------
# The partition.


# Log-decays below this count as this (e^-30 ~ 1e-13: a full reset in fp32). The dense and chunked forms take
# differences of cumulative log-decays, where a -inf (a gate of exactly 0, exp(A_log) overflowing) would give
# -inf - -inf = NaN; every implementation applies the same floor, so they agree.
LOG_DECAY_FLOOR = -30.0

def _bit_length(x: jax.Array) -> jax.Array:
    """bit_length of non-negative integers, elementwise."""
    bits = jnp.iinfo(x.dtype).bits
    return jnp.where(x == 0, 0, bits - jax.lax.clz(x)).astype(x.dtype)


def level_index(t, s) -> jax.Array:
    """Fenwick level of key position s for query position t (s <= t): 0 if s == t, else bit_length(t XOR s)."""
    t, s = jnp.asarray(t), jnp.asarray(s)
    _checks.require_integer("t", t)
    _checks.require_integer("s", s)
    dtype = jnp.promote_types(t.dtype, s.dtype)
    return _bit_length(jnp.bitwise_xor(t.astype(dtype), s.astype(dtype)))


def num_levels(seq_len: int) -> int:
    """ceil(log2 T) + 1 levels cover every pair of positions in a sequence of T tokens (1 for T = 1)."""
    _checks.require_positive_int("seq_len", seq_len)
    return (seq_len - 1).bit_length() + 1


def _level_representatives(position: jax.Array, num_level: int) -> jax.Array:
    """One position inside each level's bucket of the state after `position` tokens (level 0: the last token).

    Every key of one bucket sits at the same level for any later query, so one position stands for it.
    """
    last = position - 1
    shifts = jnp.arange(num_level, dtype=jnp.int32)
    return jnp.where(shifts == 0, last, (last >> shifts) << shifts)


# ----------------------------------------------------------------------------------------------------------
# Argument checks.


def _check_args(q, k, v, g, level_weights, impl, chunk_size, initial_state):
    if impl not in IMPLS:
        raise ValueError(f"impl: must be one of {IMPLS}, got {impl!r}")
    _checks.require_positive_int("chunk_size", chunk_size)
    if chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size: must be a power of two (the Fenwick levels align with it), got {chunk_size}")
    for name, array in (("q", q), ("k", k), ("v", v), ("g", g), ("level_weights", level_weights)):
        _checks.require_floating(name, array)
    if q.ndim != 4:
        raise ValueError(f"q: expected shape [batch, time, heads, d_k], got {tuple(q.shape)}")
    batch, seq_len, heads, d_k = q.shape
    _checks.require_shape("k", k, (batch, seq_len, heads, d_k), "[batch, time, heads, d_k] like q")
    _checks.require_shape("v", v, (batch, seq_len, heads, None), "[batch, time, heads, d_v]")
    _checks.require_shape("g", g, (batch, seq_len, heads), "[batch, time, heads]")
    _checks.require_shape("level_weights", level_weights, (batch, seq_len, heads, None), "[batch, time, heads, L]")
    if seq_len == 0:
        raise ValueError("q: the time dimension is empty")
    # NumPy, not jnp: inside a jit trace jnp would stage even a concrete array's comparison.
    if _checks.is_concrete(g) and g.size and np.asarray(g).max() > 0:
        raise ValueError(f"g: log decays must be <= 0, got a maximum of {np.asarray(g).max()}")
    num_level = level_weights.shape[-1]
    start = 0
    if initial_state is not None:
        levels, position = initial_state
        _checks.require_shape(
            "initial_state.levels", levels, (batch, heads, num_level, d_k, v.shape[-1]),
            "[batch, heads, L, d_k, d_v] with L like level_weights",
        )
        if _checks.is_concrete(position):
            start = int(position)
            if start < 0:
                raise ValueError(f"initial_state.position: must be >= 0, got {start}")
    needed = num_levels(start + seq_len)
    if num_level < needed:
        raise ValueError(
            f"level_weights: L = {num_level} levels, but positions up to {start + seq_len - 1} need "
            f"num_levels({start + seq_len}) = {needed}"
        )


# ----------------------------------------------------------------------------------------------------------
# Pieces shared by the implementations.


def _prefix_read(q_through, level_weights, positions, state):
    """What the queries read from an earlier state: sum_l lambda_t[level(t, p_l)] q~_t^T S_l.

    q_through [B, T, H, dk] are the queries carried back to the state's last token (for the scalar-decay base
    q_t exp(G_t), G the log decay since then, inclusive), positions [T] absolute.
    """
    levels, position = state
    reps = _level_representatives(position, levels.shape[2])  # [L]
    target = level_index(positions[:, None], reps[None, :])  # [T, L]: the level each state level lands at
    lam = jnp.take_along_axis(level_weights, jnp.broadcast_to(target[None, :, None, :], level_weights.shape), -1)
    return jnp.einsum("bthl,bthk,bhlkv->bthv", lam, q_through, levels)


def _final_state(k, v, g, positions, state, num_level):
    """The per-level states after the last of these tokens, with the earlier state (if any) folded in."""
    last = positions[-1]
    # Log decay from each token to the last one: the sum of g after it.
    decay_to_end = _exclusive_cumsum(g, axis=1, reverse=True)  # [B, T, H]
    onehot = jax.nn.one_hot(level_index(last, positions), num_level, dtype=k.dtype)  # [T, L]
    levels = jnp.einsum("tl,bth,bthk,bthv->bhlkv", onehot, jnp.exp(decay_to_end), k, v)
    if state is not None:
        old_levels, old_position = state
        reps = _level_representatives(old_position, num_level)
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
        o = o + _prefix_read(q * jnp.exp(g_cum)[..., None], level_weights, positions, initial_state)
    return o, positions


# ----------------------------------------------------------------------------------------------------------
# impl="recurrent" and the decode step


def _merge_and_insert(levels, position, k_t, v_t, g_t):
    """Advances the per-level states [B, H, L, dk, dv] to include token `position`.

    Binary-counter carry: with c trailing zeros in the new position, levels 0..c of the previous token form
    exactly level c + 1 of the new one. Then every level decays by exp(g_t) and k_t v_t^T becomes level 0.
    """
    num_level = levels.shape[2]
    lowest_bit = position & -position
    carry_to = jnp.where(position == 0, 0, _bit_length(lowest_bit))  # c + 1 (0: nothing to merge)
    level_ids = jnp.arange(num_level, dtype=jnp.int32)[None, None, :, None, None]
    merged = jnp.sum(jnp.where(level_ids < carry_to, levels, 0), axis=2, keepdims=True)
    levels = jnp.where(level_ids < carry_to, 0, jnp.where(level_ids == carry_to, merged, levels))
    levels = levels * jnp.exp(g_t)[:, :, None, None, None]
    new = jnp.einsum("bhk,bhv->bhkv", k_t, v_t)
    return jnp.where(level_ids == 0, new[:, :, None], levels)


def _read_levels(levels, q_t, lam_t):
    """o_t = sum_l lambda_t[l] q_t^T S_l: levels [B, H, L, dk, dv], q_t [B, H, dk], lam_t [B, H, L]."""
    return jnp.einsum("bhl,bhk,bhlkv->bhv", lam_t, q_t, levels)


def _attention_recurrent(q, k, v, g, level_weights, initial_state):
    batch, seq_len, heads, d_k = q.shape
    num_level = level_weights.shape[-1]
    if initial_state is None:
        initial_state = loglinear_init(batch, heads, num_level, d_k, v.shape[-1], q.dtype)

    def step(state, inputs):
        q_t, k_t, v_t, g_t, lam_t = inputs
        levels = _merge_and_insert(state.levels, state.position, k_t, v_t, g_t)
        return FenwickState(levels, state.position + 1), _read_levels(levels, q_t, lam_t)

    time_major = [jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, level_weights)]
    final, o = jax.lax.scan(step, initial_state, time_major)
    return jnp.moveaxis(o, 0, 1), final


# ----------------------------------------------------------------------------------------------------------
# impl="chunked"


def _exclusive_cumsum(x: jax.Array, axis: int, reverse: bool = False) -> jax.Array:
    """Sums of the elements strictly before (or, reversed, strictly after) each one along `axis`.

    Summed directly, not as a running sum minus the element: with strong decays that difference cancels large
    terms and the gradient for g loses its accuracy."""
    x = jnp.moveaxis(x, axis, -1)
    if reverse:
        x = jnp.flip(x, -1)
    shifted = jnp.concatenate([jnp.zeros_like(x[..., :1]), jnp.cumsum(x[..., :-1], axis=-1)], axis=-1)
    if reverse:
        shifted = jnp.flip(shifted, -1)
    return jnp.moveaxis(shifted, -1, axis)


def _chunk_levels(chunk_size: int) -> np.ndarray:
    """level_index inside one aligned chunk, [C, C] (static)."""
    a = np.arange(chunk_size)
    x = a[:, None] ^ a[None, :]
    return np.where(x == 0, 0, np.floor(np.log2(np.maximum(x, 1))).astype(np.int64) + 1)


def _attention_chunked_aligned(q, k, v, g, level_weights, chunk_size, first_chunk, operand_dtype=None):
    """The sequence's own pairs (no earlier state). Token 0 sits at absolute position first_chunk * C.

    Shapes: q, k [B, N*C, H, dk], v [B, N*C, H, dv], g [B, N*C, H], level_weights [B, N*C, H, L]. With
    `operand_dtype` (16-bit q, k, v) the matrix products take operands of that dtype and accumulate in float32.
    """
    batch, seq_len, heads, d_k = q.shape
    d_v = v.shape[-1]
    num_chunks = seq_len // chunk_size
    num_level = level_weights.shape[-1]
    chunk_bits = chunk_size.bit_length() - 1  # log2 C

    def chunked(a):
        return a.reshape(batch, num_chunks, chunk_size, *a.shape[2:])

    qc, kc, vc, gc, lc = map(chunked, (q, k, v, g, level_weights))
    g_in = jnp.cumsum(gc, axis=2)  # log decay from the chunk start, inclusive [B, N, C, H]

    # Inside each chunk: a masked C x C matmul.
    # Pairs above the diagonal (masked below) may name levels past L; clip so the gather stays in range.
    lvl = jnp.asarray(np.minimum(_chunk_levels(chunk_size), num_level - 1), jnp.int32)
    lam = jnp.take_along_axis(
        lc, jnp.broadcast_to(lvl[None, None, :, None, :], lc.shape[:4] + (chunk_size,)), axis=-1
    )  # [B, N, C, H, C]
    log_decay = g_in[:, :, :, None, :] - g_in[:, :, None, :, :]  # [B, N, C(t), C(s), H]
    # s = t gets the constant exponent 0 rather than g_t - g_t (whose gradient terms cancel badly).
    strict = np.tril(np.ones((chunk_size, chunk_size), bool), -1)[None, None, :, :, None]
    diagonal = np.eye(chunk_size, dtype=bool)[None, None, :, :, None]
    log_decay = jnp.where(strict, log_decay, jnp.where(diagonal, 0.0, -jnp.inf))
    weights = lam * jnp.exp(jnp.moveaxis(log_decay, 4, 3))  # [B, N, C(t), H, C(s)]
    scores = precision.matmul("bnthk,bnshk->bnths", qc, kc, operand_dtype)
    o = precision.matmul("bnths,bnshv->bnthv", weights * scores, vc, operand_dtype)

    # Each chunk's keys summed into one state, decayed to the chunk's end.
    chunk_log_decay = g_in[:, :, -1]  # [B, N, H]
    to_end = jnp.exp(_exclusive_cumsum(gc, axis=2, reverse=True))  # [B, N, C, H]
    chunk_states = precision.matmul("bnchk,bnchv->bnhkv", to_end[..., None] * kc, vc, operand_dtype)

    # Above the chunk: level chunk_bits + m reads, for the chunks of an odd block of 2^(m-1) chunks, the
    # summed state of the even block just before it (blocks aligned to absolute chunk indices).
    for m in _levels_above_chunk(first_chunk, num_chunks):
        level = chunk_bits + m
        half, lead, groups = _block_grid(first_chunk, num_chunks, m)
        pad = ((0, 0), (lead, groups * 2 * half - lead - num_chunks))

        def grouped(a):  # [B, N, ...] -> [B, groups, 2, half, ...] on the absolute chunk grid
            return jnp.pad(a, pad + ((0, 0),) * (a.ndim - 2)).reshape(batch, groups, 2, half, *a.shape[2:])

        decays = grouped(chunk_log_decay)  # [B, G, 2, half, H]
        source_states = grouped(chunk_states)[:, :, 0]  # [B, G, half, H, dk, dv]
        # Decay of each source chunk's state to the end of its block: the later chunks of the block.
        source_decay = _exclusive_cumsum(decays[:, :, 0], axis=2, reverse=True)
        block_state = jnp.einsum("bgih,bgihkv->bghkv", jnp.exp(source_decay), source_states)
        # Decay from the end of the source block to each reading token: earlier reading chunks, then g_in.
        before = _exclusive_cumsum(decays[:, :, 1], axis=2)  # [B, G, half, H]
        reader_decay = jnp.exp(before[:, :, :, None] + grouped(g_in)[:, :, 1])  # [B, G, half, C, H]
        reader_q = grouped(qc)[:, :, 1] * (reader_decay * grouped(lc[..., level])[:, :, 1])[..., None]
        read = precision.matmul("bgichk,bghkv->bgichv", reader_q, block_state, operand_dtype)  # [B, G, half, C, H, dv]
        read = jnp.concatenate([jnp.zeros_like(read), read], axis=2).reshape(batch, groups * 2 * half, *read.shape[3:])
        o = o + read[:, lead : lead + num_chunks]
    return o.reshape(batch, seq_len, heads, d_v)


class ChunkGrid(NamedTuple):
    """Where a sequence sits on the grid of chunks aligned to absolute positions."""

    start: int  # absolute position of the first token
    lead: int  # padding tokens before it, so that the first chunk starts on the grid
    total: int  # padded length, a whole number of chunks

    def pad(self, a: jax.Array) -> jax.Array:
        """Pads the time axis (axis 1) with zeros: tokens that write nothing (k = 0) and do not decay (g = 0)."""
        widths = ((0, 0), (self.lead, self.total - self.lead - a.shape[1])) + ((0, 0),) * (a.ndim - 2)
        return jnp.pad(a, widths)


def _chunk_grid(initial_state, seq_len: int, chunk_size: int) -> ChunkGrid:
    if initial_state is None:
        start = 0
    elif _checks.is_concrete(initial_state.position):
        start = int(initial_state.position)
    else:
        raise ValueError(
            "initial_state.position: impl='chunked' aligns its chunks to absolute positions, so the position "
            "must be known outside jit (a Python int or a concrete array); use impl='recurrent' under jit"
        )
    lead = start % chunk_size
    return ChunkGrid(start, lead, -(-(lead + seq_len) // chunk_size) * chunk_size)


def _block_grid(first_chunk: int, num_chunks: int, level_above_chunk: int) -> tuple[int, int, int]:
    """For Fenwick level m above the chunk: (half, front, groups). Chunks are grouped in pairs of blocks of
    half = 2^(m-1) chunks on the absolute chunk grid; `front` padding chunks come first, `groups` pairs in all."""
    half = 2 ** (level_above_chunk - 1)
    front = first_chunk % (2 * half)
    return half, front, -(-(front + num_chunks) // (2 * half))


def _levels_above_chunk(first_chunk: int, num_chunks: int) -> range:
    """The levels m >= 1 above the chunk at which two chunks of this sequence can meet."""
    last_chunk = first_chunk + num_chunks - 1
    return range(1, (first_chunk ^ last_chunk).bit_length() + 1)


def _attention_chunked(q, k, v, g, level_weights, initial_state, chunk_size, operand_dtype=None):
    seq_len = q.shape[1]
    start, lead, _ = grid = _chunk_grid(initial_state, seq_len, chunk_size)
    padded = [grid.pad(a) for a in (q, k, v, g, level_weights)]
    o = _attention_chunked_aligned(*padded, chunk_size, start // chunk_size, operand_dtype)[:, lead : lead + seq_len]
    positions = start + jnp.arange(seq_len, dtype=jnp.int32)
    if initial_state is not None:
        o = o + _prefix_read(q * jnp.exp(jnp.cumsum(g, axis=1))[..., None], level_weights, positions, initial_state)
    return o, positions


# ----------------------------------------------------------------------------------------------------------
# Public API


def loglinear_init(batch: int, heads: int, num_level: int, d_k: int, d_v: int, dtype=jnp.float32) -> FenwickState:
    """The empty state before the first token."""
    for name, value in (("batch", batch), ("heads", heads), ("num_level", num_level), ("d_k", d_k), ("d_v", d_v)):
        _checks.require_positive_int(name, value)
    return FenwickState(jnp.zeros((batch, heads, num_level, d_k, d_v), dtype), jnp.int32(0))


def loglinear_step(state: FenwickState, q, k, v, g, level_weights) -> tuple[jax.Array, FenwickState]:
    """One token: q, k `[batch, heads, d_k]`, v `[batch, heads, d_v]`, g `[batch, heads]`, level_weights
    `[batch, heads, L]` -> (o `[batch, heads, d_v]`, state)."""
    levels = _merge_and_insert(state.levels, state.position, k, v, g)
    return _read_levels(levels, q, level_weights), FenwickState(levels, state.position + 1)


def _resolve_impl(impl: str, seq_len: int) -> str:
    if impl != "auto":
        return impl
    return "recurrent" if seq_len == 1 else "chunked"


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
):
    """Log-linear attention with a scalar decay per head and token (the Mamba-2 base).

    Args:
      q, k: `[batch, time, heads, d_k]`.
      v: `[batch, time, heads, d_v]`.
      g: `[batch, time, heads]` log decays, <= 0.
      level_weights: `[batch, time, heads, L]` lambda, L >= num_levels(position + time); extra levels unused.
      impl: "auto", "dense", "recurrent" or "chunked" (see the module docstring).
      chunk_size: C for impl="chunked", a power of two.
      initial_state: a `FenwickState` to continue from (its position says where this sequence starts).
      return_final_state: also return the state after the last token.

    Returns:
      o `[batch, time, heads, d_v]` in v's dtype, and the final `FenwickState` when asked.
    """
    q, k, v, g, level_weights = map(jnp.asarray, (q, k, v, g, level_weights))
    _check_args(q, k, v, g, level_weights, impl, chunk_size, initial_state)
    out_dtype = v.dtype
    dtype = jnp.result_type(jnp.float32, q.dtype, k.dtype, v.dtype)
    impl = _resolve_impl(impl, q.shape[1])
    # bf16 training: the chunked form keeps 16-bit q, k, v as matrix-product operands (float32 accumulation);
    # everything else (decays, level weights, states) is in the compute dtype.
    operand_dtype = precision.operand_dtype(q, k, v)
    if impl != "chunked" or operand_dtype is None:
        q, k, v = (a.astype(dtype) for a in (q, k, v))
    g, level_weights = g.astype(dtype), level_weights.astype(dtype)
    g = jnp.maximum(g, LOG_DECAY_FLOOR)
    if initial_state is not None:
        initial_state = FenwickState(initial_state.levels.astype(dtype), jnp.asarray(initial_state.position, jnp.int32))
    if impl == "recurrent":
        o, final = _attention_recurrent(q, k, v, g, level_weights, initial_state)
    else:
        if impl == "dense":
            o, positions = _attention_dense(q, k, v, g, level_weights, initial_state)
        else:
            o, positions = _attention_chunked(q, k, v, g, level_weights, initial_state, chunk_size, operand_dtype)
        final = _final_state(k, v, g, positions, initial_state, level_weights.shape[-1]) if return_final_state else None
    o = o.astype(out_dtype)
    return (o, final) if return_final_state else o


# The Gated DeltaNet base lives in its own file and shares the pieces above; it is part of this module's API.
from ramjax.ops.fenwick_delta import loglinear_gated_delta, loglinear_gated_delta_step  # noqa: E402, F401
