"""Gated DeltaNet, the recurrent form: the transition alpha_t (I - beta_t k_t k_t^T), the step and its scan over time.

`apply_transition` acts on a stack of states [B, H, L, dk, dv]; the log-linear delta rule applies it to every
Fenwick level (`ramjax.ops.loglinear.gated_delta`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_transition(levels, k_t, g_t, beta_t):
    """S_l <- alpha_t (S_l - beta_t k_t (k_t^T S_l)) on every level [B, H, L, dk, dv]."""
    projected = jnp.einsum("bhk,bhlkv->bhlv", k_t, levels)
    levels = levels - (beta_t[:, :, None, None] * k_t[:, :, None, :])[..., None] * projected[:, :, :, None, :]
    return levels * jnp.exp(g_t)[:, :, None, None, None]


def delta_step(state, q, k, v, a, beta):
    """state [B, H, dk, dv], q, k [B, H, dk], v [B, H, dv], a, beta [B, H] -> (o [B, H, dv], state)."""
    state = apply_transition(state[:, :, None], k, a, beta)[:, :, 0]
    state = state + (beta[..., None] * k)[..., :, None] * v[..., None, :]
    return jnp.einsum("bhk,bhkv->bhv", q, state), state


def delta_recurrent(q, k, v, a, beta, state):
    """Inputs [B, T, H, ...]; returns o [B, T, H, dv] and the final state."""

    def step(state, inputs):
        o, state = delta_step(state, *inputs)
        return state, o

    time_major = [jnp.moveaxis(x, 1, 0) for x in (q, k, v, a, beta)]
    final, o = jax.lax.scan(step, state, time_major)
    return jnp.moveaxis(o, 0, 1), final
