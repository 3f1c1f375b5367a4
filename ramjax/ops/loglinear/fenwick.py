"""The Fenwick-tree partition of the past behind log-linear attention (docs/loglinear.md section 1).

For a query at position t and a key at s <= t (0-indexed, absolute positions):

    level(t, s) = 0 if s == t else bit_length(t XOR s)

Level l >= 1 of t holds the 2^(l-1) keys in [(t >> l) << l, ((t >> l) << l) + 2^(l-1)), present only when bit
l - 1 of t is set.

A state (`FenwickState`) holds one d_k x d_v matrix per level, relative to the last token seen, and the number of
tokens seen; `merge_and_insert` advances it by one token (the binary-counter carry). The chunked forms align
their chunks to absolute positions (`ChunkGrid`) and group chunks into the blocks of each level above the chunk
(`block_grid`, `levels_above_chunk`, `block_sources`). Shared by `attention.py` (the Mamba-2 base) and `gated_delta.py` (the
Gated DeltaNet base).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ramjax.ops.shared import checks

IMPLS = ("auto", "dense", "recurrent", "chunked")  # both bases; loglinear_attention adds "pallas" (ATTENTION_IMPLS)


class FenwickState(NamedTuple):
    """Per-level states after `position` tokens; level l is relative to the last token, position - 1."""

    levels: jax.Array  # [batch, heads, L, d_k, d_v]
    position: jax.Array  # int32 scalar: tokens seen so far


def state_in_dtype(state: FenwickState, dtype) -> FenwickState:
    """`state` with its levels in `dtype` and its position an int32 scalar. A Python or NumPy position stays one
    (jnp.asarray would make it a tracer inside jit, and the chunked forms need it known: `chunk_grid`); a JAX array
    stays on its device (no host sync)."""
    position = state.position
    position = jnp.asarray(position, jnp.int32) if isinstance(position, jax.Array) else np.int32(position)
    return FenwickState(state.levels.astype(dtype), position)


def loglinear_init(batch: int, heads: int, num_level: int, d_k: int, d_v: int, dtype=jnp.float32) -> FenwickState:
    """The empty state before the first token."""
    for name, value in (("batch", batch), ("heads", heads), ("num_level", num_level), ("d_k", d_k), ("d_v", d_v)):
        checks.require_positive_int(name, value)
    return FenwickState(jnp.zeros((batch, heads, num_level, d_k, d_v), dtype), jnp.int32(0))


# ----------------------------------------------------------------------------------------------------------
# The partition.


def _bit_length(x: jax.Array) -> jax.Array:
    """bit_length of non-negative integers, elementwise."""
    bits = jnp.iinfo(x.dtype).bits
    return jnp.where(x == 0, 0, bits - jax.lax.clz(x)).astype(x.dtype)


def level_index(t, s) -> jax.Array:
    """Fenwick level of key position s for query position t (s <= t): 0 if s == t, else bit_length(t XOR s)."""
    t, s = jnp.asarray(t), jnp.asarray(s)
    checks.require_integer("t", t)
    checks.require_integer("s", s)
    dtype = jnp.promote_types(t.dtype, s.dtype)
    return _bit_length(jnp.bitwise_xor(t.astype(dtype), s.astype(dtype)))


def num_levels(seq_len: int) -> int:
    """ceil(log2 T) + 1 levels cover every pair of positions in a sequence of T tokens (1 for T = 1)."""
    checks.require_positive_int("seq_len", seq_len)
    return (seq_len - 1).bit_length() + 1


def level_representatives(position: jax.Array, num_level: int) -> jax.Array:
    """One position inside each level's bucket of the state after `position` tokens (level 0: the last token).

    Every key of one bucket sits at the same level for any later query, so one position stands for it.
    """
    last = position - 1
    shifts = jnp.arange(num_level, dtype=jnp.int32)
    return jnp.where(shifts == 0, last, (last >> shifts) << shifts)


# ----------------------------------------------------------------------------------------------------------
# Argument checks.


def check_args(q, k, v, g, level_weights, impl, chunk_size, initial_state, impls=IMPLS, shared_qk=False):
    """Raises a ValueError naming the argument. `shared_qk`: q and k may have one head that every head of v reads
    (the Mamba-2 base's C and B)."""
    if impl not in impls:
        raise ValueError(f"impl: must be one of {impls}, got {impl!r}")
    checks.require_positive_int("chunk_size", chunk_size)
    if chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size: must be a power of two (the Fenwick levels align with it), got {chunk_size}")
    for name, array in (("q", q), ("k", k), ("v", v), ("g", g), ("level_weights", level_weights)):
        checks.require_floating(name, array)
    if q.ndim != 4:
        raise ValueError(f"q: expected shape [batch, time, heads, d_k], got {tuple(q.shape)}")
    batch, seq_len, heads, d_k = q.shape
    checks.require_shape("k", k, (batch, seq_len, heads, d_k), "[batch, time, heads, d_k] like q")
    if shared_qk and heads == 1 and v.ndim == 4:
        heads = v.shape[2]  # one q and k head for all of v's heads
    checks.require_shape("v", v, (batch, seq_len, heads, None), "[batch, time, heads, d_v]")
    checks.require_shape("g", g, (batch, seq_len, heads), "[batch, time, heads]")
    checks.require_shape("level_weights", level_weights, (batch, seq_len, heads, None), "[batch, time, heads, L]")
    if seq_len == 0:
        raise ValueError("q: the time dimension is empty")
    # NumPy, not jnp: inside a jit trace jnp would stage even a concrete array's comparison.
    if checks.is_concrete(g) and g.size and np.asarray(g).max() > 0:
        raise ValueError(f"g: log decays must be <= 0, got a maximum of {np.asarray(g).max()}")
    num_level = level_weights.shape[-1]
    start = 0
    if initial_state is not None:
        levels, position = initial_state
        checks.require_shape(
            "initial_state.levels", levels, (batch, heads, num_level, d_k, v.shape[-1]),
            "[batch, heads, L, d_k, d_v] with L like level_weights",
        )
        if checks.is_concrete(position):
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


def prefix_read(q_through, level_weights, positions, state):
    """What the queries read from an earlier state: sum_l lambda_t[level(t, p_l)] q~_t^T S_l.

    q_through [B, T, H, dk] are the queries carried back to the state's last token (for the scalar-decay base
    q_t exp(G_t), G the log decay since then, inclusive), positions [T] absolute.
    """
    levels, position = state
    reps = level_representatives(position, levels.shape[2])  # [L]
    target = level_index(positions[:, None], reps[None, :])  # [T, L]: the level each state level lands at
    lam = jnp.take_along_axis(level_weights, jnp.broadcast_to(target[None, :, None, :], level_weights.shape), -1)
    return jnp.einsum("bthl,bthk,bhlkv->bthv", lam, q_through, levels)


def merge_and_insert(levels, position, k_t, v_t, g_t):
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


def read_levels(levels, q_t, lam_t):
    """o_t = sum_l lambda_t[l] q_t^T S_l: levels [B, H, L, dk, dv], q_t [B, H, dk], lam_t [B, H, L]."""
    return jnp.einsum("bhl,bhk,bhlkv->bhv", lam_t, q_t, levels)


# ----------------------------------------------------------------------------------------------------------
# The chunk grid of impl="chunked".


def chunk_levels(chunk_size: int) -> np.ndarray:
    """level_index inside one aligned chunk, [C, C] (static)."""
    a = np.arange(chunk_size)
    x = a[:, None] ^ a[None, :]
    return np.where(x == 0, 0, np.floor(np.log2(np.maximum(x, 1))).astype(np.int64) + 1)


class ChunkGrid(NamedTuple):
    """Where a sequence sits on the grid of chunks aligned to absolute positions."""

    start: int  # absolute position of the first token
    lead: int  # padding tokens before it, so that the first chunk starts on the grid
    total: int  # padded length, a whole number of chunks

    def pad(self, a: jax.Array) -> jax.Array:
        """Pads the time axis (axis 1) with zeros: tokens that write nothing (k = 0) and do not decay (g = 0)."""
        widths = ((0, 0), (self.lead, self.total - self.lead - a.shape[1])) + ((0, 0),) * (a.ndim - 2)
        return jnp.pad(a, widths)


def chunk_grid(initial_state, seq_len: int, chunk_size: int) -> ChunkGrid:
    if initial_state is None:
        start = 0
    elif checks.is_concrete(initial_state.position):
        start = int(initial_state.position)
    else:
        raise ValueError(
            "initial_state.position: impl='chunked' aligns its chunks to absolute positions, so the position "
            "must be known outside jit (a Python int or a concrete array); use impl='recurrent' under jit"
        )
    lead = start % chunk_size
    return ChunkGrid(start, lead, -(-(lead + seq_len) // chunk_size) * chunk_size)


def checkpoint_chunked(fn, state_argnum: int, static_argnums: tuple[int, ...]):
    """jax.checkpoint(fn, static_argnums) for a chunked form whose argument `state_argnum` is a `FenwickState` or
    None: the state's levels are traced, its position is not. The chunks align to that position (`chunk_grid`),
    so it must stay concrete, and jax.checkpoint would trace it along with the levels."""

    def run(*args):
        state = args[state_argnum]
        if state is None:
            return jax.checkpoint(fn, static_argnums=static_argnums)(*args)

        def with_levels(*args):  # fn with the state's levels in its place
            args = list(args)
            args[state_argnum] = FenwickState(args[state_argnum], state.position)
            return fn(*args)

        args = list(args)
        args[state_argnum] = state.levels
        return jax.checkpoint(with_levels, static_argnums=static_argnums)(*args)

    return run


def block_grid(first_chunk: int, num_chunks: int, level_above_chunk: int) -> tuple[int, int, int]:
    """For Fenwick level m above the chunk: (half, front, groups). Chunks are grouped in pairs of blocks of
    half = 2^(m-1) chunks on the absolute chunk grid; `front` padding chunks come first, `groups` pairs in all."""
    half = 2 ** (level_above_chunk - 1)
    front = first_chunk % (2 * half)
    return half, front, -(-(front + num_chunks) // (2 * half))


def levels_above_chunk(first_chunk: int, num_chunks: int) -> range:
    """The levels m >= 1 above the chunk at which two chunks of this sequence can meet."""
    last_chunk = first_chunk + num_chunks - 1
    return range(1, (first_chunk ^ last_chunk).bit_length() + 1)


def block_sources(leaves, fills, combine, first_chunk: int, num_levels: int) -> list:
    """The left (even) blocks of each level above the chunk, built as a binary tree over the absolute chunk grid.

    leaves: a tuple of per-chunk arrays [B, N, ...] (chunk n is absolute chunk first_chunk + n); fills: for each, the
    value of an empty block (broadcast to one chunk's [...]); combine(left, right): the tuple for a block made of
    two adjacent ones. Returns, for m = 1 .. num_levels, the tuple of the even block of each pair of 2^(m-1)-chunk
    blocks that these chunks touch ([B, groups_m, ...], the order of `block_grid`). Level m's blocks are pairs of
    level m - 1's, so each level is one pass over the previous one: about N combines in all, where forming every
    level's blocks from the chunks takes about N / 2 per level.
    """
    sources, start = [], first_chunk
    for m in range(1, num_levels + 1):
        # Blocks of 2^(m-1) chunks, the first one absolute block `start`: pad to whole pairs with empty blocks.
        front = start % 2
        back = (front + leaves[0].shape[1]) % 2
        paired = []
        for leaf, fill in zip(leaves, fills):
            ends = [jnp.broadcast_to(jnp.asarray(fill, leaf.dtype), (leaf.shape[0], n, *leaf.shape[2:]))
                    for n in (front, back)]
            leaf = jnp.concatenate([ends[0], leaf, ends[1]], axis=1)
            paired.append(leaf.reshape(leaf.shape[0], -1, 2, *leaf.shape[2:]))
        sources.append(tuple(a[:, :, 0] for a in paired))
        if m < num_levels:
            leaves = combine(tuple(a[:, :, 0] for a in paired), tuple(a[:, :, 1] for a in paired))
            start //= 2
    return sources
