"""PDMA (RAM-Net's memory update and read) forward and backward on the sparse gated scan kernels.

    S_t[m] = (1 - w_t[m])^gamma S_{t-1}[m] + w_t[m] v_t        S_0 = 0
    z_t[m] = (1 - w_t[m])^gamma z_{t-1}[m] + w_t[m]            z_0 = 1 / M
    o_t    = sum_j r_tj S_t[slot_tj] / (z_t[slot_tj] + eps)

Forward: one scan over rows [v_t, 1] (S and z side by side) whose reads return, per token, the K read slots
after the write and the K slots the next token writes, before it (the values the backward pass needs).
Backward: the adjoint of a per-slot scalar-gated recurrence is the same recurrence backwards in time, so a
second scan runs over reversed time: at step t it decays the slots written at t + 1, adds each read's
cotangent row [r g_t / (z + eps), -r (g_t . S) / (z + eps)^2] to its slot, and reads the adjoint at the slots
written at t. The gradients of v, w and r are then local sums.

Repeated indices in one token's write code act as one write with the summed weight (w_t is a scatter-add),
matching ramjax's dense reference. The backward pass differentiates (grad_eps + (1 - grad_eps)(1 - w))^gamma in
place of (1 - w)^gamma (RAM-Net's proxy); the forward pass is exact up to a floor of exp(-60) on the decay.

Backend "sorted" has a forward and backward pass of its own (pdma_sorted.py: the adjoint of the slot-sorted
recurrence, reusing the forward pass's sorts); `pdma` dispatches to it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels.pdma_math import from_sequences, log_decay, merged_writes, proxy_derivative, to_sequences
from kernels.pdma_sorted import pdma_sorted
from kernels.sparse_scan import BACKENDS as SCAN_BACKENDS
from kernels.sparse_scan import sparse_gated_scan
from kernels.token_scan import token_scan

# "token": the token scan (kernels/token_scan.py, GPUs); the others run the sparse gated scan of that name.
BACKENDS = SCAN_BACKENDS + ("token",)

class PDMAOptions(NamedTuple):
    num_slots: int
    gamma: float
    eps: float
    grad_eps: float
    backend: str
    bwd_backend: str
    chunk: int
    interpret: bool
    num_warps: int
    d_tile: int
    poison_output: bool


def _scan(opts: PDMAOptions, backend: str, *args):
    kwargs = dict(num_slots=opts.num_slots, backend=backend, chunk=opts.chunk, interpret=opts.interpret)
    if backend == "triton":
        kwargs.update(num_warps=opts.num_warps, d_tile=opts.d_tile)
    if backend != "xla":
        kwargs.update(poison_output=opts.poison_output)
    return sparse_gated_scan(*args, **kwargs)


def _saved_dtype(v_dtype):
    """The dtype the backward pass's memory rows are kept in: v's when v is 16-bit (bf16 training: the rows are
    then as precise as the values they sum), else float32. The normalisers always stay float32."""
    return v_dtype if jnp.dtype(v_dtype).itemsize < 4 else jnp.float32


def _forward(opts: PDMAOptions, read_idx, read_val, write_idx, write_val, v):
    batch, _, _, k = read_idx.shape
    d_v = v.shape[-1]
    ri, rv, wi, wv, vs = (to_sequences(x) for x in (read_idx, read_val, write_idx, write_val, v))
    rv, wv = rv.astype(jnp.float32), wv.astype(jnp.float32)
    slot, w, _ = merged_writes(wi, wv)
    ld = log_decay(w, opts.gamma)
    rows = jnp.concatenate([vs.astype(jnp.float32), jnp.ones_like(vs[..., :1], jnp.float32)], axis=-1)[:, :, None]
    next_slot = jnp.concatenate([slot[:, 1:], jnp.full_like(slot[:, :1], -1)], axis=1)
    init = jnp.zeros((d_v + 1,), jnp.float32).at[d_v].set(1.0 / opts.num_slots)
    y = _scan(opts, opts.backend, slot, ld, w, jnp.zeros_like(slot), rows,
              jnp.concatenate([ri, next_slot], axis=-1), init)
    after = y[:, :, :k]  # [G, T, K, d_v + 1]: the read slots after the write
    inv_den = 1.0 / (after[..., d_v] + opts.eps)
    o = jnp.einsum("gtk,gtkd->gtd", rv * inv_den, after[..., :d_v])
    # Saved for the backward pass: the read rows after the write and the rows token t + 1 writes, before it
    # writes (so "before the write at t" is the saved row of t - 1: no shifted copy is made here).
    saved = _saved_dtype(v.dtype)
    states = (after[..., :d_v].astype(saved), after[..., d_v], y[:, :, k:, :d_v].astype(saved), y[:, :, k:, d_v])
    residuals = (ri, rv, wi, wv, vs, slot, w, ld) + states
    return from_sequences(o, batch).astype(v.dtype), residuals


def _decay_gradient(q_s, q_z, before_next, before_next_z, num_slots, time_axis):
    """d loss / d decay at each write: q . (S, z) before the write. Before step t that is what the forward pass
    read at t - 1 for step t; before step 0, (0, 1 / M)."""
    later = [slice(None)] * q_s.ndim
    earlier = list(later)
    later[time_axis], earlier[time_axis] = slice(1, None), slice(None, -1)
    first = list(later)
    first[time_axis] = slice(0, 1)
    later_z, earlier_z, first_z = (tuple(x[:-1]) for x in (later, earlier, first))
    d_later = (jnp.sum(q_s[tuple(later)] * before_next[tuple(earlier)].astype(jnp.float32), axis=-1)
               + q_z[later_z] * before_next_z[earlier_z])
    return jnp.concatenate([q_z[first_z] / num_slots, d_later], axis=time_axis)


def _backward(opts: PDMAOptions, batch, dtypes, residuals, g_o):
    ri, rv, wi, wv, vs, slot, w, ld, after, after_z, before_next, before_next_z = residuals
    d_v = vs.shape[-1]
    k = ri.shape[-1]
    g = to_sequences(g_o).astype(jnp.float32)
    inv_den = 1.0 / (after_z + opts.eps)
    g_dot_s = jnp.einsum("gtd,gtkd->gtk", g, after.astype(jnp.float32))
    d_read_val = g_dot_s * inv_den
    # Each read's cotangent on its slot's (S, z) after the write.
    add_rows = jnp.concatenate([(rv * inv_den)[..., None] * g[:, :, None, :],
                                (-rv * g_dot_s * inv_den**2)[..., None]], axis=-1)
    next_slot = jnp.concatenate([slot[:, 1:], jnp.full_like(slot[:, :1], -1)], axis=1)
    next_decay = jnp.concatenate([ld[:, 1:], jnp.zeros_like(ld[:, :1])], axis=1)
    upd_slot = jnp.concatenate([ri, next_slot], axis=-1)
    upd_log_decay = jnp.concatenate([jnp.zeros_like(rv), next_decay], axis=-1)
    upd_scale = jnp.concatenate([jnp.ones_like(rv), jnp.zeros_like(next_decay)], axis=-1)
    upd_row = jnp.concatenate([jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), ri.shape),
                               jnp.zeros_like(next_slot)], axis=-1)
    reverse = functools.partial(jnp.flip, axis=1)
    adjoint = reverse(_scan(opts, opts.bwd_backend, *(reverse(x) for x in (upd_slot, upd_log_decay, upd_scale,
                                                                           upd_row, add_rows, slot)),
                            jnp.zeros((d_v + 1,), jnp.float32)))
    q_s, q_z = adjoint[..., :d_v], adjoint[..., d_v]  # adjoint of (S_t, z_t) at the slots written at t
    d_v_rows = jnp.einsum("gti,gtid->gtd", w, q_s)
    d_decay = _decay_gradient(q_s, q_z, before_next, before_next_z, opts.num_slots, time_axis=1)
    d_w = (jnp.einsum("gtid,gtd->gti", q_s, vs.astype(jnp.float32)) + q_z
           + d_decay * proxy_derivative(w, opts.gamma, opts.grad_eps))
    d_w = jnp.where(slot >= 0, d_w, 0.0)
    # Repeated indices: every original event of a slot gets the merged event's gradient.
    _, _, same = merged_writes(wi, wv)
    d_write_val = jnp.einsum("gtij,gtj->gti", same.astype(d_w.dtype), d_w)
    read_dtype, write_dtype, v_dtype = dtypes
    return (None, from_sequences(d_read_val, batch).astype(read_dtype), None,
            from_sequences(d_write_val, batch).astype(write_dtype), from_sequences(d_v_rows, batch).astype(v_dtype))


def _columns(x):
    """[G, T, K] -> [G, K, T]: the token scan's event layout."""
    return jnp.swapaxes(x, 1, 2)


