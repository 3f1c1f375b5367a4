"""Pieces the chunked linear-recurrence kernels share (gla_chunk.py, gated_delta_chunk.py): the launch options,
fp32-accumulating matrix products, the [B, T, H, D] <-> [sequences, padded time, padded width] row layout, and
one pallas_call with optional NaN-poisoned outputs.

A `layout` argument is either kernel's `_Layout`: anything with batch, seq_len, heads, d_k, d_v, t_pad, dk_pad,
dv_pad and sequences (= batch * heads).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.shapes import next_pow2, pad_axis


# Launch options per kernel, by the name each kernel passes to `call` (e.g. "gla_chunk_dqk", "gated_delta_grads"),
# with "*" for every kernel: {"num_warps": int, "num_stages": int}. A kernel not named here launches with the op's
# num_warps and one stage. For timings (experiments/tune_chunk_kernels.py) and for the defaults they choose.
LAUNCH_BY_KERNEL: dict[str, dict[str, int]] = {}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


def launch_options(name: str, num_warps: int) -> dict[str, int]:
    """The Triton launch options of kernel `name`: LAUNCH_BY_KERNEL[name], else LAUNCH_BY_KERNEL["*"], over
    (num_warps, 1 stage)."""
    options = {"num_warps": num_warps, "num_stages": 1}
    chosen = LAUNCH_BY_KERNEL.get(name, LAUNCH_BY_KERNEL.get("*", {}))
    unknown = sorted(set(chosen) - set(LAUNCH_OPTIONS))
    if unknown:
        raise ValueError(f"LAUNCH_BY_KERNEL[{name!r}]: unknown option {unknown[0]!r}; known: {LAUNCH_OPTIONS}")
    options.update(chosen)
    return options


class ChunkConfig(NamedTuple):
    """How the kernels run (static: part of the custom VJP's nondifferentiable arguments)."""
    chunk_size: int
    num_warps: int
    interpret: bool
    poison_output: bool


# Warps per program where the op's caller does not choose: 4 with bf16 operands, 8 with fp32 ones. An fp32 tile
# takes twice a bf16 tile's registers; read statically (experiments/results/kernel_registers.md, ptxas for sm_90a),
# at d 64 and 4 warps the fp32 log-linear kernels at chunk 64 spill 15 KB (outputs) and 40 KB (gradients), Gated
# DeltaNet's gradients at chunk 32 34 KB; at 8 warps at most 1.3 KB. The bf16 kernels spill at most ~1.3 KB at 4.
DEFAULT_WARPS = {"bfloat16": 4, "float32": 8}


def default_num_warps(num_warps: int | None, q, k, v) -> int:
    """`num_warps`, or where it is None the default for the matrix products' operand dtype (DEFAULT_WARPS)."""
    if num_warps is not None:
        return int(num_warps)
    return DEFAULT_WARPS[jnp.dtype(operand_dtype(q, k, v)).name]


def padded_width(d: int) -> int:
    """A width as the kernels see it: a power of 2, at least 16 (the smallest block Triton's dot takes)."""
    return max(16, next_pow2(d))


def operand_dtype(q, k, v):
    """The matrix products' operand dtype: bfloat16 where q, k and v all are, else float32."""
    return jnp.bfloat16 if all(x.dtype == jnp.bfloat16 for x in (q, k, v)) else jnp.float32


def dot(a, b, dtype, *, trans_a=False, trans_b=False, precision=jax.lax.Precision.HIGHEST):
    """a @ b (a^T, b^T where told) with operands cast to `dtype` and fp32 accumulation (IEEE fp32 for fp32:
    Triton's default for fp32 is tf32; `precision` may instead name an fp32 algorithm such as TF32 x 3)."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), dims, precision=precision,
                               preferred_element_type=jnp.float32)


def exp_nonpositive(log_decay):
    """exp of a log decay that is <= 0 in exact arithmetic (the minimum guards against rounding)."""
    return jnp.exp(jnp.minimum(log_decay, 0.0))


def to_rows(x, layout, width, dtype):
    """[B, T, H, D] -> [B * H, T_pad, width] in `dtype`, zero-padded (padding tokens write nothing)."""
    x = jnp.transpose(x, (0, 2, 1, 3)).reshape(layout.sequences, layout.seq_len, x.shape[-1]).astype(dtype)
    return pad_axis(pad_axis(x, 1, layout.t_pad, 0), 2, width, 0)


def from_rows(x, layout, width):
    """[B * H, T_pad, >= width] -> [B, T, H, width]."""
    x = x[:, :layout.seq_len, :width].reshape(layout.batch, layout.heads, layout.seq_len, width)
    return jnp.transpose(x, (0, 2, 1, 3))


def shared_rows(x, layout, width, dtype):
    """[B, T, 1, D] (one head that every head reads) -> [B, T_pad, width] in `dtype`, zero-padded: a program of
    sequence s = b * heads + h reads row b."""
    return pad_axis(pad_axis(x[:, :, 0].astype(dtype), 1, layout.t_pad, 0), 2, width, 0)


def head_summed(grad, layout, width):
    """The gradient of a shared head: per-sequence rows [B * H, T_pad, >= width] summed over the heads in fp32
    -> [B, T, 1, width]."""
    grad = grad.reshape(layout.batch, layout.heads, *grad.shape[1:]).astype(jnp.float32).sum(axis=1)
    return grad[:, :layout.seq_len, None, :width]


def state_rows(state, layout):
    """[B, H, d_k, d_v] -> [B * H, DK, DV] fp32, zero-padded."""
    state = state.reshape(layout.sequences, layout.d_k, layout.d_v).astype(jnp.float32)
    return pad_axis(pad_axis(state, 1, layout.dk_pad, 0.0), 2, layout.dv_pad, 0.0)


def call(kernel, cfg: ChunkConfig, name, grid, inputs, in_specs, out_specs, out_shape):
    """One pallas_call (optionally with NaN-poisoned output buffers: an element the kernel fails to write shows)."""
    extra = {}
    if cfg.poison_output:
        n_in = len(inputs)
        inputs = list(inputs) + [jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shape]
        in_specs = list(in_specs) + list(out_specs)
        extra["input_output_aliases"] = {n_in + i: i for i in range(len(out_shape))}
    if not cfg.interpret:
        from jax.experimental.pallas import triton as plgpu

        # Triton's params also select the Triton lowering (not Mosaic GPU).
        extra["compiler_params"] = plgpu.CompilerParams(**launch_options(name, cfg.num_warps))
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          interpret=cfg.interpret, name=name, **extra)(*inputs)
