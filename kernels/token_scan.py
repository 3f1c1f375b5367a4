"""The token scan: PDMA's recurrence in chunks of tokens, with one added row per token (Pallas, Triton lowering).

G independent sequences. Each keeps a state of M rows of width D and one scalar per row, all starting at
(init_row, init_scalar). At step t, for every slot m:

    S[m] <- exp(sum of dld[t, i] over the step's decay events i on m) * S[m]
            + sum over the step's add events j on m of acoef[t, j] * row[t]
    s[m] <- (the same decay) * s[m] + sum over those add events of ascalar[t, j]
    out[t, l] = S[rslot[t, l]],  out_scalar[t, l] = s[rslot[t, l]]          (after the step; 0 where rslot < 0)

Events with slot < 0 do nothing. PDMA's forward pass is this scan with its writes as both the decay events
(log-decay gamma log(1 - w)) and the add events (coefficient w, row v_t, scalar w: the normaliser), and its
backward pass is the same scan over reversed time on the adjoint state (kernels/pdma.py).

What differs from `sparse_scan` (one row per event) is what makes large chunks cheap: every add event of a
step adds a multiple of the same row, so inside a chunk of C tokens the added part of any event's slot value is
a [events, C] weight matrix times the chunk's [C, D] rows, one matrix product. The weight matrices are built
one event column at a time as [events, C] comparisons (never [events, events]), so registers hold C * K * C
numbers per array instead of (C K)^2. With lam the log-decay a slot accumulates in the chunk up to a step:

    out[r]    = exp(lam_r) S0[slot r] + sum_{add (u, j) on slot r, u <= t_r} exp(lam_r - lam_(u, j)) acoef[u, j] row[u]
    S_end[m]  = exp(lam_m) S0[m]     + sum_{add (u, j) on m}             exp(lam_m - lam_(u, j)) acoef[u, j] row[u]

with lam_m the slot's whole-chunk log-decay; S_end is stored from one event per touched slot (the first in
event order), the others store into a discard row, so no two stores hit the same row. All exponents are <= 0.

One program per (sequence, column tile); it walks the chunks in order with the state in global memory (L2),
touching only the rows its chunk's events name.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kernels.shapes import next_pow2, pad_axis


def _kernel(dslot_ref, dld_ref, aslot_ref, acoef_ref, asc_ref, rslot_ref, rows_ref, state_in, scalar_in, out_in,
            out_scalar_in, out_ref, out_scalar_ref, state_ref, scalar_ref, *, chunk, kd, ka, kr, d_tile, n_chunks,
            stride, n_tiles, adds_are_decays, reverse, interpret):
    del state_in, scalar_in, out_in, out_scalar_in  # aliased with the outputs
    seq, col = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(pl.multiple_of(col * d_tile, d_tile), d_tile)
    base = seq * stride  # this sequence's state rows; row base + stride - 1 takes discarded stores
    scalar_base = (seq * n_tiles + col) * stride  # each column tile keeps its own copy of the scalars
    discard = stride - 1
    steps = jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)

    def barrier():
        if not interpret:
            from jax.experimental.pallas import triton as plgpu

            plgpu.debug_barrier()

    def not_after(earlier_step, step):
        """Whether a step comes no later than `step` in scan order (steps are positions in time)."""
        return earlier_step >= step if reverse else earlier_step <= step

    def body(c, carry):
        t0 = pl.multiple_of((n_chunks - 1 - c if reverse else c) * chunk, chunk)
        span = pl.ds(t0, chunk)
        # Event order inside a chunk is (column, step): event e = column * C + step.
        d_cols = [(dslot_ref[seq, i, span], dld_ref[seq, i, span]) for i in range(kd)]
        a_cols = [(aslot_ref[seq, j, span], acoef_ref[seq, j, span], asc_ref[seq, j, span]) for j in range(ka)]
        rows = rows_ref[seq, span, cols]  # [C, d_tile]

        def log_decay(slots, step, whole):
            """Sum of the chunk's log-decays on each event's slot, up to its step (inclusive) or over all."""
            total = jnp.zeros(slots.shape, jnp.float32)
            for d_slot, d_ld in d_cols:
                hit = (slots[:, None] == d_slot[None, :]) & (d_slot[None, :] >= 0)
                if not whole:
                    hit = hit & not_after(steps[None, :], step[:, None])
                total = total + jnp.sum(jnp.where(hit, d_ld[None, :], 0.0), axis=1)
            return total

        # The log-decay each add event's slot has reached at its own step, one [C] vector per add column.
        add_lam = [log_decay(a_slot, steps, False) for a_slot, _, _ in a_cols]

        def added(slots, step, lam, whole):
            """([E, C] weights of the chunk's rows, [E] scalar part) added to each event's slot since the
            chunk start, decayed to the event's step (or to the chunk end)."""
            weights = jnp.zeros((slots.shape[0], chunk), jnp.float32)
            scalar = jnp.zeros(slots.shape, jnp.float32)
            for (a_slot, a_coef, a_sc), a_lam in zip(a_cols, add_lam):
                hit = (slots[:, None] == a_slot[None, :]) & (a_slot[None, :] >= 0)
                if not whole:
                    hit = hit & not_after(steps[None, :], step[:, None])
                w = jnp.where(hit, jnp.exp(jnp.where(hit, lam[:, None] - a_lam[None, :], 0.0)), 0.0)
                weights = weights + w * a_coef[None, :]
                scalar = scalar + jnp.sum(w * a_sc[None, :], axis=1)
            return weights, scalar

        def slot_values(slots, step, whole):
            lam = log_decay(slots, step, whole)
            weights, scalar = added(slots, step, lam, whole)
            safe = jnp.maximum(slots, 0)
            decay = jnp.exp(lam)
            rows_out = decay[:, None] * state_ref[base + safe, cols] + jnp.dot(
                weights, rows, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
            scalar_out = decay * scalar_ref[scalar_base + safe] + scalar
            return rows_out, scalar_out

        # Reads.
        r_slot = rslot_ref[seq, :, span].reshape(kr * chunk)
        r_step = jax.lax.broadcasted_iota(jnp.int32, (kr, chunk), 1).reshape(kr * chunk)
        out, out_scalar = slot_values(r_slot, r_step, False)
        valid = r_slot >= 0
        out_ref[seq, :, span, cols] = jnp.where(valid[:, None], out, 0.0).reshape(kr, chunk, d_tile)

        @pl.when(col == 0)
        def _():
            out_scalar_ref[seq, :, span] = jnp.where(valid, out_scalar, 0.0).reshape(kr, chunk)

        # The chunk-end value of every touched slot, stored from the first event (in event order: decay
        # events, then add events) that touches it.
        groups = [(dslot_ref, kd)] + ([] if adds_are_decays else [(aslot_ref, ka)])
        ends = []
        for g, (ref, k) in enumerate(groups):
            slots = ref[seq, :, span].reshape(k * chunk)
            order = jax.lax.broadcasted_iota(jnp.int32, (k, chunk), 0) * chunk + jax.lax.broadcasted_iota(
                jnp.int32, (k, chunk), 1)
            order = order.reshape(k * chunk)
            earlier = jnp.zeros(slots.shape, jnp.bool_)
            for h, (other, k_other) in enumerate(groups[:g + 1]):
                for i in range(k_other):
                    o_slot = other[seq, i, span]
                    hit = slots[:, None] == o_slot[None, :]
                    if h == g:  # same group: only events before this one in event order
                        hit = hit & (i * chunk + steps[None, :] < order[:, None])
                    earlier = earlier | (jnp.max(hit.astype(jnp.int32), axis=1) > 0)  # (no any() in Triton)
            first = (slots >= 0) & ~earlier
            end_rows, end_scalar = slot_values(slots, order, True)
            ends.append((jnp.where(first, slots, discard), end_rows, end_scalar))
        barrier()  # every thread has gathered this chunk's rows before any row is overwritten
        for target, end_rows, end_scalar in ends:
            state_ref[base + target, cols] = end_rows
            scalar_ref[scalar_base + target] = end_scalar
        barrier()  # the stores are visible before the next chunk gathers
        return carry

    jax.lax.fori_loop(0, n_chunks, body, 0)


def token_scan(dslot, dld, aslot, acoef, ascalar, rows, rslot, init_row, init_scalar, *, num_slots: int,
               chunk: int = 16, d_tile: int = 64, num_warps: int = 4, adds_are_decays: bool = False,
               reverse: bool = False, interpret: bool = False, poison_output: bool = False):
    """Runs the scan of the module docstring. Event arrays are column-major per sequence: `[G, K, T]`.

    Args:
      dslot, dld: `[G, Kd, T]` decay events (slot, log-decay <= 0).
      aslot, acoef, ascalar: `[G, Ka, T]` add events (slot, coefficient of the step's row, scalar added).
      rows: `[G, T, D]` one row per step.
      rslot: `[G, Kr, T]` slots read after each step.
      init_row: `[D]`; init_scalar: a number: every slot's initial row and scalar.
      num_slots: M. chunk: tokens per chunk (a power of 2; >= 16 on GPUs, for the matrix product).
      d_tile, num_warps: columns and Triton warps per program.
      adds_are_decays: the add events are the decay events (same slots; PDMA's forward pass): skips work.
      reverse: scan from the last step to the first (PDMA's backward pass), without flipping any array.
      interpret: run in interpret mode (any device). poison_output: NaN-fill the outputs first (tests).

    Returns:
      out `[G, Kr, T, D]` and out_scalar `[G, Kr, T]`, float32.
    """
    g, kd, t = dslot.shape
    ka, kr, d = aslot.shape[1], rslot.shape[1], rows.shape[-1]
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk: must be a power of 2, got {chunk}")
    kd_p, ka_p, kr_p = next_pow2(kd), next_pow2(ka), next_pow2(kr)
    d_tile = min(d_tile, next_pow2(max(d, 16)))
    d_pad = -(-d // d_tile) * d_tile
    t_pad = -(-t // chunk) * chunk
    n_tiles = d_pad // d_tile

    def events(x, k_p, value, dtype):
        return pad_axis(pad_axis(x.astype(dtype), 1, k_p, value), 2, t_pad, value)

    dslot, dld = events(dslot, kd_p, -1, jnp.int32), events(dld, kd_p, 0.0, jnp.float32)
    aslot, acoef = events(aslot, ka_p, -1, jnp.int32), events(acoef, ka_p, 0.0, jnp.float32)
    ascalar = events(ascalar, ka_p, 0.0, jnp.float32)
    rslot = events(rslot, kr_p, -1, jnp.int32)
    rows = pad_axis(pad_axis(rows.astype(jnp.float32), 1, t_pad, 0.0), 2, d_pad, 0.0)
    stride = num_slots + 1
    state = jnp.broadcast_to(pad_axis(init_row.astype(jnp.float32), 0, d_pad, 0.0), (g * stride, d_pad))
    scalars = jnp.full((g * n_tiles * stride,), init_scalar, jnp.float32)
    fill = jnp.nan if poison_output else 0.0
    out = jnp.full((g, kr_p, t_pad, d_pad), fill, jnp.float32)
    out_scalar = jnp.full((g, kr_p, t_pad), fill, jnp.float32)
    kernel = functools.partial(_kernel, chunk=chunk, kd=kd_p, ka=ka_p, kr=kr_p, d_tile=d_tile,
                               n_chunks=t_pad // chunk, stride=stride, n_tiles=n_tiles,
                               adds_are_decays=adds_are_decays, reverse=reverse, interpret=interpret)
    extra = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        extra["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    out, out_scalar, _, _ = pl.pallas_call(
        kernel,
        grid=(g, n_tiles),
        out_shape=(jax.ShapeDtypeStruct(out.shape, jnp.float32), jax.ShapeDtypeStruct(out_scalar.shape, jnp.float32),
                   jax.ShapeDtypeStruct(state.shape, jnp.float32), jax.ShapeDtypeStruct(scalars.shape, jnp.float32)),
        input_output_aliases={7: 2, 8: 3, 9: 0, 10: 1},
        interpret=interpret,
        name="token_scan",
        **extra,
    )(dslot, dld, aslot, acoef, ascalar, rslot, rows, state, scalars, out, out_scalar)
    return out[:, :kr, :t, :d], out_scalar[:, :kr, :t]


def token_scan_loop(dslot, dld, aslot, acoef, ascalar, rows, rslot, init_row, init_scalar, num_slots,
                    reverse=False):
    """NumPy float64 step loop: the contract written as plainly as possible (tests only)."""
    dslot, dld, aslot, acoef, ascalar, rows, rslot, init_row = (
        np.asarray(x) for x in (dslot, dld, aslot, acoef, ascalar, rows, rslot, init_row))
    g, _, t = dslot.shape
    out = np.zeros((g, rslot.shape[1], t, rows.shape[-1]))
    out_scalar = np.zeros((g, rslot.shape[1], t))
    for s in range(g):
        state = np.tile(init_row.astype(np.float64), (num_slots, 1))
        scalar = np.full(num_slots, float(init_scalar))
        for step in (range(t - 1, -1, -1) if reverse else range(t)):
            for slot, ld in zip(dslot[s, :, step], dld[s, :, step]):
                if slot >= 0:
                    state[slot] *= np.exp(np.float64(ld))
                    scalar[slot] *= np.exp(np.float64(ld))
            for slot, coef, sc in zip(aslot[s, :, step], acoef[s, :, step], ascalar[s, :, step]):
                if slot >= 0:
                    state[slot] += coef * rows[s, step]
                    scalar[slot] += sc
            for l, slot in enumerate(rslot[s, :, step]):
                if slot >= 0:
                    out[s, l, step], out_scalar[s, l, step] = state[slot], scalar[slot]
    return out, out_scalar
