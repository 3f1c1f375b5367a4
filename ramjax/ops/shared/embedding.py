"""Token embedding lookup, with a choice of how its gradient is summed into the table.

The gradient of `table[tokens]` adds each token's output gradient into its row of the table. XLA lowers that to a
scatter-add whose threads collide on the rows of frequent tokens. On text they collide a lot (the byte ' ' is ~15%
of a batch), and the XLA in jaxlib 0.10.2-0.11.x turns a contended float scatter-add on GPUs into a
compare-and-swap retry loop (openxla/xla#46225, jax-ml/jax#38806): measured on one H200 with JAX 0.11.2, the
embedding gradient took ~100 ms of a 122 ms transformer LM step at 1024 x 32 on real bytes, against 0.7 ms on
uniformly random tokens (experiments/results/profile_train_step_gpu.md, 2026-12-02).

grad="one_hot" sums it as a matrix product instead, one_hot(tokens)^T @ d_out, accumulated in fp32: no atomics, the
same time whatever the token distribution, and 2 * tokens * vocab * d_model flops, as much as one of the three
products of the LM head. The one-hot blocks are cut over the vocabulary so that none exceeds `block_bytes`; the
token axis stays whole (it is the one sharded over the batch). "scatter" is the plain lookup (XLA's scatter-add);
"auto" takes one_hot on GPUs and TPUs and scatter on CPUs, where the scatter-add is a plain loop and the matrix
product would cost more than it saves.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

EMBEDDING_GRADS = ("auto", "one_hot", "scatter")
ONE_HOT_BLOCK_BYTES = 64 << 20  # the largest one-hot block [tokens, vocab block] built at once


def resolve_grad(grad: str) -> str:
    if grad not in EMBEDDING_GRADS:
        raise ValueError(f"model.embedding_grad: must be one of {EMBEDDING_GRADS}, got {grad!r}")
    if grad == "auto":
        return "one_hot" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "scatter"
    return grad


def embedding_lookup(table: jax.Array, tokens: jax.Array, *, dtype=None, grad: str = "auto",
                     block_bytes: int = ONE_HOT_BLOCK_BYTES) -> jax.Array:
    """`table[tokens]` in `dtype` (default: the table's): table [vocab, d], tokens int [...] -> [..., d].
    Out-of-range tokens read NaN (jnp.take's "fill") and add nothing to the gradient, with either gradient."""
    dtype = jnp.dtype(dtype or table.dtype)
    if resolve_grad(grad) == "scatter":
        return jnp.take(table.astype(dtype), tokens, axis=0)
    return _one_hot_grad_lookup(table, tokens, dtype, int(block_bytes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _one_hot_grad_lookup(table, tokens, dtype, block_bytes):
    return jnp.take(table.astype(dtype), tokens, axis=0)


def _forward(table, tokens, dtype, block_bytes):
    # The table is a parameter, alive through the step anyway: keeping it costs no memory.
    return _one_hot_grad_lookup(table, tokens, dtype, block_bytes), (table, tokens)


def _backward(dtype, block_bytes, residuals, d_out):
    table, tokens = residuals
    return one_hot_table_grad(tokens, d_out, table.shape[0], block_bytes).astype(table.dtype), None


def one_hot_table_grad(tokens: jax.Array, d_out: jax.Array, vocab: int,
                       block_bytes: int = ONE_HOT_BLOCK_BYTES) -> jax.Array:
    """sum over positions p of d_out[p] into row tokens[p]: [vocab, d] in fp32 (fp64 for fp64 d_out). tokens [...],
    d_out [..., d]."""
    ids = tokens.reshape(-1).astype(jnp.int32)  # (unsigned ids minus a block's start must not wrap)
    d_out = d_out.reshape(ids.shape[0], d_out.shape[-1])
    block = max(1, min(vocab, block_bytes // max(1, ids.shape[0] * d_out.dtype.itemsize)))
    num_blocks = -(-vocab // block)
    accumulate = jnp.promote_types(jnp.float32, d_out.dtype)  # fp32, or fp64 for a float64 reference

    def rows(start):
        one_hot = jax.nn.one_hot(ids - start, block, dtype=d_out.dtype)  # ids outside [start, start + block): 0
        return jnp.einsum("nv,nd->vd", one_hot, d_out, preferred_element_type=accumulate)

    if num_blocks == 1:
        return rows(0)
    blocks = jax.lax.map(rows, jnp.arange(num_blocks, dtype=jnp.int32) * block)  # [blocks, block, d]
    return blocks.reshape(num_blocks * block, -1)[:vocab]


_one_hot_grad_lookup.defvjp(_forward, _backward)
