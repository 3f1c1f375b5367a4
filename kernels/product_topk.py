"""RAM-Net's address decoder as one Pallas kernel: factor softmaxes, exact beam search, product values.

A key x of U * d_p entries is split into U factors; p_u = softmax(x_u / tau) over d_p entries each, and the
address is their Kronecker product over M = d_p ** U slots (mixed radix, first factor most significant). The
kernel returns its top-K entries, sorted by value descending with equal values ordered by the lower slot,
without ever forming the M products:

    beam <- [(value 1, slot 0)]
    for u in 1..U:   candidates (v * p_u[j], slot * d_p + j) for every beam entry and digit j
                     beam <- the best min(K, d_p ** u) candidates by (value descending, slot ascending)

Exact, because every prefix of a global top-K tuple is a top-K prefix (extending K better prefixes by the same
suffix would give K better tuples). Every value is the product p_1[i_1] * ... * p_U[i_U] formed left to right,
exactly as ramjax's XLA decoder and a brute-force Kronecker product form it, so the selected slots are the same
as theirs whenever the probabilities are (interpret mode: bit for bit).

One program handles a block of rows (one row = one (token, head) key), laid out as columns: the kernel reads
keys [U * d_p, N] and writes slots and values [K, N], so that each key entry and each of the K outputs is one
vector over the block's rows, and one thread owns one row. The K selections of a stage are K rounds of (max
over the candidates, the lowest slot holding it, mask it out) over [candidates, rows] arrays, inside a
thread's registers.

The backward pass is a second kernel: with val_k = prod_u p_u[digit_u(k)],

    d val_k / d x_u = val_k (onehot(digit_u(k)) - p_u) / tau,

so dx_u[j] = (sum_k g_k val_k [digit_u(k) = j] - p_u[j] sum_k g_k val_k) / tau, recomputing p from x.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.shapes import next_pow2

# An int32 larger than any slot index: M < 2 ** 31 (ramjax.ops checks it).
_NO_SLOT = 2**31 - 1


def _softmax_rows(x_ref, cols, u, d_p, temperature):
    """Factor u's probabilities: d_p vectors [rows]."""
    logits = [x_ref[u * d_p + j, cols].astype(jnp.float32) / temperature for j in range(d_p)]
    top = functools.reduce(jnp.maximum, logits)
    e = [jnp.exp(logit - top) for logit in logits]
    total = functools.reduce(jnp.add, e)
    return [ej / total for ej in e]


def _stack(vectors, size):
    """[size, rows] with the given [rows] vectors as its first rows (zeros after): Triton arrays have
    power-of-2 sizes, so this is built with selects rather than a concatenation."""
    rows = vectors[0].shape[0]
    position = jax.lax.broadcasted_iota(jnp.int32, (size, rows), 0)
    out = jnp.zeros((size, rows), vectors[0].dtype)
    for i, vector in enumerate(vectors):
        out = jnp.where(position == i, vector[None, :], out)
    return out


