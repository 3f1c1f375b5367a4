"""Plain (not log-linear) gated recurrences, the bases of the baseline layers (docs/loglinear.md section 5).

Gated linear attention (Mamba-2 / SSD with a scalar gate per head, GLA with one gate per key dimension):

    S_t = diag(exp(a_t)) S_{t-1} + k_t v_t^T,    o_t = S_t^T q_t,    S_0 = initial_state or 0

with a_t = log_decay_t <= 0 (a scalar gate broadcasts over d_k). Unrolled, with A = cumsum(a) over time:

    o_t = sum_{s <= t} (sum_d q_td k_sd exp(A_td - A_sd)) v_s  +  (q_t * exp(A_t))^T S_0

Gated DeltaNet:

    S_t = exp(a_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T q_t

Implementations (`impl=`):
  dense      (gated linear attention only) the materialised T x T score matrix, the reference. The log decay
             from s to t is summed over the segment itself (not taken as A_t - A_s, which loses precision once
             A is large) and masked to s <= t before the exp, so nothing overflows.
  recurrent  `jax.lax.scan` over time of the step function (`gated_linear_attention_step`,
             `gated_delta_rule_step`); the reference for the delta rule.
  chunked    the training path. The sequence is padded to a whole number of chunks of C tokens (padding tokens
             write nothing and do not decay). Inside a chunk, the masked C x C score matrix as in dense (for
             the per-dimension gate the log decays are differences of in-chunk cumulative sums, and the chunk
             splits into sub-chunks of GLA_SUBCHUNK tokens: decay tensors only of [sub, sub, d_k] on the
             diagonal, matrix products of decayed q and k between sub-chunks, as fla's chunk_gla; those scores
             are recomputed in the backward pass rather than saved); for the delta rule
             through the WY / UT representation of `fenwick_delta`. Between chunks, a
             `jax.lax.scan` over chunks carries the d_k x d_v state; every exponent it uses is <= 0 (keys
             decayed to the chunk's end, queries from the chunk's start).
  auto       recurrent for a single token, chunked otherwise.

Sums, decays and states are computed in at least float32; o comes back in v's dtype and the final state
`[batch, heads, d_k, d_v]` in the compute dtype (float32, or float64 for float64 inputs). With 16-bit q, k, v
(bf16 training) the chunked GLA form hands its matrix products 16-bit operands with float32 accumulation
(`preferred_element_type`), as fla's kernels do; within a chunk the scores are rounded to 16 bits before they
multiply v, so its error is that of bf16 (tests/test_linear_attention.py states the tolerance).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ramjax.ops import _checks, precision
from ramjax.ops.fenwick import LOG_DECAY_FLOOR, _resolve_impl
from ramjax.ops.fenwick_delta import _apply_transition, _delta_chunk_pieces

GLA_IMPLS = ("auto", "dense", "recurrent", "chunked")
# The same floor on log-decays as the log-linear ops (see ramjax.ops.fenwick).
DELTA_IMPLS = ("auto", "recurrent", "chunked")


# ----------------------------------------------------------------------------------------------------------
# Argument checks.


def _require_nonpositive(name: str, array: jax.Array) -> None:
    # NumPy, not jnp: inside a jit trace jnp would stage even a concrete array's comparison.
    if _checks.is_concrete(array) and array.size and np.asarray(array).max() > 0:
        raise ValueError(f"{name}: log decays must be <= 0, got a maximum of {np.asarray(array).max()}")


def _check_log_decay(log_decay, lead: tuple, d_k: int, per_dim_allowed: bool, described: str) -> None:
    """log_decay is lead + () or, where allowed, lead + (d_k,); `described` names the lead dimensions."""
    _checks.require_floating("log_decay", log_decay)
    shape = tuple(log_decay.shape)
    if shape == lead or (per_dim_allowed and shape == lead + (d_k,)):
        _require_nonpositive("log_decay", log_decay)
        return
    allowed = f"[{described}] = {lead}"
    if per_dim_allowed:
        allowed += f" or [{described}, d_k] = {lead + (d_k,)}"
    raise ValueError(f"log_decay: expected shape {allowed}, got {shape}")


def _check_sequence(q, k, v, log_decay, beta, impl, impls, chunk_size, initial_state) -> None:
    if not isinstance(impl, str) or impl not in impls:
        raise ValueError(f"impl: must be one of {impls}, got {impl!r}")
    _checks.require_positive_int("chunk_size", chunk_size)
    for name, array in (("q", q), ("k", k), ("v", v)):
        _checks.require_floating(name, array)
    if q.ndim != 4:
        raise ValueError(f"q: expected shape [batch, time, heads, d_k], got {tuple(q.shape)}")
    batch, seq_len, heads, d_k = q.shape
    _checks.require_shape("k", k, (batch, seq_len, heads, d_k), "[batch, time, heads, d_k] like q")
    _checks.require_shape("v", v, (batch, seq_len, heads, None), "[batch, time, heads, d_v]")
    if seq_len == 0:
        raise ValueError("q: the time dimension is empty")
    _check_log_decay(log_decay, (batch, seq_len, heads), d_k, beta is None, "batch, time, heads")
    if beta is not None:
        _checks.require_floating("beta", beta)
        _checks.require_shape("beta", beta, (batch, seq_len, heads), "[batch, time, heads]")
    if initial_state is not None:
        _checks.require_floating("initial_state", initial_state)
        _checks.require_shape(
            "initial_state", initial_state, (batch, heads, d_k, v.shape[-1]), "[batch, heads, d_k, d_v]"
        )


def _check_step(state, q, k, v, log_decay, beta) -> None:
    for name, array in (("state", state), ("q", q), ("k", k), ("v", v)):
        _checks.require_floating(name, array)
    if q.ndim != 3:
        raise ValueError(f"q: expected shape [batch, heads, d_k], got {tuple(q.shape)}")
    batch, heads, d_k = q.shape
    _checks.require_shape("k", k, (batch, heads, d_k), "[batch, heads, d_k] like q")
    _checks.require_shape("v", v, (batch, heads, None), "[batch, heads, d_v]")
    _checks.require_shape("state", state, (batch, heads, d_k, v.shape[-1]), "[batch, heads, d_k, d_v]")
    _check_log_decay(log_decay, (batch, heads), d_k, beta is None, "batch, heads")
    if beta is not None:
        _checks.require_floating("beta", beta)
        _checks.require_shape("beta", beta, (batch, heads), "[batch, heads]")


def _compute_dtype(*arrays):
    return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))


def _heads_first(a: jax.Array) -> jax.Array:
    """[B, T, H, ...] -> [B, H, T, ...]."""
    return jnp.moveaxis(a, 2, 1)


# ----------------------------------------------------------------------------------------------------------
# Gated linear attention. Internally: q, k [B, H, T, dk], v [B, H, T, dv], a [B, H, T, D] log decays with
# D = 1 (scalar gate, broadcast over d_k) or D = d_k.


def _gla_step(state, q, k, v, a):
    """state [B, H, dk, dv], q, k [B, H, dk], v [B, H, dv], a [B, H, D] -> (o [B, H, dv], state)."""
    state = jnp.exp(a)[..., None] * state + k[..., :, None] * v[..., None, :]
    return jnp.einsum("bhk,bhkv->bhv", q, state), state


def _gla_recurrent(q, k, v, a, state):
    def step(state, inputs):
        o, state = _gla_step(state, *inputs)
        return state, o

    time_major = [jnp.moveaxis(x, 2, 0) for x in (q, k, v, a)]
    final, o = jax.lax.scan(step, state, time_major)
    return jnp.moveaxis(o, 0, 2), final


def _pair_log_decays(a: jax.Array, *, exact: bool) -> jax.Array:
    """a [..., T, D] -> [..., T(t), T(s), D]: the log decay from token s to token t, sum_{s < u <= t} a_u, and
    -inf where s > t (so that its exp is 0, and nothing is exp'd above 0).

    exact=True sums each segment itself (a cumulative sum over the [T, T, D] tensor). exact=False takes the
    difference A_t - A_s of cumulative sums A, one pass cheaper, whose absolute error is |A| * eps: small for
    the sums inside a chunk unless decays are very strong, and then the weights are tiny anyway. Either way the
    diagonal is a constant 0, so the log-decay gradient never holds the order-one s = t terms that would
    cancel (leaving float32 noise far larger than the true gradient under strong decays).
    """
    size = a.shape[-2]
    below = np.tril(np.ones((size, size), bool), -1)[:, :, None]  # [t, s]: s < t
    diagonal = np.eye(size, dtype=bool)[:, :, None]
    if exact:
        segments = jnp.cumsum(jnp.where(below, a[..., :, None, :], 0), axis=-3)  # [u, s] summed over u <= t
    else:
        cum = jnp.cumsum(a, axis=-2)
        segments = cum[..., :, None, :] - cum[..., None, :, :]
    return jnp.where(below, segments, jnp.where(diagonal, 0.0, -jnp.inf))


def _log_decay_to_end(a: jax.Array) -> jax.Array:
    """a [..., T, D] -> [..., T, D]: the log decay from each token to the last one, sum_{u > s} a_u."""
    after = jax.lax.cumsum(a, axis=a.ndim - 2, reverse=True)  # sum_{u >= s}
    return jnp.concatenate([after[..., 1:, :], jnp.zeros_like(after[..., :1, :])], axis=-2)


def _causal_scores(q, k, a, *, exact: bool, operand_dtype=None):
    """Within a block of tokens: sum_d q_td k_sd exp(sum_{s < u <= t} a_ud) for s <= t, else 0.

    q, k [..., T, dk], a [..., T, D] (D = 1 or dk) -> [..., T(t), T(s)]. For D = dk this materialises the
    [T, T, dk] decay tensor (in the compute dtype: there is no matrix product to hand the tensor cores).
    """
    decay = jnp.exp(_pair_log_decays(a, exact=exact))  # [..., T, T, D], in [0, 1]
    if a.shape[-1] == 1:
        return decay[..., 0] * precision.matmul("...tk,...sk->...ts", q, k, operand_dtype)
    return jnp.einsum("...tk,...sk,...tsk->...ts", q, k, decay)


# Per-dimension gates inside a chunk: sub-chunks of this many tokens (when the chunk splits into several), so that
# only [SUB, SUB, d_k] decay tensors are formed (see `_subchunk_scores`).
GLA_SUBCHUNK = 16


def _subchunk_scores(q, k, a, sub: int, operand_dtype=None):
    """`_causal_scores` for a per-dimension gate, without the [C, C, d_k] decay tensor (as fla's chunk_gla).

    The chunk's C tokens split into n = C / sub sub-chunks. With A the in-chunk cumulative log-decay, for t in
    sub-chunk i and s in an earlier sub-chunk j the decay exp(A_t - A_s) factors into three terms that are each
    <= 1: exp(A_t - E_{i-1}) on the query, exp(E_{i-1} - E_j) between sub-chunks and exp(E_j - A_s) on the key
    (E_j: A at the last token of sub-chunk j). So the off-diagonal blocks are matrix products of decayed q and
    k, with an [n, n, d_k] decay between them; the diagonal blocks use `_causal_scores` on [sub, sub, d_k].
    """
    lead, size = q.shape[:-2], q.shape[-2]
    n = size // sub
    blocks = lambda x: x.reshape(*lead, n, sub, x.shape[-1])  # noqa: E731
    qb, kb, ab = blocks(q), blocks(k), blocks(a)
    cum = jnp.cumsum(a, axis=-2)  # A, inclusive, [..., C, dk]
    ends = blocks(cum)[..., -1, :]  # E_j [..., n, dk]
    before = jnp.concatenate([jnp.zeros_like(ends[..., :1, :]), ends[..., :-1, :]], axis=-2)  # E_{i-1}, E_{-1} = 0
    q_decayed = qb * jnp.exp(blocks(cum) - before[..., :, None, :])
    k_decayed = kb * jnp.exp(ends[..., :, None, :] - blocks(cum))
    earlier = np.tril(np.ones((n, n), bool), -1)[:, :, None]  # [i, j]: j < i
    between = jnp.exp(jnp.where(earlier, before[..., :, None, :] - ends[..., None, :, :], -jnp.inf))  # [.., i, j, dk]
    off = precision.matmul("...ijtk,...jsk->...ijts", q_decayed[..., :, None, :, :] * between[..., :, :, None, :],
                           k_decayed, operand_dtype)  # [..., i, j, t, s]; 0 for j >= i
    diagonal = _causal_scores(qb, kb, ab, exact=False)  # [..., n, sub, sub]
    same = np.eye(n, dtype=bool)[:, :, None, None]
    scores = jnp.where(same, diagonal[..., :, None, :, :], off)
    return jnp.swapaxes(scores, -3, -2).reshape(*lead, size, size)


def _gla_dense(q, k, v, a, state):
    o = _causal_scores(q, k, a, exact=True) @ v
    final = jnp.einsum("bhtk,bhtv->bhkv", jnp.exp(_log_decay_to_end(a)) * k, v)
    if state is not None:
        cum = jnp.cumsum(a, axis=2)  # log decay from before the first token, inclusive [B, H, T, D]
        o = o + (q * jnp.exp(cum)) @ state
        final = final + jnp.exp(cum[:, :, -1])[..., None] * state
    return o, final


def _pad_time(a: jax.Array, total: int) -> jax.Array:
    """Pads axis 2 (time) with zeros to `total`: tokens that write nothing (k = 0) and do not decay (a = 0)."""
    widths = [(0, 0)] * a.ndim
    widths[2] = (0, total - a.shape[2])
    return jnp.pad(a, widths)


def _to_chunks(a: jax.Array, chunk_size: int) -> jax.Array:
    """[B, H, N*C, ...] -> [B, H, N, C, ...]."""
    return a.reshape(*a.shape[:2], a.shape[2] // chunk_size, chunk_size, *a.shape[3:])


def _scan_chunk_states(step, state, xs):
    """The state at the start of every chunk [B, H, N, dk, dv], and after the last; xs have N on axis 2."""

    def body(state, x):
        return step(state, *x), state

    final, starts = jax.lax.scan(body, state, [jnp.moveaxis(x, 2, 0) for x in xs])
    return jnp.moveaxis(starts, 0, 2), final


def _gla_chunked(q, k, v, a, state, chunk_size, operand_dtype=None):
    """Chunked GLA; q, k, v may be 16-bit (then `operand_dtype`: the matrix products take 16-bit operands and
    accumulate in float32), a and the state are in the compute dtype; o and the final state come back in it."""
    batch, heads, seq_len, d_k = q.shape
    d_v = v.shape[-1]
    total = -(-seq_len // chunk_size) * chunk_size
    qc, kc, vc, ac = (_to_chunks(_pad_time(x, total), chunk_size) for x in (q, k, v, a))

    # Inside each chunk.
    # Exact segment sums cost a pass over [C, C, D]: next to nothing for the scalar gate (Mamba-2's decays can
    # be strong), about the time of the rest of the chunk for the per-dimension one (GLA's are mild), on CPU.
    if a.shape[-1] > 1 and chunk_size > GLA_SUBCHUNK and chunk_size % GLA_SUBCHUNK == 0:
        # Recomputed in the backward pass: its intermediates are several times the size of q and k (compile-time
        # memory analysis of the LM step at 4096 x 8 on the CPU: 37.2 GB saved -> 26.8 GB recomputed).
        scores = jax.checkpoint(_subchunk_scores, static_argnums=(3, 4))(qc, kc, ac, GLA_SUBCHUNK, operand_dtype)
    else:
        scores = _causal_scores(qc, kc, ac, exact=a.shape[-1] == 1, operand_dtype=operand_dtype)
    o = precision.matmul("bhnts,bhnsv->bhntv", scores, vc, operand_dtype)

    # Between chunks: keys decayed to the chunk's end, queries from its start; both factors <= 1.
    cum = jnp.cumsum(ac, axis=3)  # log decay from the chunk's start, inclusive [B, H, N, C, D]
    chunk_decay = jnp.exp(cum[..., -1, :])  # [B, H, N, D]
    chunk_kv = precision.matmul("bhnck,bhncv->bhnkv", jnp.exp(_log_decay_to_end(ac)) * kc, vc, operand_dtype)
    if state is None:
        state = jnp.zeros((batch, heads, d_k, d_v), a.dtype)
    starts, final = _scan_chunk_states(
        lambda s, decay_n, kv_n: decay_n[..., None] * s + kv_n, state, (chunk_decay, chunk_kv)
    )
    o = o + precision.matmul("bhnck,bhnkv->bhncv", jnp.exp(cum) * qc, starts, operand_dtype)
    return o.reshape(batch, heads, total, d_v)[:, :, :seq_len], final


def gated_linear_attention_step(state, q, k, v, log_decay):
    """One token of gated linear attention.

    Args:
      state: `[batch, heads, d_k, d_v]`, the state after the previous token (zeros before the first).
      q, k: `[batch, heads, d_k]`.
      v: `[batch, heads, d_v]`.
      log_decay: `[batch, heads]` (scalar gate) or `[batch, heads, d_k]` (per key dimension), <= 0.

    Returns:
      (o `[batch, heads, d_v]` in v's dtype, the new state in the compute dtype, at least float32).
    """
    state, q, k, v, log_decay = map(jnp.asarray, (state, q, k, v, log_decay))
    _check_step(state, q, k, v, log_decay, None)
    out_dtype = v.dtype
    dtype = _compute_dtype(state, q, k, v, log_decay)
    state, q, k, v, log_decay = (x.astype(dtype) for x in (state, q, k, v, log_decay))
    if log_decay.ndim == 2:
        log_decay = log_decay[..., None]
    o, state = _gla_step(state, q, k, v, log_decay)
    return o.astype(out_dtype), state


def gated_linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_decay: jax.Array,
    *,
    impl: str = "auto",
    chunk_size: int = 64,
    initial_state: jax.Array | None = None,
    return_final_state: bool = False,
):
    """Gated linear attention: S_t = diag(exp(log_decay_t)) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t.

    Args:
      q, k: `[batch, time, heads, d_k]`.
      v: `[batch, time, heads, d_v]`.
      log_decay: `[batch, time, heads]` (a scalar gate per head: Mamba-2 / SSD) or `[batch, time, heads, d_k]`
        (a gate per key dimension: GLA), <= 0.
      impl: "auto", "dense", "recurrent" or "chunked" (see the module docstring).
      chunk_size: C for impl="chunked", any positive integer (the sequence is padded to a multiple of it).
      initial_state: `[batch, heads, d_k, d_v]`, the state to continue from (zeros when None).
      return_final_state: also return the state after the last token.

    Returns:
      o `[batch, time, heads, d_v]` in v's dtype, and when asked the final state `[batch, heads, d_k, d_v]` in
      the compute dtype (at least float32).
    """
    q, k, v, log_decay = map(jnp.asarray, (q, k, v, log_decay))
    if initial_state is not None:
        initial_state = jnp.asarray(initial_state)
    _check_sequence(q, k, v, log_decay, None, impl, GLA_IMPLS, chunk_size, initial_state)
    out_dtype = v.dtype
    dtype = _compute_dtype(q, k, v, log_decay)
    operand_dtype = precision.operand_dtype(q, k, v)
    impl = _resolve_impl(impl, q.shape[1])
    if impl != "chunked" or operand_dtype is None:  # only the chunked form keeps 16-bit operands
        q, k, v = (x.astype(dtype) for x in (q, k, v))
    log_decay = jnp.maximum(log_decay.astype(dtype), LOG_DECAY_FLOOR)
    if log_decay.ndim == 3:
        log_decay = log_decay[..., None]
    q, k, v, a = map(_heads_first, (q, k, v, log_decay))
    state = None if initial_state is None else initial_state.astype(dtype)
    if impl == "recurrent":
        if state is None:
            state = jnp.zeros((*q.shape[:2], q.shape[-1], v.shape[-1]), dtype)
        o, final = _gla_recurrent(q, k, v, a, state)
    elif impl == "dense":
        o, final = _gla_dense(q, k, v, a, state)
    else:
        o, final = _gla_chunked(q, k, v, a, state, chunk_size, operand_dtype)
    o = jnp.moveaxis(o, 1, 2).astype(out_dtype)
    return (o, final) if return_final_state else o


# ----------------------------------------------------------------------------------------------------------
# Gated DeltaNet.


def _delta_step(state, q, k, v, a, beta):
    """state [B, H, dk, dv], q, k [B, H, dk], v [B, H, dv], a, beta [B, H] -> (o [B, H, dv], state)."""
    state = _apply_transition(state[:, :, None], k, a, beta)[:, :, 0]
    state = state + (beta[..., None] * k)[..., :, None] * v[..., None, :]
    return jnp.einsum("bhk,bhkv->bhv", q, state), state


def _delta_recurrent(q, k, v, a, beta, state):
    """Inputs [B, T, H, ...]; returns o [B, T, H, dv] and the final state."""

    def step(state, inputs):
        o, state = _delta_step(state, *inputs)
        return state, o

    time_major = [jnp.moveaxis(x, 1, 0) for x in (q, k, v, a, beta)]
    final, o = jax.lax.scan(step, state, time_major)
    return jnp.moveaxis(o, 0, 1), final


def _delta_chunked(q, k, v, a, beta, state, chunk_size):
    """Inputs [B, T, H, ...]; returns o [B, T, H, dv] and the final state."""
    batch, seq_len, heads, d_k = q.shape
    d_v = v.shape[-1]
    num_chunks = -(-seq_len // chunk_size)
    total = num_chunks * chunk_size

    def chunked(x):  # pad with tokens that change nothing (k = 0, beta = 0, a = 0); [B, N, C, H, ...]
        x = jnp.pad(x, ((0, 0), (0, total - seq_len)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape(batch, num_chunks, chunk_size, *x.shape[2:])

    qc, kc, vc, ac, bc = map(chunked, (q, k, v, a, beta))
    # Per chunk and head [B, N, H, ...]: scores [C, C], q_eff [C, dk] (reads the chunk-start state through the
    # chunk's transitions), transition P [dk, dk] and own end state U [dk, dv]: S_end = P S_start + U.
    scores, q_eff, transition, own_state, _ = _delta_chunk_pieces(qc, kc, vc, ac, bc)
    o = jnp.einsum("bnhts,bnshv->bnhtv", scores, vc)
    if state is None:
        state = jnp.zeros((batch, heads, d_k, d_v), q.dtype)
    starts, final = _scan_chunk_states(
        lambda s, p_n, u_n: p_n @ s + u_n,
        state,
        (jnp.moveaxis(transition, 1, 2), jnp.moveaxis(own_state, 1, 2)),
    )  # starts [B, H, N, dk, dv]
    o = o + q_eff @ jnp.moveaxis(starts, 2, 1)
    o = jnp.moveaxis(o, 2, 3).reshape(batch, total, heads, d_v)[:, :seq_len]
    return o, final


def gated_delta_rule_step(state, q, k, v, log_decay, beta):
    """One token of Gated DeltaNet.

    Args:
      state: `[batch, heads, d_k, d_v]`, the state after the previous token (zeros before the first).
      q, k: `[batch, heads, d_k]` (used as given; the layer L2-normalises k).
      v: `[batch, heads, d_v]`.
      log_decay, beta: `[batch, heads]`; log_decay <= 0.

    Returns:
      (o `[batch, heads, d_v]` in v's dtype, the new state in the compute dtype, at least float32).
    """
    state, q, k, v, log_decay, beta = map(jnp.asarray, (state, q, k, v, log_decay, beta))
    _check_step(state, q, k, v, log_decay, beta)
    out_dtype = v.dtype
    dtype = _compute_dtype(state, q, k, v, log_decay, beta)
    o, state = _delta_step(*(x.astype(dtype) for x in (state, q, k, v, log_decay, beta)))
    return o.astype(out_dtype), state


def gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_decay: jax.Array,
    beta: jax.Array,
    *,
    impl: str = "auto",
    chunk_size: int = 64,
    initial_state: jax.Array | None = None,
    return_final_state: bool = False,
):
    """Gated DeltaNet: S_t = exp(log_decay_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T q_t.

    Args:
      q, k: `[batch, time, heads, d_k]`, used as given (the layer L2-normalises them).
      v: `[batch, time, heads, d_v]`.
      log_decay: `[batch, time, heads]` log decays, <= 0.
      beta: `[batch, time, heads]` write strengths; beta in [0, 1] with unit-norm keys keeps the transition a
        contraction (sigmoid in the layer).
      impl: "auto", "recurrent" or "chunked" (see the module docstring).
      chunk_size: C for impl="chunked", any positive integer (the sequence is padded to a multiple of it).
      initial_state: `[batch, heads, d_k, d_v]`, the state to continue from (zeros when None).
      return_final_state: also return the state after the last token.

    Returns:
      o `[batch, time, heads, d_v]` in v's dtype, and when asked the final state `[batch, heads, d_k, d_v]` in
      the compute dtype (at least float32).
    """
    q, k, v, log_decay, beta = map(jnp.asarray, (q, k, v, log_decay, beta))
    if initial_state is not None:
        initial_state = jnp.asarray(initial_state)
    _check_sequence(q, k, v, log_decay, beta, impl, DELTA_IMPLS, chunk_size, initial_state)
    out_dtype = v.dtype
    dtype = _compute_dtype(q, k, v, log_decay, beta)
    q, k, v, log_decay, beta = (x.astype(dtype) for x in (q, k, v, log_decay, beta))
    log_decay = jnp.maximum(log_decay, LOG_DECAY_FLOOR)
    state = None if initial_state is None else initial_state.astype(dtype)
    impl = _resolve_impl(impl, q.shape[1])
    if impl == "recurrent":
        if state is None:
            state = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[-1]), dtype)
        o, final = _delta_recurrent(q, k, v, log_decay, beta, state)
    else:
        o, final = _delta_chunked(q, k, v, log_decay, beta, state, chunk_size)
    o = o.astype(out_dtype)
    return (o, final) if return_final_state else o
