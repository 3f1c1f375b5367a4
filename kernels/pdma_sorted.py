"""PDMA forward and backward on write events sorted by slot: one sort per direction, none in the backward pass.

kernels/pdma.py runs PDMA on the generic sparse gated scan: its backward pass is a second scan over reversed
time, with its own sorts, and it saves the state rows the forward pass read. Here the backward pass is the
adjoint of the sorted forward computation itself, so it reuses the forward pass's orderings:

  forward   each token's merged writes (one event per distinct slot, summed weight w, decay a = (1 - w)^gamma)
            are sorted stably by slot, so every slot's history is one segment of a segmented recurrence
                h[i] = a[i] h[i - 1] + w[i] [v_{t(i)}, 1]        (h = the slot's (S, z) after event i)
            whose first event per slot starts from the initial row (0, 1 / M). A read of slot m at step t is h at
            the last write of m at a step <= t (found by a second stable sort of writes and reads together), or
            the initial row if m was never written.
  backward  the reads' cotangents are added (scatter) onto the events they read; the adjoint lambda of h obeys
            the same recurrence backwards along each segment,
                lambda[i] = dh[i] + a[i + 1] lambda[i + 1]       (while i + 1 continues the segment)
            and then, per event, d v = w lambda_S, d w = lambda . [v, 1] and d a = lambda . h[i - 1] (the slot's
            value before the event; the initial row at the slot's first event).

Saved for the backward pass: the two orderings (int32) and the forward inputs; the state values h are recomputed
(one blocked recurrence) instead of being kept. The backward pass differentiates (grad_eps + (1 - grad_eps)(1 -
w))^gamma in place of (1 - w)^gamma, like kernels/pdma.py. Both recurrences run `sorted_scan.blocked_recurrence`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels import sorted_scan
from kernels.pdma_math import from_sequences, log_decay, merged_writes, proxy_derivative, to_sequences


class SortedOptions(NamedTuple):
    num_slots: int
    gamma: float
    eps: float
    grad_eps: float
    block: int
    block_kernel: bool
    interpret: bool


def _take(x, index):
    """x [G, N, ...] at index [G, Q] along axis 1."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


class _Events(NamedTuple):
    """The merged write events in slot order, [G, N] with N = T K (empty events, slot -1, sorted last: they
    write nothing and are never read)."""
    slot: jax.Array       # slot, or -1 for an empty event (a repeat merged into an earlier one of its token)
    token: jax.Array      # the step that wrote it
    w: jax.Array          # summed write weight (0 for an empty event)
    log_decay: jax.Array  # log a, as written (before segment starts are zeroed)
    starts: jax.Array     # a new segment: a new slot, or a full reset (log a <= RESET_LOG_DECAY)
    follows: jax.Array    # the previous event is the same slot (its value is this event's value before)


