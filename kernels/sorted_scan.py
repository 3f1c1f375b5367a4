"""The sparse gated scan with events sorted by slot: parallel over time, independent of M.

The contract is `sparse_scan.sparse_gated_scan`'s (G sequences, a state of M rows of width D starting at
`init_row`, per step some update events (slot, log-decay, scale, row) and then some read events). This form
never holds the state. Every slot's history is a scalar-gated linear recurrence over the updates that touch it,
so once the update events are sorted by slot (stably, so each slot's updates stay in time order) the whole
sequence is one long *segmented* recurrence, one segment per slot:

    h[q] = exp(ld[q]) * h[q - 1] + x[q]       within a segment,   x[q] = scale[q] * rows[step(q), row(q)]

and a read of slot m after step t is h at the last update of m at a step <= t (init_row if there is none).

Stages (public so that experiments/profile_sorted_scan.py can time them): `sorted_updates`, `blocked_recurrence`
(with `block_weights`), `last_updates`; `sorted_gated_scan` runs them and gathers the reads.

The segmented recurrence runs in blocks of C sorted events, the way chunked linear attention runs:
  - inside a block, a [C, C] matrix L[i, j] = [j <= i, same segment] exp(c[i] - c[j]) (c: the segment's running
    sum of ld within the block) times the block's [C, D] rows gives every event's value from a zero carry-in;
  - across blocks, a carry H (the value at the block's last event) obeys H[b] = h_local_end[b] +
    A_end[b] H[b - 1], with A the decay from the block start; an associative scan over the T K / C blocks
    solves it; then h = h_local + A H[b - 1].
Everything is gathers, a sort of int32 keys, one batched matrix product and a short scan: no sequential chain
over tokens, so batch-1 long sequences fill a GPU, and no M-sized array, so M = 2^20 costs what M = 1024 does.

Two exact rewrites keep it a plain segmented recurrence:
  - several updates of one slot in one step act with their summed decay before any of them adds (the
    contract): the first of them carries the summed log-decay, the others decay by 1.
  - init_row: a slot's first update adds exp(ld) * init_row to its x (the decayed initial value).
An update whose log-decay is at or below `RESET_LOG_DECAY` (a full reset, w = 1 in PDMA, floored by the caller)
starts a new segment: the old value would survive as at most exp(-60) of itself, and dropping it keeps the
running sums c small, so exp(c[i] - c[j]) stays accurate in fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import sorted_blocks
from kernels.scans import carry_scan, segmented_cumsum
from kernels.shapes import pad_axis

# Updates whose log-decay is at or below this start a new segment (their predecessor's value is dropped).
RESET_LOG_DECAY = -60.0


def _merge_step_decays(upd_slot, upd_log_decay):
    """Per step, the summed log-decay of each slot on its first update event, 0 on the others."""
    same = upd_slot[..., :, None] == upd_slot[..., None, :]
    k = upd_slot.shape[-1]
    earlier = jnp.tril(jnp.ones((k, k), bool), -1)
    first = ~jnp.any(same & earlier, axis=-1)
    summed = jnp.sum(jnp.where(same, upd_log_decay[..., None, :], 0.0), axis=-1)
    return jnp.where(first, summed, 0.0)


def sort_by_slot(slots, num_slots: int):
    """Per row of `slots` [G, N] (int32, num_slots = none): (sorted slots, event index) [G, N], stable.

    One flat sort of row * (M + 1) + slot where that fits in int32: XLA sorts a flat array with a radix sort on
    GPUs, measured 12x faster than the batched sort at 16 rows of 1.5M events (H200).
    """
    g, n = slots.shape
    event = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (g, n))
    if g * (num_slots + 1) >= 2**31:
        return jax.lax.sort((slots, event), dimension=1, num_keys=1, is_stable=True)
    row_offset = jnp.arange(g, dtype=jnp.int32)[:, None] * (num_slots + 1)
    key, event = jax.lax.sort(((slots + row_offset).reshape(g * n), event.reshape(g * n)), num_keys=1,
                              is_stable=True)
    return key.reshape(g, n) - row_offset, event.reshape(g, n)


def sorted_updates(upd_slot, upd_log_decay, upd_scale, upd_row, rows, init_row, num_slots):
    """The update events sorted by slot: (slot, starts, log-decay, x) per sorted event, [G, T K_upd, ...]."""
    g, t, ku = upd_slot.shape
    ru, d = rows.shape[2], rows.shape[-1]
    n_upd = t * ku
    upd_valid = upd_slot >= 0
    # Invalid events (slot < 0) sort after every real slot, as slot M, and are never read.
    upd_key = jnp.where(upd_valid, upd_slot, num_slots).reshape(g, n_upd)
    slot_q, event_q = sort_by_slot(upd_key, num_slots)
    log_decay = jnp.where(upd_valid, _merge_step_decays(upd_slot, upd_log_decay), 0.0).reshape(g, n_upd)
    scale = jnp.where(upd_valid, upd_scale, 0.0).reshape(g, n_upd)
    row_index = (jnp.arange(t, dtype=jnp.int32)[:, None] * ru + upd_row).reshape(g, n_upd)
    ld_q = jnp.take_along_axis(log_decay, event_q, axis=1)
    scale_q = jnp.take_along_axis(scale, event_q, axis=1)
    row_q = jnp.take_along_axis(row_index, event_q, axis=1)
    new_slot = jnp.concatenate([jnp.ones((g, 1), bool), slot_q[:, 1:] != slot_q[:, :-1]], axis=1)
    reset = ld_q <= RESET_LOG_DECAY
    starts = new_slot | reset
    x_q = scale_q[..., None] * jnp.take_along_axis(rows.reshape(g, t * ru, d), row_q[..., None], axis=1)
    x_q = x_q + jnp.where(new_slot & ~reset, jnp.exp(ld_q), 0.0)[..., None] * init_row
    ld_q = jnp.where(starts, 0.0, ld_q)  # a segment's first event does not decay anything
    return slot_q, starts, ld_q, x_q


def block_weights(starts_b, ld_b):
    """Per block ([..., C] segment starts and log-decays): the [C, C] weights (event j's contribution to event
    i's value) and each event's decay from the block start (0 once a new segment has begun)."""
    block = starts_b.shape[-1]
    c = segmented_cumsum(starts_b, ld_b, axis=-1)
    segment = jnp.cumsum(starts_b.astype(jnp.int32), axis=-1)  # 0 while the block continues the carried segment
    linked = jnp.tril(jnp.ones((block, block), bool)) & (segment[..., :, None] == segment[..., None, :])
    weights = jnp.exp(jnp.where(linked, c[..., :, None] - c[..., None, :], -jnp.inf))
    return weights, jnp.where(segment == 0, jnp.exp(c), 0.0)


def blocked_recurrence(starts, ld_q, x_q, block: int):
    """The segmented recurrence in blocks: (h_local [G, nb, C, D], decay from the block start [G, nb, C],
    carried-in value [G, nb, D]); h = h_local + decay * carried-in."""
    g, n_upd, d = x_q.shape
    n_blocks = -(-n_upd // block)
    total = n_blocks * block  # padding events start segments of their own and add nothing
    starts, ld_q, x_q = pad_axis(starts, 1, total, True), pad_axis(ld_q, 1, total, 0.0), pad_axis(x_q, 1, total, 0.0)
    weights, carry_decay = block_weights(starts.reshape(g, n_blocks, block), ld_q.reshape(g, n_blocks, block))
    x_b = x_q.reshape(g, n_blocks, block, d)
    h_local = jnp.einsum("gbij,gbjd->gbid", weights, x_b, precision=jax.lax.Precision.HIGHEST)
    carried = carry_scan(carry_decay[..., -1], h_local[:, :, -1])  # value at each block's last event
    carried_in = jnp.concatenate([jnp.zeros_like(carried[:, :1]), carried[:, :-1]], axis=1)
    return h_local, carry_decay, carried_in


def segmented_recurrence(starts, ld, x_v, x_z, block: int, *, reverse: bool = False, block_kernel: bool = False,
                         interpret: bool = False):
    """(h_v [G, N, D], h_z [G, N]) for rows x = [x_v, x_z]:
        forward   h[i] = x[i] + exp(ld[i]) h[i - 1]      restarting from 0 where starts[i]
        reverse   h[i] = x[i] + exp(ld[i]) h[i + 1]      unless starts[i] (the segment ends at i)
    ld must be 0 where starts. `block_kernel`: by the Pallas kernel of sorted_blocks.py (GPUs; `interpret` runs it
    anywhere; a power-of-2 block >= 16), else by `blocked_recurrence` in jax.numpy."""
    if block_kernel:
        return sorted_blocks.segmented_recurrence(starts, ld, x_v, x_z, block=block, reverse=reverse,
                                                  interpret=interpret)
    g, n, d = x_v.shape
    flip = functools.partial(jnp.flip, axis=1)
    x = jnp.concatenate([x_v, x_z[..., None]], axis=-1)
    if reverse:
        starts, ld, x = flip(starts), flip(ld), flip(x)
    h_local, carry_decay, carried_in = blocked_recurrence(starts, ld, x, block)
    h = (h_local + carry_decay[..., None] * carried_in[:, :, None, :]).reshape(g, -1, d + 1)[:, :n]
    if reverse:
        h = flip(h)
    return h[..., :d], h[..., d]


def last_updates(upd_slot, read_slot, num_slots):
    """For each read [G, T K_read]: the index among the slot-sorted updates of the last update at or before it
    (any slot: the caller checks the slot). Stably sorting updates and reads together, updates first within a
    step, puts that update right before the read among its slot's events."""
    g, t, ku = upd_slot.shape
    kr = read_slot.shape[-1]
    per_step = ku + kr
    keys = jnp.concatenate([jnp.where(upd_slot >= 0, upd_slot, num_slots),
                            jnp.where(read_slot >= 0, read_slot, num_slots)], axis=2)
    _, event_all = sort_by_slot(keys.reshape(g, t * per_step), num_slots)
    is_update = (event_all % per_step) < ku
    last_update = jnp.cumsum(is_update.astype(jnp.int32), axis=1) - 1
    in_time_order = jnp.zeros_like(last_update).at[jnp.arange(g)[:, None], event_all].set(
        last_update, unique_indices=True)
    return in_time_order.reshape(g, t, per_step)[:, :, ku:].reshape(g, t * kr)


def sorted_gated_scan(upd_slot, upd_log_decay, upd_scale, upd_row, rows, read_slot, init_row, *, num_slots: int,
                      block: int = 32):
    """The sparse gated scan by sorted events; arguments as `sparse_scan.sparse_gated_scan` (fp32, int32),
    `block` sorted update events per block (any positive int). Returns out `[G, T, K_read, D]` in fp32."""
    g, t, _ = upd_slot.shape
    kr, d = read_slot.shape[-1], rows.shape[-1]
    slot_q, starts, ld_q, x_q = sorted_updates(upd_slot, upd_log_decay, upd_scale, upd_row, rows, init_row,
                                                num_slots)
    h_local, carry_decay, carried_in = blocked_recurrence(starts, ld_q, x_q, block)
    q = last_updates(upd_slot, read_slot, num_slots)
    q_safe = jnp.maximum(q, 0)
    read_flat = read_slot.reshape(g, t * kr)
    found = (q >= 0) & (jnp.take_along_axis(slot_q, q_safe, axis=1) == read_flat)
    value = (jnp.take_along_axis(h_local.reshape(g, -1, d), q_safe[..., None], axis=1)
             + jnp.take_along_axis(carry_decay.reshape(g, -1), q_safe, axis=1)[..., None]
             * jnp.take_along_axis(carried_in, (q_safe // block)[..., None], axis=1))
    value = jnp.where(found[..., None], value, init_row)
    value = jnp.where((read_flat >= 0)[..., None], value, 0.0)
    return value.reshape(g, t, kr, d)