def _token_scan(opts: PDMAOptions, *args, **kwargs):
    return token_scan(*args, num_slots=opts.num_slots, chunk=opts.chunk, d_tile=opts.d_tile,
                      num_warps=opts.num_warps, interpret=opts.interpret, poison_output=opts.poison_output, **kwargs)


def _forward_token(opts: PDMAOptions, read_idx, read_val, write_idx, write_val, v):
    """The forward pass on the token scan: the writes are both its decay and its add events (rows v, scalars
    w for the normaliser); it reads the K read slots after each step and the K slots the next step writes."""
    batch, k = read_idx.shape[0], read_idx.shape[-1]
    ri, rv, wi, wv = (to_sequences(x) for x in (read_idx, read_val, write_idx, write_val))
    rv, wv = rv.astype(jnp.float32), wv.astype(jnp.float32)
    vs = to_sequences(v)
    slot, w, _ = merged_writes(wi, wv)
    ld = log_decay(w, opts.gamma)
    next_slot = jnp.concatenate([slot[:, 1:], jnp.full_like(slot[:, :1], -1)], axis=1)
    out, out_z = _token_scan(opts, _columns(slot), _columns(ld), _columns(slot), _columns(w), _columns(w), vs,
                             _columns(jnp.concatenate([ri, next_slot], axis=-1)),
                             jnp.zeros((vs.shape[-1],), jnp.float32), 1.0 / opts.num_slots, adds_are_decays=True)
    after, after_z = out[:, :k], out_z[:, :k]  # [G, K, T, d_v], [G, K, T]: the read slots after the write
    inv_den = 1.0 / (after_z + opts.eps)
    o = jnp.einsum("gkt,gktd->gtd", _columns(rv) * inv_den, after)
    saved = _saved_dtype(v.dtype)  # the slots step t + 1 writes, before it writes: out[:, k:]
    residuals = (ri, rv, wi, wv, vs, slot, w, ld, after.astype(saved), after_z, out[:, k:].astype(saved),
                 out_z[:, k:])
    return from_sequences(o, batch).astype(v.dtype), residuals


