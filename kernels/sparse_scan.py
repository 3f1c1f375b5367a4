"""The sparse gated scan: the one recurrence behind the PDMA forward and backward kernels.

G independent sequences (one per batch x head). Each keeps a state of M rows of width D, all starting at
`init_row`. At step t, for every slot m:

    S[m] <- exp(sum of log_decay[t, e] over the step's update events e on slot m) * S[m]
            + sum over those events of scale[t, e] * rows[t, row[t, e]]
    out[t, j] = S[read_slot[t, j]]            (after the step's updates; 0 where read_slot < 0)

Update events with slot < 0 do nothing. Decays of a step act before its additions, so several events of one
step on one slot compose without an order. PDMA is this scan with (slot, gamma * log(1 - w), w) per write and
rows [v, 1] (the value and the normaliser side by side); its backward pass is the same scan run backwards in
time over the adjoint state (see pdma.py). Only the slots a step touches are read or written, so the work per
token is O(K * D) whatever M is.

Four implementations with one contract:
  xla     chunked, written in jax.numpy (`lax.scan` over chunks): the readable form of the kernels' maths, and
          differentiable, so it is the debugging fallback.
  triton  a Pallas kernel for GPUs (Triton lowering): one program per (sequence, column tile) streams chunks of
          C tokens; within a chunk everything is dense (masks over the C*K events, a matrix product), and only
          the touched state rows go through global memory.
  tpu     a Pallas Mosaic TPU kernel: the state of one sequence in VMEM, tokens streamed in order, scalar slot
          indices from SMEM, K row updates per token.
  sorted  jax.numpy on events sorted by slot (sorted_scan.py): a blocked segmented recurrence, parallel over
          time and without an M-sized state.

Chunk maths (one sequence, events of the chunk's C tokens; lam is the log-decay a slot accumulates since the
chunk start, inclusive of the event's own step):
    lam_u[e] = sum_{e' same slot, step(e') <= step(e)} log_decay[e']          (update events)
    lam_r[r] = sum_{e  same slot, step(e)  <= step(r)} log_decay[e]           (read events)
    out[r]   = exp(lam_r[r]) S0[slot r] + sum_{e same slot, step(e) <= step(r)} exp(lam_r[r] - lam_u[e]) x[e]
    S_end[slot e] = exp(lam_u[e]) S0[slot e] + sum_{e' same slot, step(e') <= step(e)} exp(lam_u[e] - lam_u[e']) x[e']
stored from the slot's last update event in the chunk, where x[e] = scale[e] * rows[step(e), row[e]].
All exponents are <= 0 (decays only accumulate), so nothing overflows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kernels.shapes import next_pow2, pad_axis
from kernels.sorted_scan import sorted_gated_scan

BACKENDS = ("xla", "triton", "tpu", "sorted")


def _check(upd_slot, upd_log_decay, upd_scale, upd_row, rows, read_slot, init_row, num_slots, chunk):
    g, t, ku = upd_slot.shape
    for name, x in (("upd_log_decay", upd_log_decay), ("upd_scale", upd_scale), ("upd_row", upd_row)):
        if x.shape != (g, t, ku):
            raise ValueError(f"{name}: expected shape {(g, t, ku)} like upd_slot, got {x.shape}")
    if rows.ndim != 4 or rows.shape[:2] != (g, t):
        raise ValueError(f"rows: expected shape [{g}, {t}, rows_per_step, D], got {rows.shape}")
    if read_slot.ndim != 3 or read_slot.shape[:2] != (g, t):
        raise ValueError(f"read_slot: expected shape [{g}, {t}, K_read], got {read_slot.shape}")
    if init_row.shape != (rows.shape[-1],):
        raise ValueError(f"init_row: expected shape ({rows.shape[-1]},), got {init_row.shape}")
    if not isinstance(num_slots, int) or num_slots < 1:
        raise ValueError(f"num_slots: must be a positive int, got {num_slots!r}")
    if not isinstance(chunk, int) or chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk: must be a power of 2 >= 1, got {chunk!r}")


# ----------------------------------------------------------------------------------------------------------
# The chunk maths, shared by the XLA form and (transcribed op for op) the Triton kernel.


def _chunk_weights(upd_slot, upd_step, upd_log_decay, read_slot, read_step):
    """Per chunk: the read weights [Nr, Nu], the update weights [Nu, Nu], exp(lam_r) [Nr], exp(lam_u) [Nu]."""
    valid_u = upd_slot >= 0
    same_uu = (upd_slot[:, None] == upd_slot[None, :]) & valid_u[None, :]
    before_uu = same_uu & (upd_step[None, :] <= upd_step[:, None])
    same_ru = (read_slot[:, None] == upd_slot[None, :]) & valid_u[None, :]
    before_ru = same_ru & (upd_step[None, :] <= read_step[:, None])
    lam_u = jnp.sum(jnp.where(before_uu, upd_log_decay[None, :], 0.0), axis=1)
    lam_r = jnp.sum(jnp.where(before_ru, upd_log_decay[None, :], 0.0), axis=1)
    w_read = jnp.where(before_ru, jnp.exp(jnp.where(before_ru, lam_r[:, None] - lam_u[None, :], -jnp.inf)), 0.0)
    w_upd = jnp.where(before_uu, jnp.exp(jnp.where(before_uu, lam_u[:, None] - lam_u[None, :], -jnp.inf)), 0.0)
    # The last update of each slot in the chunk carries the slot's end state; the others must not store.
    n = upd_slot.shape[0]
    order = jnp.arange(n)
    later = same_uu & ((upd_step[None, :] > upd_step[:, None]) |
                       ((upd_step[None, :] == upd_step[:, None]) & (order[None, :] > order[:, None])))
    is_last = valid_u & (jnp.sum(later.astype(jnp.int32), axis=1) == 0)
    return w_read, w_upd, jnp.exp(lam_r), jnp.exp(lam_u), is_last


def _scan_xla(upd_slot, upd_log_decay, upd_scale, upd_row, rows, read_slot, init_row, num_slots, chunk):
    _, t, ku = upd_slot.shape
    kr, ru, d = read_slot.shape[-1], rows.shape[2], rows.shape[-1]
    t_pad = -(-t // chunk) * chunk
    pads = [(upd_slot, -1), (upd_log_decay, 0.0), (upd_scale, 0.0), (upd_row, 0), (rows, 0.0), (read_slot, -1)]
    upd_slot, upd_log_decay, upd_scale, upd_row, rows, read_slot = (pad_axis(x, 1, t_pad, v) for x, v in pads)
    n_chunks = t_pad // chunk
    upd_step = jnp.repeat(jnp.arange(chunk), ku)
    read_step = jnp.repeat(jnp.arange(chunk), kr)

    def one_sequence(us, uld, usc, urow, rws, rs):
        def step(state, inputs):
            us_c, uld_c, usc_c, urow_c, rows_c, rs_c = inputs
            us_c, uld_c, usc_c, urow_c, rs_c = (x.reshape(-1) for x in (us_c, uld_c, usc_c, urow_c, rs_c))
            w_read, w_upd, decay_r, decay_u, is_last = _chunk_weights(us_c, upd_step, uld_c, rs_c, read_step)
            x = usc_c[:, None] * rows_c.reshape(chunk * ru, d)[upd_step * ru + urow_c]
            s0_u = state[jnp.maximum(us_c, 0)]
            s0_r = state[jnp.maximum(rs_c, 0)]
            hi = jax.lax.Precision.HIGHEST
            out = decay_r[:, None] * s0_r + jnp.dot(w_read, x, precision=hi)
            out = jnp.where(rs_c[:, None] >= 0, out, 0.0)
            end = decay_u[:, None] * s0_u + jnp.dot(w_upd, x, precision=hi)
            target = jnp.where(is_last, us_c, num_slots)  # row num_slots: a discard row
            state = state.at[target].set(end, mode="drop")
            return state, out.reshape(chunk, kr, d)

        state0 = jnp.broadcast_to(init_row, (num_slots, d)).astype(rows.dtype)
        chunks = [x.reshape(n_chunks, chunk, *x.shape[1:]) for x in (us, uld, usc, urow, rws, rs)]
        _, out = jax.lax.scan(step, state0, chunks)
        return out.reshape(t_pad, kr, d)

    out = jax.vmap(one_sequence)(upd_slot, upd_log_decay, upd_scale, upd_row, rows, read_slot)
    return out[:, :t]


# ----------------------------------------------------------------------------------------------------------
# GPU: Pallas with the Triton lowering.


def _output_buffer(shape, poison: bool):
    """The buffer the kernel writes its output into: NaN-filled when testing that every element is written."""
    return jnp.full(shape, jnp.nan if poison else 0.0, jnp.float32)


def _triton_kernel(us_ref, uld_ref, usc_ref, urow_ref, rs_ref, rows_ref, state_in_ref, out_in_ref, out_ref,
                   state_ref, *, chunk, ku, kr, ru, d_tile, n_chunks, slots_stride, t_pad, interpret):
    del state_in_ref, out_in_ref  # aliased with state_ref and out_ref
    from jax.experimental.pallas import triton as plgpu

    seq = pl.program_id(0)
    col = pl.program_id(1)
    cols = pl.ds(pl.multiple_of(col * d_tile, d_tile), d_tile)
    nu, nr = chunk * ku, chunk * kr
    upd_step = jax.lax.broadcasted_iota(jnp.int32, (nu,), 0) // ku
    read_step = jax.lax.broadcasted_iota(jnp.int32, (nr,), 0) // kr
    state_base = seq * slots_stride
    discard = state_base + slots_stride - 1

    def barrier():
        if not interpret:
            plgpu.debug_barrier()

    def load_inputs(c):
        """The chunk's codes and added rows: they do not depend on the state, so they are loaded one chunk
        ahead and their latency hides behind the previous chunk's work."""
        u0 = seq * t_pad * ku + c * nu
        us = us_ref[pl.ds(u0, nu)]
        urow = urow_ref[pl.ds(u0, nu)]
        row_ids = (seq * t_pad + c * chunk + upd_step) * ru + urow
        x = usc_ref[pl.ds(u0, nu)][:, None] * rows_ref[row_ids, cols]
        return us, uld_ref[pl.ds(u0, nu)], x, rs_ref[pl.ds(seq * t_pad * kr + c * nr, nr)]

    def body(c, inputs):
        us, uld, x, rs = inputs
        upcoming = load_inputs(jnp.minimum(c + 1, n_chunks - 1))
        w_read, w_upd, decay_r, decay_u, is_last = _chunk_weights(us, upd_step, uld, rs, read_step)
        s0_u = state_ref[state_base + jnp.maximum(us, 0), cols]
        s0_r = state_ref[state_base + jnp.maximum(rs, 0), cols]
        hi = jax.lax.Precision.HIGHEST
        out = decay_r[:, None] * s0_r + jnp.dot(w_read, x, precision=hi)
        out = jnp.where(rs[:, None] >= 0, out, 0.0)
        end = decay_u[:, None] * s0_u + jnp.dot(w_upd, x, precision=hi)
        out_ref[pl.ds(seq * t_pad * kr + c * nr, nr), cols] = out.astype(out_ref.dtype)
        barrier()  # every thread has gathered this chunk's S0 before any row is overwritten
        state_ref[jnp.where(is_last, state_base + us, discard), cols] = end
        barrier()  # the stores are visible before the next chunk gathers
        return upcoming

    jax.lax.fori_loop(0, n_chunks, body, load_inputs(0))