def _events(order, slot, w, ld, k):
    """The events in the sorted `order` ([G, N] indices into the flattened [T, K] events)."""
    g = slot.shape[0]
    slot_q, w_q, ld_q = (jnp.take_along_axis(x.reshape(g, -1), order, axis=1) for x in (slot, w, ld))
    follows = jnp.concatenate([jnp.zeros((g, 1), bool), slot_q[:, 1:] == slot_q[:, :-1]], axis=1)
    starts = ~follows | (ld_q <= sorted_scan.RESET_LOG_DECAY)
    return _Events(slot_q, order // k, w_q, ld_q, starts, follows)


def _state_values(opts: SortedOptions, ev: _Events, vs):
    """h (the slot's value after each sorted event): (h_v [G, N, d_v], h_z [G, N]) in fp32."""
    init_z = 1.0 / opts.num_slots
    a = jnp.exp(ev.log_decay)
    x_v = ev.w[..., None] * _take(vs, ev.token).astype(jnp.float32)
    # A slot's first write decays the initial row (0, 1 / M) before adding.
    x_z = ev.w + jnp.where(ev.follows, 0.0, a * init_z)
    return sorted_scan.segmented_recurrence(ev.starts, jnp.where(ev.starts, 0.0, ev.log_decay), x_v, x_z,
                                            opts.block, block_kernel=opts.block_kernel, interpret=opts.interpret)


def _reads(opts, h_v, h_z, ev, q, read_idx):
    """The read rows after each step's write: (S [G, T, K, d_v], z [G, T, K]); the initial row where unwritten."""
    g, t, k = read_idx.shape
    q_safe = jnp.maximum(q, 0)
    found = (q >= 0) & (jnp.take_along_axis(ev.slot, q_safe, axis=1) == read_idx.reshape(g, t * k))
    s = jnp.where(found[..., None], _take(h_v, q_safe), 0.0).reshape(g, t, k, -1)
    z = jnp.where(found, jnp.take_along_axis(h_z, q_safe, axis=1), 1.0 / opts.num_slots).reshape(g, t, k)
    return s, z, found, q_safe


def _merged(opts, wi, wv):
    """The merged writes (slot or -1, summed weight, log-decay, same-slot matrix): recomputed in the backward
    pass, which takes their sorted order from the forward pass."""
    slot, w, same = merged_writes(wi, wv.astype(jnp.float32))
    return slot, w, log_decay(w, opts.gamma), same


def _forward(opts: SortedOptions, read_idx, read_val, write_idx, write_val, v):
    batch, k = read_idx.shape[0], read_idx.shape[-1]
    ri, rv, wi, wv, vs = (to_sequences(x) for x in (read_idx, read_val, write_idx, write_val, v))
    slot, w, ld, _ = _merged(opts, wi, wv)
    key = jnp.where(slot >= 0, slot, opts.num_slots).reshape(slot.shape[0], -1)
    _, order = sorted_scan.sort_by_slot(key, opts.num_slots)
    ev = _events(order, slot, w, ld, k)
    h_v, h_z = _state_values(opts, ev, vs)
    q = sorted_scan.last_updates(slot, ri, opts.num_slots)
    s, z, _, _ = _reads(opts, h_v, h_z, ev, q, ri)
    o = jnp.einsum("gtk,gtkd->gtd", rv.astype(jnp.float32) / (z + opts.eps), s)
    return from_sequences(o, batch).astype(v.dtype), (ri, rv, wi, wv, vs, order, q)


def _backward(opts: SortedOptions, batch, residuals, g_o):
    ri, rv, wi, wv, vs, order, q = residuals
    g, t, k = wi.shape
    d_v = vs.shape[-1]
    slot, w, ld, same = _merged(opts, wi, wv)
    ev = _events(order, slot, w, ld, k)
    h_v, h_z = _state_values(opts, ev, vs)
    s, z, found, q_safe = _reads(opts, h_v, h_z, ev, q, ri)
    gr = to_sequences(g_o).astype(jnp.float32)
    rv32 = rv.astype(jnp.float32)
    inv_den = 1.0 / (z + opts.eps)
    g_dot_s = jnp.einsum("gtd,gtkd->gtk", gr, s)
    d_read_val = g_dot_s * inv_den
    # Each read's cotangent on the (S, z) it read, added onto the sorted write it read (none: the initial row).
    d_s = (rv32 * inv_den)[..., None] * gr[:, :, None, :]
    d_z = -rv32 * g_dot_s * inv_den**2
    rows = jnp.arange(g)[:, None]
    # A read that found no write sends nothing: its index points past the end and the add drops it. (Zeroed adds
    # onto event 0 instead would all collide on one row, and XLA's GPU scatter-add serialises collisions.)
    target = jnp.where(found, q_safe, t * k)
    d_h_v = jnp.zeros((g, t * k, d_v), jnp.float32).at[rows, target].add(d_s.reshape(g, t * k, d_v), mode="drop")
    d_h_z = jnp.zeros((g, t * k), jnp.float32).at[rows, target].add(d_z.reshape(g, t * k), mode="drop")
    # The adjoint runs each segment backwards: event i receives a[i + 1] lambda[i + 1] while i + 1 continues it.
    ends = jnp.concatenate([ev.starts[:, 1:], jnp.ones((g, 1), bool)], axis=1)
    next_ld = jnp.concatenate([jnp.where(ev.starts, 0.0, ev.log_decay)[:, 1:], jnp.zeros((g, 1))], axis=1)
    lam_v, lam_z = sorted_scan.segmented_recurrence(ends, jnp.where(ends, 0.0, next_ld), d_h_v, d_h_z, opts.block,
                                                    reverse=True, block_kernel=opts.block_kernel,
                                                    interpret=opts.interpret)
    # d a: lambda . (the slot's value before the event): h[i - 1] of the same slot, else the initial row.
    before_v = jnp.concatenate([jnp.zeros_like(h_v[:, :1]), h_v[:, :-1]], axis=1)
    before_z = jnp.concatenate([jnp.zeros_like(h_z[:, :1]), h_z[:, :-1]], axis=1)
    d_a = jnp.where(ev.follows, jnp.sum(lam_v * before_v, axis=-1) + lam_z * before_z, lam_z / opts.num_slots)
    v_q = _take(vs, ev.token).astype(jnp.float32)
    d_w_sorted = (jnp.sum(lam_v * v_q, axis=-1) + lam_z
                  + d_a * proxy_derivative(ev.w, opts.gamma, opts.grad_eps))
    # Back to token order: `order` is a permutation of the T K events; gathering by its inverse (int32) lets the
    # per-token sums read the sorted rows directly.
    position = jnp.zeros((g, t * k), jnp.int32).at[rows, order].set(
        jnp.broadcast_to(jnp.arange(t * k, dtype=jnp.int32), (g, t * k)), unique_indices=True)
    d_w = jnp.take_along_axis(d_w_sorted, position, axis=1).reshape(g, t, k)
    d_v_rows = jnp.sum(_take(ev.w[..., None] * lam_v, position).reshape(g, t, k, d_v), axis=2)
    d_w = jnp.where(slot >= 0, d_w, 0.0)
    # Repeated indices: every original event of a slot gets the merged event's gradient.
    d_write_val = jnp.einsum("gtij,gtj->gti", same.astype(d_w.dtype), d_w)
    return (None, from_sequences(d_read_val, batch).astype(rv.dtype), None,
            from_sequences(d_write_val, batch).astype(wv.dtype), from_sequences(d_v_rows, batch).astype(vs.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pdma(opts, read_idx, read_val, write_idx, write_val, v):
    return _forward(opts, read_idx, read_val, write_idx, write_val, v)[0]


def _pdma_fwd(opts, read_idx, read_val, write_idx, write_val, v):
    return _forward(opts, read_idx, read_val, write_idx, write_val, v)


def _pdma_bwd(opts, residuals, g_o):
    return _backward(opts, g_o.shape[0], residuals, g_o)


_pdma.defvjp(_pdma_fwd, _pdma_bwd)


def pdma_sorted(read_idx, read_val, write_idx, write_val, v, *, num_slots: int, gamma: float = 1.0,
                eps: float = 1e-6, grad_eps: float = 1e-3, block: int = 32, block_kernel: bool = False,
                interpret: bool = False) -> jax.Array:
    """PDMA read-out o `[batch, time, heads, d_v]` (v's dtype), differentiable; arguments as `kernels.pdma.pdma`,
    `block` sorted events per block of the segmented recurrence, `block_kernel` its in-block part by the Pallas
    kernel of sorted_blocks.py (GPUs; a power-of-2 block >= 16), `interpret` that kernel in interpret mode."""
    opts = SortedOptions(int(num_slots), float(gamma), float(eps), float(grad_eps), int(block), bool(block_kernel),
                         bool(interpret))
    return _pdma(opts, jnp.asarray(read_idx, jnp.int32), jnp.asarray(read_val), jnp.asarray(write_idx, jnp.int32),
                 jnp.asarray(write_val), jnp.asarray(v))