def _backward_token(opts: PDMAOptions, batch, dtypes, residuals, g_o):
    """The backward pass: one token scan over reversed time on the adjoint of (S, z). Its decay events are the
    next step's writes, its add events the reads (row g_t, coefficient r / (z + eps), scalar
    -r (g_t . S) / (z + eps)^2), and it reads the adjoint at the slots written at t."""
    ri, rv, wi, wv, vs, slot, w, ld, after, after_z, before_next, before_next_z = residuals
    g = to_sequences(g_o).astype(jnp.float32)
    inv_den = 1.0 / (after_z + opts.eps)  # [G, K, T]
    g_dot_s = jnp.einsum("gtd,gktd->gkt", g, after.astype(jnp.float32))
    rv_c = _columns(rv)
    d_read_val = jnp.swapaxes(g_dot_s * inv_den, 1, 2)
    next_slot = jnp.concatenate([slot[:, 1:], jnp.full_like(slot[:, :1], -1)], axis=1)
    next_decay = jnp.concatenate([ld[:, 1:], jnp.zeros_like(ld[:, :1])], axis=1)
    q_s, q_z = _token_scan(opts, _columns(next_slot), _columns(next_decay), _columns(ri), rv_c * inv_den,
                           -rv_c * g_dot_s * inv_den**2, g, _columns(slot), jnp.zeros((g.shape[-1],), jnp.float32),
                           0.0, reverse=True)  # adjoint of (S_t, z_t) at the slots written at t: [G, K, T, ...]
    w_c = _columns(w)
    d_v_rows = jnp.einsum("gkt,gktd->gtd", w_c, q_s)
    d_decay = _decay_gradient(q_s, q_z, before_next, before_next_z, opts.num_slots, time_axis=2)
    d_w = (jnp.einsum("gktd,gtd->gkt", q_s, vs.astype(jnp.float32)) + q_z
           + d_decay * proxy_derivative(w_c, opts.gamma, opts.grad_eps))
    d_w = jnp.swapaxes(jnp.where(_columns(slot) >= 0, d_w, 0.0), 1, 2)
    _, _, same = merged_writes(wi, wv)
    d_write_val = jnp.einsum("gtij,gtj->gti", same.astype(d_w.dtype), d_w)
    read_dtype, write_dtype, v_dtype = dtypes
    return (None, from_sequences(d_read_val, batch).astype(read_dtype), None,
            from_sequences(d_write_val, batch).astype(write_dtype), from_sequences(d_v_rows, batch).astype(v_dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pdma(opts, read_idx, read_val, write_idx, write_val, v):
    return _pdma_fwd(opts, read_idx, read_val, write_idx, write_val, v)[0]


def _pdma_fwd(opts, read_idx, read_val, write_idx, write_val, v):
    forward = _forward_token if opts.backend == "token" else _forward
    o, residuals = forward(opts, read_idx, read_val, write_idx, write_val, v)
    # Residuals must be arrays: empty ones carry the input dtypes for the gradients.
    dtype_tags = tuple(jnp.zeros((0,), x.dtype) for x in (read_val, write_val, v))
    return o, (residuals, dtype_tags)


def _pdma_bwd(opts, saved, g_o):
    residuals, dtype_tags = saved
    backward = _backward_token if opts.backend == "token" else _backward
    return backward(opts, g_o.shape[0], tuple(x.dtype for x in dtype_tags), residuals, g_o)


_pdma.defvjp(_pdma_fwd, _pdma_bwd)


def pdma(read_idx, read_val, write_idx, write_val, v, *, num_slots: int, gamma: float = 1.0, eps: float = 1e-6,
         grad_eps: float = 1e-3, backend: str = "triton", xla_backward: bool = False, chunk: int = 16,
         interpret: bool = False, num_warps: int = 4, d_tile: int = 32, poison_output: bool = False,
         block_kernel: bool = False) -> jax.Array:
    """PDMA read-out o `[batch, time, heads, d_v]` (v's dtype) from sparse codes, differentiable.

    Args:
      read_idx, read_val, write_idx, write_val: `[batch, time, heads, K]` sparse addresses (slot, weight).
      v: `[batch, time, heads, d_v]` values written (any float dtype; the state is fp32).
      num_slots: M; gamma: decay power >= 0; eps: added to the normaliser; grad_eps: the backward proxy's.
      backend: "token" (the token scan, GPU), "triton" (the sparse gated scan's GPU kernel), "tpu" or "xla"
        (the sparse gated scan's chunked maths in jax.numpy), "sorted" (pdma_sorted.py: writes sorted by slot,
        its own backward pass; `chunk` is its block of sorted events).
      xla_backward: run the backward scan with backend "xla" whatever `backend` is (for debugging a kernel;
        not for backend "token").
      chunk, num_warps, d_tile: kernel tiling (see sparse_scan.sparse_gated_scan).
      interpret: run the Pallas kernels in interpret mode (on any device, the CPU included).
      poison_output: NaN-fill the kernels' output buffers first (tests: an unwritten element shows).
      block_kernel: backend "sorted" only: the in-block recurrence by its Pallas kernel (sorted_blocks.py).

    Indices are not checked here (ramjax.ops.pdma does): an index outside [0, M) is undefined.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {BACKENDS}, got {backend!r}")
    if backend == "token" and xla_backward:
        raise ValueError("xla_backward: the token scan has its own backward pass; use it with another backend")
    if backend == "sorted":
        if xla_backward:
            raise ValueError("xla_backward: the sorted backend has its own backward pass; use it with another backend")
        return pdma_sorted(read_idx, read_val, write_idx, write_val, v, num_slots=num_slots, gamma=gamma, eps=eps,
                           grad_eps=grad_eps, block=chunk, block_kernel=block_kernel, interpret=interpret)
    opts = PDMAOptions(int(num_slots), float(gamma), float(eps), float(grad_eps), backend,
                       "xla" if xla_backward else backend, int(chunk), bool(interpret), int(num_warps), int(d_tile),
                       bool(poison_output))
    return _pdma(opts, jnp.asarray(read_idx, jnp.int32), jnp.asarray(read_val), jnp.asarray(write_idx, jnp.int32),
                 jnp.asarray(write_val), jnp.asarray(v))
