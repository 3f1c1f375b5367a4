"""The sorted scan's segmented recurrence with its blocks in one Pallas kernel (Triton lowering, GPUs).

    forward   h[i]   = x[i] + exp(ld[i]) h[i - 1]       restarting (from 0) where starts[i]
    reverse   lam[i] = x[i] + exp(ld[i]) lam[i + 1]     ending where starts[i] (lam[i + 1] does not reach i)

for rows x = [x_v, x_z] (a power-of-2-wide part through the matrix unit, and one scalar column: PDMA's
normaliser, so width d_v + 1 is not padded to 2 d_v). ld must be 0 where starts.

In blocks of C events, like `sorted_scan.blocked_recurrence`, but without writing the [C, C] block weights or
the block-local values to global memory:
  1. (jax.numpy, scalars) per block, the weights of its edge event (the last one; the first in reverse) and the
     decay across the block; the edge values are one weighted sum over x per block, then an associative scan
     over blocks gives each block's carried-in value;
  2. (this kernel) per block, L x + decay * carried-in, with L[i, j] = [j on i's side, same segment]
     exp(c[i] - c[j]) built on chip from the block's starts and log-decays: x is read once, h written once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.scans import carry_scan, segmented_cumsum
from kernels.shapes import next_pow2, pad_axis


def _weights(starts, ld, reverse: bool):
    """[C, C] block weights and each event's decay to the block's carried-in value, from [C] starts and ld."""
    block = ld.shape[-1]
    row = jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (block, block), 1)
    side = col >= row if reverse else col <= row  # events whose values reach row's event within the block
    segment = jnp.sum(jnp.where(side, starts[None, :], 0), axis=1)  # 0: still the carried-in segment
    linked = side & (segment[:, None] == segment[None, :])
    c = jnp.sum(jnp.where(linked, ld[None, :], 0.0), axis=1)
    weights = jnp.where(linked, jnp.exp(jnp.where(linked, c[:, None] - c[None, :], 0.0)), 0.0)
    return weights, jnp.where(segment == 0, jnp.exp(c), 0.0)


def _kernel(starts_ref, ld_ref, xv_ref, xz_ref, carry_v_ref, carry_z_ref, *refs, reverse):
    hv_ref, hz_ref = refs[-2:]  # (with poison_output, the aliased NaN buffers come first)
    weights, decay = _weights(starts_ref[...], ld_ref[...], reverse)
    hv_ref[...] = (jnp.dot(weights, xv_ref[...], precision=jax.lax.Precision.HIGHEST)
                   + decay[:, None] * carry_v_ref[...][None, :])
    hz_ref[...] = jnp.sum(weights * xz_ref[...][None, :], axis=1) + decay * carry_z_ref[...]


def _edges(starts, ld, x_v, x_z, block):
    """Per block (forward order): its value at the last event from a zero carry-in and its decay across the block,
    computed on scalars and one weighted sum over x."""
    g, n = ld.shape
    shape = (g, n // block, block)
    starts, ld = starts.reshape(shape), ld.reshape(shape)
    c = segmented_cumsum(starts, ld, axis=-1)
    segment = jnp.cumsum(starts.astype(jnp.int32), axis=-1)
    linked = segment == segment[..., -1:]
    weight = jnp.where(linked, jnp.exp(jnp.where(linked, c[..., -1:] - c, 0.0)), 0.0)
    edge_v = jnp.einsum("gbj,gbjd->gbd", weight, x_v.reshape(*shape, -1), precision=jax.lax.Precision.HIGHEST)
    edge_z = jnp.sum(weight * x_z.reshape(shape), axis=-1)
    return edge_v, edge_z, jnp.where(segment[..., -1] == 0, jnp.exp(c[..., -1]), 0.0)


def _carried_in(starts, ld, x_v, x_z, block, reverse):
    """Each block's carried-in value (v part [G, nb, D], z part [G, nb])."""
    flip = functools.partial(jnp.flip, axis=1)
    if reverse:  # the reverse recurrence is the forward one on the reversed sequence
        starts, ld, x_v, x_z = flip(starts), flip(ld), flip(x_v), flip(x_z)
    edge_v, edge_z, decay = _edges(starts, ld, x_v, x_z, block)
    carried_v, carried_z = carry_scan(decay, edge_v), carry_scan(decay, edge_z)
    in_v = jnp.concatenate([jnp.zeros_like(carried_v[:, :1]), carried_v[:, :-1]], axis=1)
    in_z = jnp.concatenate([jnp.zeros_like(carried_z[:, :1]), carried_z[:, :-1]], axis=1)
    return (flip(in_v), flip(in_z)) if reverse else (in_v, in_z)


@functools.partial(jax.jit, static_argnames=("block", "reverse", "num_warps", "interpret", "poison_output"))
def segmented_recurrence(starts, ld, x_v, x_z, *, block: int, reverse: bool = False, num_warps: int = 4,
                         interpret: bool = False, poison_output: bool = False):
    """(h_v [G, N, D], h_z [G, N]) fp32 for starts [G, N] (bool), ld [G, N] (0 where starts), x_v [G, N, D],
    x_z [G, N]; `block` a power of 2 >= 16 (N is padded to a multiple of it). `poison_output`: the kernel's
    output buffers start as NaN (tests: an element it does not write shows)."""
    g, n, d = x_v.shape
    if block < 16 or block & (block - 1):
        raise ValueError(f"block: the Pallas block kernel needs a power of 2 >= 16, got {block}")
    n_pad = -(-n // block) * block
    width = max(16, next_pow2(d))
    # Padding events start segments of their own and add nothing (at the end: in reverse, they come first).
    starts, ld = pad_axis(starts, 1, n_pad, True), pad_axis(ld.astype(jnp.float32), 1, n_pad, 0.0)
    x_v = pad_axis(pad_axis(x_v.astype(jnp.float32), 1, n_pad, 0.0), 2, width, 0.0)
    x_z = pad_axis(x_z.astype(jnp.float32), 1, n_pad, 0.0)
    carry_v, carry_z = _carried_in(starts, ld, x_v, x_z, block, reverse)
    carry_z = jnp.repeat(carry_z, block, axis=1)  # per event: a [C] vector per program
    event = lambda i, b: (i, b)  # noqa: E731
    rows = pl.BlockSpec((None, block, width), lambda i, b: (i, b, 0))
    in_specs = [pl.BlockSpec((None, block), event), pl.BlockSpec((None, block), event), rows,
                pl.BlockSpec((None, block), event), pl.BlockSpec((None, None, width), lambda i, b: (i, b, 0)),
                pl.BlockSpec((None, block), event)]
    out_specs = [rows, pl.BlockSpec((None, block), event)]
    out_shape = [jax.ShapeDtypeStruct((g, n_pad, width), jnp.float32), jax.ShapeDtypeStruct((g, n_pad), jnp.float32)]
    inputs = [starts.astype(jnp.int32), ld, x_v, x_z, carry_v, carry_z]
    extra = {}
    if poison_output:
        inputs += [jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shape]
        in_specs += out_specs
        extra["input_output_aliases"] = {6: 0, 7: 1}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        extra["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    h_v, h_z = pl.pallas_call(
        functools.partial(_kernel, reverse=reverse), grid=(g, n_pad // block), in_specs=in_specs,
        out_specs=out_specs, out_shape=out_shape, interpret=interpret, name="sorted_scan_blocks", **extra,
    )(*inputs)
    return h_v[:, :n, :d], h_z[:, :n]