def _decoder_kernel(x_ref, *refs, num_factors, d_p, top_k, temperature, num_slots, rows):
    """x_ref [U * d_p, N] keys (one column per row), idx_ref / val_ref [K, N]; this program's `rows` columns.

    Candidates run along the first axis of [candidates, rows] arrays and rows along the last, so that a
    thread owns whole columns and the reductions over candidates stay inside it."""
    idx_ref, val_ref = refs[-2:]
    cols = pl.ds(pl.multiple_of(pl.program_id(0) * rows, rows), rows)
    d_pad, k_pad = next_pow2(d_p), next_pow2(top_k)
    width = k_pad * d_pad
    digit = jax.lax.broadcasted_iota(jnp.int32, (k_pad, d_pad, rows), 1)
    beam_pos3 = jax.lax.broadcasted_iota(jnp.int32, (k_pad, d_pad, rows), 0)
    beam_pos = jax.lax.broadcasted_iota(jnp.int32, (k_pad, rows), 0)

    # Stage 0's beam: one entry of value 1 at slot 0 (1 * p is exact, so values match a plain product).
    beam_val = jnp.where(beam_pos == 0, 1.0, -1.0).astype(jnp.float32)
    beam_idx = jnp.zeros((k_pad, rows), jnp.int32)
    beam_size = 1
    for u in range(num_factors):
        probs = _stack(_softmax_rows(x_ref, cols, u, d_p, temperature), d_pad)  # [D, rows]
        valid = (beam_pos3 < beam_size) & (digit < d_p)
        cand_val = jnp.where(valid, beam_val[:, None, :] * probs[None, :, :], -1.0).reshape(width, rows)
        cand_idx = jnp.where(valid, beam_idx[:, None, :] * d_p + digit, -1).reshape(width, rows)
        # Valid candidates are >= 0 and have distinct slots; invalid ones (-1, slot -1) are never picked
        # because a stage keeps at most as many entries as it has valid candidates.
        beam_size = min(top_k, beam_size * d_p)
        for k in range(beam_size):
            best = jnp.max(cand_val, axis=0)
            slot = jnp.min(jnp.where(cand_val == best[None, :], cand_idx, _NO_SLOT), axis=0)
            # A NaN key matches nothing above: keep the slot in range so that no consumer reads out of bounds.
            slot = jnp.minimum(slot, num_slots - 1)
            beam_val = jnp.where(beam_pos == k, best[None, :], beam_val)
            beam_idx = jnp.where(beam_pos == k, slot[None, :], beam_idx)
            cand_val = jnp.where(cand_idx == slot[None, :], -1.0, cand_val)
    if top_k == k_pad:
        idx_ref[pl.ds(0, top_k), cols] = beam_idx
        val_ref[pl.ds(0, top_k), cols] = beam_val
    else:
        for k in range(top_k):
            idx_ref[k, cols] = jnp.sum(jnp.where(beam_pos == k, beam_idx, 0), axis=0)
            val_ref[k, cols] = jnp.sum(jnp.where(beam_pos == k, beam_val, 0.0), axis=0)


