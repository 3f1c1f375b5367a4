"""The in-block part of the sorted scan's segmented recurrence as one Pallas kernel (Triton lowering, GPUs).

`sorted_scan.blocked_recurrence` computes, per block of C sorted events, the [C, C] weights
L[i, j] = [j <= i, same segment] exp(c[i] - c[j]) (c: the segment's running sum of log-decays in the block),
h_local = L x and each event's decay from the block start, in jax.numpy: XLA writes L to global memory and reads
it back for the product. This kernel does the same per block in one program, L never leaving the chip: it
reads the block's starts, log-decays and rows once and writes h_local and the decays once.

The segment ids and the running sums are masked row sums over the [C, C] triangle (C is small), the product
runs in fp32 (IEEE). Rows of width D go through the matrix unit in a power-of-2 width; the caller's last column
(PDMA's normaliser z) goes separately as a masked row sum, so D = d_v + 1 does not pad to 2 d_v.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.shapes import next_pow2, pad_axis


def _kernel(starts_ref, ld_ref, x_ref, col_ref, *refs):
    h_ref, h_col_ref, decay_ref = refs[-3:]  # (with poison_output, the aliased NaN buffers come first)
    block = ld_ref.shape[-1]
    starts = starts_ref[...]
    ld = ld_ref[...]
    row = jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (block, block), 1)
    lower = col <= row
    segment = jnp.sum(jnp.where(lower, starts[None, :], 0), axis=1)  # 0 while the carried segment continues
    linked = lower & (segment[:, None] == segment[None, :])
    c = jnp.sum(jnp.where(linked, ld[None, :], 0.0), axis=1)  # ld is 0 at segment starts
    weights = jnp.where(linked, jnp.exp(jnp.where(linked, c[:, None] - c[None, :], 0.0)), 0.0)
    h_ref[...] = jnp.dot(weights, x_ref[...], precision=jax.lax.Precision.HIGHEST)
    h_col_ref[...] = jnp.sum(weights * col_ref[...][None, :], axis=1)
    decay_ref[...] = jnp.where(segment == 0, jnp.exp(c), 0.0)


@functools.partial(jax.jit, static_argnames=("block", "num_warps", "interpret", "poison_output"))
def block_values(starts, ld, x, *, block: int, num_warps: int = 4, interpret: bool = False,
                 poison_output: bool = False):
    """Per block of `block` events: (h_local [G, nb, C, D], decay from the block start [G, nb, C]), as
    `sorted_scan.block_weights` followed by the product, for starts [G, N] (bool), ld [G, N] (0 at starts),
    x [G, N, D] (fp32) with N a multiple of `block` (a power of 2, >= 16). `poison_output`: the output buffers
    start as NaN (tests: an element the kernel does not write shows)."""
    g, n, d = x.shape
    if block < 16 or block & (block - 1):
        raise ValueError(f"block: the Pallas block kernel needs a power of 2 >= 16, got {block}")
    if n % block:
        raise ValueError(f"x: {n} events is not a multiple of block = {block}")
    nb = n // block
    width = max(16, next_pow2(d - 1))
    main = pad_axis(x[..., : d - 1], 2, width, 0.0)
    last = x[..., d - 1]
    event = lambda i, b: (i, b)  # noqa: E731
    extra = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        extra["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    row_spec = pl.BlockSpec((None, block, width), lambda i, b: (i, b, 0))
    out_specs = [row_spec, pl.BlockSpec((None, block), event), pl.BlockSpec((None, block), event)]
    out_shape = [jax.ShapeDtypeStruct((g, n, width), jnp.float32), jax.ShapeDtypeStruct((g, n), jnp.float32),
                 jax.ShapeDtypeStruct((g, n), jnp.float32)]
    inputs = [starts.astype(jnp.int32), ld, main, last]
    in_specs = [pl.BlockSpec((None, block), event), pl.BlockSpec((None, block), event), row_spec,
                pl.BlockSpec((None, block), event)]
    if poison_output:
        inputs += [jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shape]
        in_specs += out_specs
        extra["input_output_aliases"] = {4: 0, 5: 1, 6: 2}
    h, h_col, decay = pl.pallas_call(
        _kernel, grid=(g, nb), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, interpret=interpret,
        name="sorted_scan_blocks", **extra,
    )(*inputs)
    h_local = jnp.concatenate([h[..., : d - 1], h_col[..., None]], axis=-1)
    return h_local.reshape(g, nb, block, d), decay.reshape(g, nb, block)