def _scan_triton(upd_slot, upd_log_decay, upd_scale, upd_row, rows, read_slot, init_row, num_slots, chunk,
                 interpret, num_warps, d_tile, poison_output):
    g, t, ku = upd_slot.shape
    kr, ru, d = read_slot.shape[-1], rows.shape[2], rows.shape[-1]
    # Triton arrays have power-of-2 sizes and matrix products need >= 16 rows: pad the events per step and
    # the chunk, and the columns to whole tiles.
    ku_p, kr_p = next_pow2(ku), next_pow2(kr)
    chunk = max(chunk, 16 // min(ku_p, kr_p), 1)
    d_tile = min(d_tile, next_pow2(max(d, 16)))
    d_pad = -(-d // d_tile) * d_tile
    t_pad = -(-t // chunk) * chunk
    upd_slot = pad_axis(pad_axis(upd_slot, 2, ku_p, -1), 1, t_pad, -1)
    upd_log_decay = pad_axis(pad_axis(upd_log_decay, 2, ku_p, 0.0), 1, t_pad, 0.0)
    upd_scale = pad_axis(pad_axis(upd_scale, 2, ku_p, 0.0), 1, t_pad, 0.0)
    upd_row = pad_axis(pad_axis(upd_row, 2, ku_p, 0), 1, t_pad, 0)
    read_slot = pad_axis(pad_axis(read_slot, 2, kr_p, -1), 1, t_pad, -1)
    rows = pad_axis(pad_axis(rows, 1, t_pad, 0.0), 3, d_pad, 0.0).astype(jnp.float32)
    slots_stride = num_slots + 1  # one discard row per sequence takes the stores of non-last updates
    state = jnp.broadcast_to(pad_axis(init_row.astype(jnp.float32), 0, d_pad, 0.0), (g * slots_stride, d_pad))
    kernel = functools.partial(_triton_kernel, chunk=chunk, ku=ku_p, kr=kr_p, ru=ru, d_tile=d_tile,
                               n_chunks=t_pad // chunk, slots_stride=slots_stride, t_pad=t_pad,
                               interpret=interpret)
    flat = [x.reshape(-1) for x in (upd_slot, upd_log_decay.astype(jnp.float32), upd_scale.astype(jnp.float32),
                                    upd_row, read_slot)]
    extra = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        extra["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    out, _ = pl.pallas_call(
        kernel,
        grid=(g, d_pad // d_tile),
        out_shape=(jax.ShapeDtypeStruct((g * t_pad * kr_p, d_pad), jnp.float32),
                   jax.ShapeDtypeStruct(state.shape, jnp.float32)),
        input_output_aliases={6: 1, 7: 0},
        interpret=interpret,
        name="sparse_gated_scan",
        **extra,
    )(*flat, rows.reshape(g * t_pad * ru, d_pad), state, _output_buffer((g * t_pad * kr_p, d_pad), poison_output))
    return out.reshape(g, t_pad, kr_p, d_pad)[:, :t, :kr, :d]


# ----------------------------------------------------------------------------------------------------------
# TPU: Pallas Mosaic. The state of one sequence lives in VMEM; tokens stream in order.


def _tpu_kernel(us_ref, uld_ref, usc_ref, urow_ref, rs_ref, init_ref, rows_ref, out_in_ref, out_ref, state_ref, *,
                chunk, ku, kr, num_slots):
    del out_in_ref  # aliased with out_ref
    c = pl.program_id(1)

    @pl.when(c == 0)
    def _():
        state_ref[...] = jnp.broadcast_to(init_ref[...], state_ref.shape)

    def token(t, carry):
        # Decays first, then additions: several events of one step on one slot compose in any order.
        for e in range(ku):
            slot = us_ref[0, t * ku + e]

            @pl.when(slot >= 0)
            def _():
                rowv = state_ref[pl.ds(slot, 1), :]
                state_ref[pl.ds(slot, 1), :] = jnp.exp(uld_ref[0, t * ku + e]) * rowv

        for e in range(ku):
            slot = us_ref[0, t * ku + e]

            @pl.when(slot >= 0)
            def _():
                src = rows_ref[0, t, pl.ds(urow_ref[0, t * ku + e], 1), :]
                state_ref[pl.ds(slot, 1), :] = state_ref[pl.ds(slot, 1), :] + usc_ref[0, t * ku + e] * src

        for j in range(kr):
            slot = rs_ref[0, t * kr + j]
            value = state_ref[pl.ds(jnp.maximum(slot, 0), 1), :]
            out_ref[0, t, pl.ds(j, 1), :] = jnp.where(slot >= 0, value, 0.0)
        return carry

    jax.lax.fori_loop(0, chunk, token, 0)


def _scan_tpu(upd_slot, upd_log_decay, upd_scale, upd_row, rows, read_slot, init_row, num_slots, chunk,
              interpret, poison_output):
    from jax.experimental.pallas import tpu as pltpu

    g, t, ku = upd_slot.shape
    kr, ru, d = read_slot.shape[-1], rows.shape[2], rows.shape[-1]
    t_pad = -(-t // chunk) * chunk
    pads = [(upd_slot, -1), (upd_log_decay, 0.0), (upd_scale, 0.0), (upd_row, 0), (read_slot, -1)]
    us, uld, usc, urow, rs = (pad_axis(x, 1, t_pad, v) for x, v in pads)
    us, uld, usc, urow = (x.reshape(g, t_pad * ku) for x in (us, uld, usc, urow))
    rs = rs.reshape(g, t_pad * kr)
    rows = pad_axis(rows, 1, t_pad, 0.0).astype(jnp.float32)
    smem = functools.partial(pl.BlockSpec, memory_space=pltpu.SMEM)
    kernel = functools.partial(_tpu_kernel, chunk=chunk, ku=ku, kr=kr, num_slots=num_slots)
    out_spec = pl.BlockSpec((1, chunk, kr, d), lambda s, c: (s, c, 0, 0))
    out = pl.pallas_call(
        kernel,
        grid=(g, t_pad // chunk),
        in_specs=[smem((1, chunk * ku), lambda s, c: (s, c))] * 4 + [
            smem((1, chunk * kr), lambda s, c: (s, c)),
            pl.BlockSpec((1, d), lambda s, c: (0, 0)),
            pl.BlockSpec((1, chunk, ru, d), lambda s, c: (s, c, 0, 0)),
            out_spec,
        ],
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct((g, t_pad, kr, d), jnp.float32),
        scratch_shapes=[pltpu.VMEM((num_slots, d), jnp.float32)],
        input_output_aliases={7: 0},
        interpret=interpret,
        name="sparse_gated_scan_tpu",
    )(us, uld.astype(jnp.float32), usc.astype(jnp.float32), urow, rs, init_row.reshape(1, d).astype(jnp.float32),
      rows, _output_buffer((g, t_pad, kr, d), poison_output))
    return out[:, :t]


# ----------------------------------------------------------------------------------------------------------


def sparse_gated_scan(upd_slot, upd_log_decay, upd_scale, upd_row, rows, read_slot, init_row, *, num_slots: int,
                      backend: str = "xla", chunk: int = 16, interpret: bool = False, num_warps: int = 4,
                      d_tile: int = 32, poison_output: bool = False):
    """Runs the scan described in the module docstring; returns out `[G, T, K_read, D]` in fp32.

    Args:
      upd_slot, upd_log_decay, upd_scale, upd_row: `[G, T, K_upd]` update events (slot, log-decay <= 0,
        scale of the added row, which of the step's rows to add).
      rows: `[G, T, rows_per_step, D]` the rows the updates add.
      read_slot: `[G, T, K_read]` slots read after each step's updates.
      init_row: `[D]` every slot's initial row.
      num_slots: M.
      backend: "xla", "triton", "tpu" or "sorted".
      chunk: tokens per chunk (a power of 2): the unit of the xla/triton chunk maths and of the TPU time grid;
        for "sorted", sorted update events per block.
      interpret: run a Pallas backend in interpret mode (any device, the CPU included).
      num_warps, d_tile: Triton launch shape: warps per program and columns per program.
      poison_output: fill the kernel's output buffer with NaN before it runs (tests: an element the kernel
        fails to write then shows up).
    """
    _check(upd_slot, upd_log_decay, upd_scale, upd_row, rows, read_slot, init_row, num_slots, chunk)
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {BACKENDS}, got {backend!r}")
    args = (upd_slot.astype(jnp.int32), upd_log_decay.astype(jnp.float32), upd_scale.astype(jnp.float32),
            upd_row.astype(jnp.int32), rows.astype(jnp.float32), read_slot.astype(jnp.int32),
            init_row.astype(jnp.float32))
    if backend == "xla":
        return _scan_xla(*args, num_slots, chunk)
    if backend == "sorted":
        return sorted_gated_scan(*args, num_slots=num_slots, block=chunk)
    if backend == "triton":
        return _scan_triton(*args, num_slots, chunk, interpret, num_warps, d_tile, poison_output)
    return _scan_tpu(*args, num_slots, chunk, interpret, poison_output)


def sparse_gated_scan_loop(upd_slot, upd_log_decay, upd_scale, upd_row, rows, read_slot, init_row, num_slots):
    """NumPy float64 token loop: the contract written as plainly as possible (tests only)."""
    upd_slot, upd_log_decay, upd_scale, upd_row, rows, read_slot, init_row = (
        np.asarray(x) for x in (upd_slot, upd_log_decay, upd_scale, upd_row, rows, read_slot, init_row))
    g, t, ku = upd_slot.shape
    out = np.zeros(read_slot.shape + (rows.shape[-1],))
    for s in range(g):
        state = np.tile(init_row.astype(np.float64), (num_slots, 1))
        for step in range(t):
            for e in range(ku):
                if upd_slot[s, step, e] >= 0:
                    state[upd_slot[s, step, e]] *= np.exp(np.float64(upd_log_decay[s, step, e]))
            for e in range(ku):
                if upd_slot[s, step, e] >= 0:
                    state[upd_slot[s, step, e]] += upd_scale[s, step, e] * rows[s, step, upd_row[s, step, e]]
            for j, slot in enumerate(read_slot[s, step]):
                out[s, step, j] = state[slot] if slot >= 0 else 0.0
    return out