def _decoder_backward_kernel(x_ref, idx_ref, val_ref, g_ref, *refs, num_factors, d_p, top_k, temperature,
                             rows):
    """dx [U * d_p, N] from the keys, the kept slots and values [K, N] and their cotangents [K, N]."""
    dx_ref = refs[-1]
    cols = pl.ds(pl.multiple_of(pl.program_id(0) * rows, rows), rows)
    weighted = [g_ref[k, cols] * val_ref[k, cols] for k in range(top_k)]
    total = functools.reduce(jnp.add, weighted)
    slots = [idx_ref[k, cols] for k in range(top_k)]
    for u in range(num_factors):
        probs = _softmax_rows(x_ref, cols, u, d_p, temperature)
        digits = [(slot // d_p ** (num_factors - 1 - u)) % d_p for slot in slots]
        for j in range(d_p):
            on_digit = functools.reduce(jnp.add, [jnp.where(d == j, w, 0.0) for d, w in zip(digits, weighted)])
            dx_ref[u * d_p + j, cols] = (on_digit - probs[j] * total) / temperature


class _Launch(NamedTuple):
    num_factors: int
    top_k: int
    temperature: float
    block_rows: int
    num_warps: int
    interpret: bool
    poison_output: bool


def _call(kernel, launch: _Launch, n_pad, rows, out_rows, out_dtypes, *operands):
    """One pallas_call over column blocks of `rows`, outputs [out_rows, n_pad] each (optionally NaN-poisoned)."""
    out_shape = tuple(jax.ShapeDtypeStruct((r, n_pad), d) for r, d in zip(out_rows, out_dtypes))
    extra = {}
    if launch.poison_output:
        # Outputs start as garbage (NaN values, out-of-range slots): an element the kernel fails to write shows.
        poison = [jnp.full(s.shape, -7 if s.dtype == jnp.int32 else jnp.nan, s.dtype) for s in out_shape]
        extra["input_output_aliases"] = {len(operands) + i: i for i in range(len(poison))}
        operands = operands + tuple(poison)
    if not launch.interpret and jax.default_backend() == "gpu":
        from jax.experimental.pallas import triton as plgpu

        extra["compiler_params"] = plgpu.CompilerParams(num_warps=launch.num_warps, num_stages=1)
    return pl.pallas_call(kernel, grid=(n_pad // rows,), out_shape=out_shape, interpret=launch.interpret,
                          name=kernel.func.__name__.strip("_"), **extra)(*operands)


def _columns(x2, rows):
    """[N, F] -> [F, N_pad] (zeros in the padded columns), N_pad a multiple of rows."""
    n = x2.shape[0]
    return jnp.pad(x2.T, ((0, 0), (0, -(-n // rows) * rows - n)))


def _block_rows(launch: _Launch, n: int) -> int:
    return min(launch.block_rows, next_pow2(max(n, 1)))


def _decode(x2, launch: _Launch):
    """x2 [N, U * d_p] -> idx int32 [K, N_pad], val fp32 [K, N_pad] (columns past N are padding)."""
    d_p = x2.shape[1] // launch.num_factors
    rows = _block_rows(launch, x2.shape[0])
    x_t = _columns(x2, rows)
    kernel = functools.partial(_decoder_kernel, num_factors=launch.num_factors, d_p=d_p, top_k=launch.top_k,
                               temperature=launch.temperature, num_slots=d_p**launch.num_factors, rows=rows)
    return _call(kernel, launch, x_t.shape[1], rows, (launch.top_k,) * 2, (jnp.int32, jnp.float32), x_t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _product_topk(x, launch: _Launch):
    return _product_topk_fwd(x, launch)[0]


def _product_topk_fwd(x, launch: _Launch):
    lead, n = x.shape[:-1], math.prod(x.shape[:-1])
    idx_t, val_t = _decode(x.reshape(n, x.shape[-1]), launch)
    out = (idx_t[:, :n].T.reshape(*lead, launch.top_k), val_t[:, :n].T.reshape(*lead, launch.top_k))
    return out, (x, idx_t, val_t)


def _product_topk_bwd(launch: _Launch, saved, cotangents):
    x, idx_t, val_t = saved
    _, g_val = cotangents
    n, width = math.prod(x.shape[:-1]), x.shape[-1]
    rows = _block_rows(launch, n)
    g_t = _columns(g_val.reshape(n, launch.top_k).astype(jnp.float32), rows)
    kernel = functools.partial(_decoder_backward_kernel, num_factors=launch.num_factors,
                               d_p=width // launch.num_factors, top_k=launch.top_k,
                               temperature=launch.temperature, rows=rows)
    (dx_t,) = _call(kernel, launch, idx_t.shape[1], rows, (width,), (jnp.float32,),
                    _columns(x.reshape(n, width), rows), idx_t, val_t, g_t)
    return (dx_t[:, :n].T.reshape(x.shape).astype(x.dtype),)


_product_topk.defvjp(_product_topk_fwd, _product_topk_bwd)


def product_topk(x, *, num_factors: int, top_k: int, temperature: float = 1.0, block_rows: int = 128,
                 num_warps: int = 4, interpret: bool = False, poison_output: bool = False):
    """Exact top-K of the product-softmax address of each row of `x`, differentiable in x through the values.

    Args:
      x: `[..., U * d_p]` keys or queries (float16, bfloat16 or float32; computed in float32).
      num_factors: U. top_k: K, 1 <= K <= d_p ** U. temperature: tau in softmax(x_u / tau).
      block_rows: rows (keys) per program. num_warps: Triton warps per program (GPU).
      interpret: run the kernel in interpret mode (any device, the CPU included).
      poison_output: start the output buffers as NaN / out-of-range slots (tests: an unwritten element shows).

    Returns:
      idx int32 `[..., K]` and val float32 `[..., K]`: slots and values, sorted by value descending, equal
      values by lower slot. Arguments are not checked here (ramjax.ops.product_topk does).
    """
    launch = _Launch(int(num_factors), int(top_k), float(temperature), int(block_rows), int(num_warps),
                     bool(interpret), bool(poison_output))
    return _product_topk(x, launch)
