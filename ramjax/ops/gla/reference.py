"""Gated linear attention, the reference forms: the step, its scan over time, and the dense T x T scores.

Internally: q, k [B, H, T, dk], v [B, H, T, dv], a [B, H, T, D] log decays with D = 1 (scalar gate, broadcast over
d_k) or D = d_k. `ramjax.ops.gla.op` checks the arguments and brings them to this layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ramjax.ops.shared import numerics


def gla_step(state, q, k, v, a):
    """state [B, H, dk, dv], q, k [B, H, dk], v [B, H, dv], a [B, H, D] -> (o [B, H, dv], state)."""
    state = jnp.exp(a)[..., None] * state + k[..., :, None] * v[..., None, :]
    return jnp.einsum("bhk,bhkv->bhv", q, state), state


def gla_recurrent(q, k, v, a, state):
    def step(state, inputs):
        o, state = gla_step(state, *inputs)
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


def log_decay_to_end(a: jax.Array) -> jax.Array:
    """a [..., T, D] -> [..., T, D]: the log decay from each token to the last one, sum_{u > s} a_u."""
    after = jax.lax.cumsum(a, axis=a.ndim - 2, reverse=True)  # sum_{u >= s}
    return jnp.concatenate([after[..., 1:, :], jnp.zeros_like(after[..., :1, :])], axis=-2)


def causal_scores(q, k, a, *, exact: bool, operand_dtype=None):
    """Within a block of tokens: sum_d q_td k_sd exp(sum_{s < u <= t} a_ud) for s <= t, else 0.

    q, k [..., T, dk], a [..., T, D] (D = 1 or dk) -> [..., T(t), T(s)]. For D = dk this materialises the
    [T, T, dk] decay tensor (in the compute dtype: there is no matrix product to hand the tensor cores).
    """
    decay = jnp.exp(_pair_log_decays(a, exact=exact))  # [..., T, T, D], in [0, 1]
    if a.shape[-1] == 1:
        return decay[..., 0] * numerics.matmul("...tk,...sk->...ts", q, k, operand_dtype)
    return jnp.einsum("...tk,...sk,...tsk->...ts", q, k, decay)


def gla_dense(q, k, v, a, state):
    o = causal_scores(q, k, a, exact=True) @ v
    final = jnp.einsum("bhtk,bhtv->bhkv", jnp.exp(log_decay_to_end(a)) * k, v)
    if state is not None:
        cum = jnp.cumsum(a, axis=2)  # log decay from before the first token, inclusive [B, H, T, D]
        o = o + (q * jnp.exp(cum)) @ state
        final = final + jnp.exp(cum[:, :, -1])[..., None] * state
    return o, final
