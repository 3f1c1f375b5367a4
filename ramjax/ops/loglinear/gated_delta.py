"""Log-linear attention over the Gated DeltaNet base (docs/loglinear.md section 3).

Every level's state S_l [d_k, d_v] follows the same transition M_t = alpha_t (I - beta_t k_t k_t^T), and the
new term beta_t k_t v_t^T enters level 0 (after the binary-counter merge of `fenwick.py`):

    o_t = sum_l lambda_t[l] S_l^T q_t,    alpha_t = exp(g_t)

so token s reaches query t through A_{t,s} = M_t ... M_{s+1}:  o_t = sum_{s<=t} lambda_t[level(t,s)]
(q_t^T A_{t,s} k_s) beta_s v_s. Implementations mirror `loglinear_attention`:
  dense      the T x T score matrix, built by a scan that carries A_{t,s} k_s for every s.
  recurrent  a scan of `loglinear_gated_delta_step`.
  chunked    inside a chunk the WY / UT representation of the plain delta rule (`ramjax.ops.gated_delta.chunked`):
             T = (I + diag(beta) L)^-1 diag(beta) with L = strict_lower((Gamma_i / Gamma_j) k_i . k_j),
             W = T (Gamma K), U = T V. From these: the chunk's
             score matrix tril(Gamma-ratio Q K^T) T, its transition P = Gamma_C I - (Gamma_C/Gamma K)^T W, its
             own end state (Gamma_C/Gamma K)^T U, and the effective query q~ = Gamma Q - tril(ratio Q K^T) W
             that reads a chunk-start state through the chunk's transitions. Above the chunk, each Fenwick level
             sums the states of its source block of chunks (an associative scan of (P, U)) and carries it
             through the reader's earlier chunks (prefix products of P).
  pallas     chunked, with the levels above the chunk as Pallas walks over the chunks that never form P
             (`delta_levels.py`, `kernels/loglinear_delta_levels.py`); sequences from position 0, no states.
16-bit q, k, v: the chunk pieces' matrix products take 16-bit operands with float32 accumulation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ramjax.ops.gated_delta.chunked import delta_chunk_pieces
from ramjax.ops.gated_delta.recurrent import apply_transition
from ramjax.ops.loglinear.delta_levels import levels_above_chunk_pallas
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
from ramjax.ops.shared import checks, numerics, per_shard

DELTA_IMPLS = (*IMPLS, "pallas")  # "pallas": the levels above the chunk by kernels.loglinear_delta_levels


def loglinear_gated_delta_step(state: FenwickState, q, k, v, g, beta, level_weights):
    """One token: q, k `[batch, heads, d_k]`, v `[batch, heads, d_v]`, g, beta `[batch, heads]`,
    level_weights `[batch, heads, L]` -> (o `[batch, heads, d_v]`, state)."""
    # Merge with a zero insert, transition every level, then put beta k v^T into the (empty) level 0.
    levels = merge_and_insert(state.levels, state.position, jnp.zeros_like(k), jnp.zeros_like(v), jnp.zeros_like(g))
    levels = apply_transition(levels, k, g, beta)
    new = jnp.einsum("bh,bhk,bhv->bhkv", beta, k, v)
    levels = levels.at[:, :, 0].set(new)
    return read_levels(levels, q, level_weights), FenwickState(levels, state.position + 1)


def _delta_recurrent(q, k, v, g, beta, level_weights, initial_state):
    batch, _, heads, d_k = q.shape
    if initial_state is None:
        initial_state = loglinear_init(batch, heads, level_weights.shape[-1], d_k, v.shape[-1], q.dtype)

    def step(state, inputs):
        o, state = loglinear_gated_delta_step(state, *inputs)
        return state, o

    time_major = [jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, beta, level_weights)]
    final, o = jax.lax.scan(step, initial_state, time_major)
    return jnp.moveaxis(o, 0, 1), final


def _delta_dense(q, k, v, g, beta, level_weights, initial_state, return_final_state):
    batch, seq_len, heads, d_k = q.shape
    num_level = level_weights.shape[-1]
    start = jnp.int32(0) if initial_state is None else initial_state.position
    positions = start + jnp.arange(seq_len, dtype=jnp.int32)

    def step(carry, inputs):
        # carried[:, :, :, s] = A_{t,s} k_s (zero for s > t); through = A_{t, start-1}, for an earlier state.
        carried, through = carry
        t, q_t, k_t, g_t, beta_t = inputs
        alpha = jnp.exp(g_t)[:, :, None, None]
        carried = alpha * (carried - beta_t[:, :, None, None] * k_t[..., None] * jnp.einsum("bhk,bhks->bhs", k_t, carried)[:, :, None, :])
        through = alpha * (through - beta_t[:, :, None, None] * k_t[..., None] * jnp.einsum("bhk,bhkj->bhj", k_t, through)[:, :, None, :])
        carried = carried.at[:, :, :, t].set(k_t)
        scores = jnp.einsum("bhk,bhks->bhs", q_t, carried)
        q_through = jnp.einsum("bhk,bhkj->bhj", q_t, through)
        return (carried, through), (scores, q_through)

    init = (
        jnp.zeros((batch, heads, d_k, seq_len), q.dtype),
        jnp.broadcast_to(jnp.eye(d_k, dtype=q.dtype), (batch, heads, d_k, d_k)),
    )
    inputs = [jnp.arange(seq_len)] + [jnp.moveaxis(a, 1, 0) for a in (q, k, g, beta)]
    (carried, through), (scores, q_through) = jax.lax.scan(step, init, inputs)
    scores = jnp.moveaxis(scores, 0, 1) * beta.transpose(0, 2, 1)[:, None]  # [B, T, H, S]
    levels = level_index(positions[:, None], positions[None, :])
    lam = jnp.take_along_axis(
        level_weights, jnp.broadcast_to(levels[None, :, None, :], (batch, seq_len, heads, seq_len)), axis=-1
    )
    causal = positions[:, None] >= positions[None, :]
    o = jnp.einsum("bths,bshv->bthv", jnp.where(causal[None, :, None, :], lam * scores, 0), v)
    if initial_state is not None:
        o = o + prefix_read(jnp.moveaxis(q_through, 0, 1), level_weights, positions, initial_state)
    if not return_final_state:
        return o, None
    last = positions[-1]
    onehot = jax.nn.one_hot(level_index(last, positions), num_level, dtype=q.dtype)  # [S, L]
    final = jnp.einsum("bhks,sl,bsh,bshv->bhlkv", carried, onehot, beta, v)
    if initial_state is not None:
        final = final + _carry_state(initial_state, through, last, num_level)
    return o, FenwickState(final, (start + seq_len).astype(jnp.int32))


def _carry_state(state, through, last, num_level):
    """An earlier state carried to the last token: A S_l, each level moved to the level it now belongs to."""
    reps = level_representatives(state.position, num_level)
    moved = jax.nn.one_hot(level_index(last, reps), num_level, dtype=through.dtype)  # [L_old, L_new]
    return jnp.einsum("ln,bhkj,bhljv->bhnkv", moved, through, state.levels)


# ----------------------------------------------------------------------------------------------------------
# impl="chunked"


def _compose_affine(earlier, later):
    """(P, U) maps X -> P X + U: `later` after `earlier`."""
    p_e, u_e = earlier
    p_l, u_l = later
    return p_l @ p_e, p_l @ u_e + u_l


# With recompute, each level above the chunk also as its own rematerialised piece (True): inside the chunked form's
# own checkpoint, the backward pass then holds one level's prefix products and start states at a time instead of
# every level's, for one more forward pass over the levels. Off: on an H200 it left the LM step's peak and time as
# they were (12.1 GB, 177 -> 179 ms at 4096 x 8; experiments/results/bench_models.md, 2026-12-03): the peak is elsewhere.
LEVEL_CHECKPOINT = False


def _level_read(transition, block_state, level_lam, q_eff, zero, first_chunk: int, num_chunks: int, m: int):
    """What the chunks read from Fenwick level (chunk level + m): the source block's state `block_state` [B, G,
    H, dk, dv], carried through the reading block's earlier chunks by the chunk transitions [B, N, H, dk, dk], read
    by q_eff [B, N, H, C, dk] with weights level_lam [B, N, C, H]. Returns (read [B, N, C, H, dv], the start states
    [B, G, half, H, dk, dv] on block_grid's layout). `zero` (a scalar of the compute dtype) fixes the identity's
    dtype."""
    batch = transition.shape[0]
    half, front, groups = block_grid(first_chunk, num_chunks, m)
    group_pad = ((0, 0), (front, groups * 2 * half - front - num_chunks))
    eye = jnp.eye(transition.shape[-1], dtype=zero.dtype)

    def grouped(a, fill=None):  # [B, N, ...] -> [B, G, 2, half, ...] on the absolute chunk grid
        if fill is None:
            a = jnp.pad(a, group_pad + ((0, 0),) * (a.ndim - 2))
        else:  # pad with copies of `fill`
            before, after = group_pad[1]
            parts = [jnp.broadcast_to(fill, (batch, n) + a.shape[2:]) for n in (before, after)]
            a = jnp.concatenate([parts[0], a, parts[1]], axis=1)
        return a.reshape(batch, groups, 2, half, *a.shape[2:])

    trans = grouped(transition, fill=eye)  # padding chunks transition by the identity
    # The source block's state carried through the reader's earlier chunks: exclusive prefix products of P over
    # the reading block.
    prefix = jax.lax.associative_scan(lambda e, l: l @ e, trans[:, :, 1], axis=2)
    prefix = jnp.concatenate([jnp.broadcast_to(eye, prefix[:, :, :1].shape), prefix[:, :, :-1]], axis=2)
    start_state = prefix @ block_state[:, :, None]  # [B, G, half, H, dk, dv]
    reader_lam = grouped(level_lam)[:, :, 1]  # [B, G, half, C, H]
    reader_q = grouped(jnp.moveaxis(q_eff, 3, 2))[:, :, 1]  # [B, G, half, C, H, dk]
    read = jnp.einsum("bgich,bgichk,bgihkv->bgichv", reader_lam, reader_q, start_state)
    read = jnp.concatenate([jnp.zeros_like(read), read], axis=2)
    read = read.reshape(batch, groups * 2 * half, *read.shape[3:])[:, front : front + num_chunks]
    return read, start_state


def _delta_chunked(q, k, v, g, beta, level_weights, initial_state, chunk_size, return_final_state,
                   levels_kernel=False, operand_dtype=None, level_checkpoint=False):
    """levels_kernel: the levels above the chunk by `levels_above_chunk_pallas` (no initial or final state).
    operand_dtype: None, or the 16-bit dtype the chunk pieces' matrix products (and the kernels') take as
    operands, accumulating in float32; states stay in the compute dtype. level_checkpoint: each level above the
    chunk rematerialised on its own (LEVEL_CHECKPOINT)."""
    # 16-bit q, k, v arrive as they are (so that a checkpoint around this function keeps them, not float32
    # copies) and are widened here, as the caller widens them for the other forms.
    q, k, v = (a.astype(jnp.result_type(jnp.float32, a.dtype)) for a in (q, k, v))
    batch, seq_len, heads, d_k = q.shape
    d_v = v.shape[-1]
    num_level = level_weights.shape[-1]
    grid = chunk_grid(initial_state, seq_len, chunk_size)
    start, lead, total = grid
    num_chunks = total // chunk_size
    first_chunk = start // chunk_size

    def chunked(a):  # pad with tokens that change nothing (k = 0, beta = 0, g = 0), then split into chunks
        return grid.pad(a).reshape(batch, num_chunks, chunk_size, *a.shape[2:])

    qc, kc, vc, gc, bc, lc = map(chunked, (q, k, v, g, beta, level_weights))
    pieces = delta_chunk_pieces(qc, kc, vc, gc, bc, operand_dtype)
    scores, q_eff, transition, own_state, key_paths = pieces[:5]

    # Inside each chunk: lambda at the in-chunk level times the delta-rule scores.
    chunk_bits = chunk_size.bit_length() - 1
    lvl = jnp.asarray(np.minimum(chunk_levels(chunk_size), num_level - 1), jnp.int32)
    lam = jnp.take_along_axis(lc, jnp.broadcast_to(lvl[None, None, :, None, :], lc.shape[:4] + (chunk_size,)), -1)
    lam = jnp.moveaxis(lam, 3, 2)  # [B, N, H, C, C]
    o = numerics.matmul("bnhts,bnshv->bnthv", lam * scores, vc, operand_dtype)
    if levels_kernel:  # (the caller has checked: no initial state, no final state)
        o = o + levels_above_chunk_pallas(pieces.q_eff, pieces.w, pieces.u, pieces.to_end, pieces.gamma_end, lc,
                                          chunk_bits, "bfloat16" if operand_dtype == jnp.bfloat16 else "float32")
        return o.reshape(batch, total, heads, d_v)[:, :seq_len], None

    # Above the chunk, level chunk_bits + m.
    last_chunk = first_chunk + num_chunks - 1
    final_levels = jnp.zeros((batch, heads, num_level, d_k, d_v), q.dtype)
    levels = levels_above_chunk(first_chunk, num_chunks)
    # The source block's map X -> P X + U for each level, as a tree (empty blocks: the identity); U is its state.
    identity = jnp.eye(d_k, dtype=transition.dtype)
    sources = [state for _, state in block_sources((transition, own_state), (identity, 0.0), _compose_affine,
                                                   first_chunk, len(levels))]
    read_level = jax.checkpoint(_level_read, static_argnums=(5, 6, 7)) if level_checkpoint else _level_read
    for m, block_state in zip(levels, sources):
        level = chunk_bits + m
        read, start_state = read_level(transition, block_state, lc[..., level], q_eff, jnp.zeros((), q.dtype),
                                       first_chunk, num_chunks, m)
        o = o + read
        if return_final_state and (last_chunk >> (m - 1)) & 1:
            # The last chunk reads this level: carry its start state through the last chunk.
            half, front, _ = block_grid(first_chunk, num_chunks, m)
            group, slot = divmod(front + num_chunks - 1, 2 * half)
            last_state = transition[:, -1] @ start_state[:, group, slot - half]
            final_levels = final_levels.at[:, :, level].add(last_state)

    o = o.reshape(batch, total, heads, d_v)[:, lead : lead + seq_len]
    positions = start + jnp.arange(seq_len, dtype=jnp.int32)
    if initial_state is not None or return_final_state:
        # Products of the chunk transitions: what carries an earlier state to each chunk start and to the end.
        through_all = jax.lax.associative_scan(lambda e, l: l @ e, transition, axis=1)  # [B, N, H, dk, dk]
    if initial_state is not None:
        eye = jnp.broadcast_to(jnp.eye(d_k, dtype=q.dtype), through_all[:, :1].shape)
        before = jnp.concatenate([eye, through_all[:, :-1]], axis=1)
        q_prefix = jnp.einsum("bnhtk,bnhkj->bnthj", q_eff, before).reshape(batch, total, heads, d_k)
        o = o + prefix_read(q_prefix[:, lead : lead + seq_len], level_weights, positions, initial_state)
    if not return_final_state:
        return o, None

    # In-chunk levels of the last token, from the last chunk's own keys.
    last = positions[-1]
    in_last = (last_chunk * chunk_size + jnp.arange(chunk_size, dtype=jnp.int32))
    valid = in_last <= last
    onehot = jax.nn.one_hot(level_index(last, in_last), num_level, dtype=q.dtype) * valid[:, None]
    final_levels = final_levels + jnp.einsum("bhks,sl,bshv->bhlkv", key_paths[:, -1], onehot, vc[:, -1])
    if initial_state is not None:
        final_levels = final_levels + _carry_state(initial_state, through_all[:, -1], last, num_level)
    return o, FenwickState(final_levels, jnp.int32(start + seq_len))


def loglinear_gated_delta(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    level_weights: jax.Array,
    *,
    impl: str = "auto",
    chunk_size: int = 64,
    initial_state: FenwickState | None = None,
    return_final_state: bool = False,
    recompute: bool = True,
    sharding=None,
):
    """Log-linear Gated DeltaNet: arguments as `loglinear_attention`, plus beta `[batch, time, heads]`. impl
    "pallas" is "chunked" with the levels above the chunk as Pallas kernels (`kernels.loglinear_delta_levels`;
    interpret mode off GPUs), for sequences from position 0: no initial_state, no final state.

    q and k are used as given (the layer L2-normalises them); g = log alpha <= 0; beta in [0, 1] keeps the
    transition a contraction (sigmoid in the layer). `sharding`: as `loglinear_attention`'s (impl "pallas" runs
    per device shard under a mesh).
    """
    q, k, v, g, beta, level_weights = map(jnp.asarray, (q, k, v, g, beta, level_weights))
    if impl == "pallas" and initial_state is None and not return_final_state and per_shard.spans_devices(sharding):
        # Each device runs the kernels on its own batch rows and heads (ramjax.ops.shared.per_shard).
        run = functools.partial(loglinear_gated_delta, impl="pallas", chunk_size=chunk_size, recompute=recompute)
        return per_shard.run_sequences_per_shard(run, sharding, (q, k, v, g, beta, level_weights))
    levels_kernel = impl == "pallas"
    operand_dtype = numerics.operand_dtype(q, k, v)  # 16-bit q, k, v: 16-bit operands in the chunked products
    if levels_kernel:
        if initial_state is not None or return_final_state:
            raise ValueError("impl: loglinear_gated_delta's 'pallas' (the levels above the chunk as Pallas kernels) "
                             "takes no initial_state and returns no final state; use impl='chunked' for those")
        if chunk_size < 16 or chunk_size & (chunk_size - 1):
            raise ValueError(f"chunk_size: impl='pallas' takes a power of 2 >= 16, got {chunk_size}")
        impl = "chunked"
    check_args(q, k, v, g, level_weights, impl, chunk_size, initial_state)
    checks.require_floating("beta", beta)
    checks.require_shape("beta", beta, tuple(g.shape), "[batch, time, heads] like g")
    out_dtype = v.dtype
    dtype = jnp.result_type(jnp.float32, q.dtype, k.dtype, v.dtype)
    impl = numerics.resolve_sequence_impl(impl, q.shape[1])
    if impl != "chunked" or operand_dtype is None:
        q, k, v = (a.astype(dtype) for a in (q, k, v))
    # (16-bit q, k, v stay 16-bit into the chunked form, which widens them itself: with recompute, its checkpoint
    # then keeps them at half the bytes, [batch, time, heads, 2 d_k + d_v] per layer.)
    g, beta, level_weights = (a.astype(dtype) for a in (g, beta, level_weights))
    g = numerics.floor_log_decay(g)
    if initial_state is not None:
        initial_state = state_in_dtype(initial_state, dtype)
    if impl == "recurrent":
        o, final = _delta_recurrent(q, k, v, g, beta, level_weights, initial_state)
    elif impl == "dense":
        o, final = _delta_dense(q, k, v, g, beta, level_weights, initial_state, return_final_state)
    else:
        # recompute: the backward pass reruns this forward from the op's inputs instead of keeping the chunk
        # transitions and every level's block states alive; the step's peak memory falls ~3x (docs/loglinear.md
        # section 7).
        chunked = checkpoint_chunked(_delta_chunked, 6, (7, 8, 9, 10, 11)) if recompute else _delta_chunked
        o, final = chunked(q, k, v, g, beta, level_weights, initial_state, chunk_size, return_final_state,
                           levels_kernel, operand_dtype, recompute and LEVEL_CHECKPOINT)
    o = o.astype(out_dtype)
    return (o, final) if return_final_state else o
