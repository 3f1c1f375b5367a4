"""Softmax attention with rotary position embeddings: the Transformer++ baseline mixer.

The score computation goes through `jax.nn.dot_product_attention`: cuDNN's fused kernel on a GPU with bf16/fp16
inputs (the anchor table's "cuDNN" row), XLA everywhere else. RoPE uses the given positions, so packed sequences
whose positions restart at each document rotate correctly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ramjax.layers.axes import dense

IMPLS = ("auto", "xla", "cudnn")


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate pairs (x[..., i], x[..., i + d/2]) of x `[batch, time, heads, d]` by positions * theta^(-2i/d)."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [batch, time, 1, half]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def resolve_impl(impl: str, dtype) -> str:
    if impl != "auto":
        return impl
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


class Attention(nnx.Module):
    """Causal multi-head attention. x `[batch, time, d_model]`, positions int `[batch, time]`."""

    def __init__(self, d_model: int, num_heads: int, *, head_dim: int = 0, rope_theta: float = 10000.0,
                 impl: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        if impl not in IMPLS:
            raise ValueError(f"attention.impl: must be one of {IMPLS}, got {impl!r}")
        head_dim = head_dim or d_model // num_heads
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"attention head_dim: must be even and >= 2 for RoPE, got {head_dim} "
                             f"(d_model {d_model} / num_heads {num_heads})")
        self.num_heads, self.head_dim, self.rope_theta, self.impl, self.dtype = (
            num_heads, head_dim, rope_theta, impl, dtype)
        width = num_heads * head_dim
        self.q_proj = dense(d_model, width, "embed", "heads", dtype=dtype, rngs=rngs)
        self.k_proj = dense(d_model, width, "embed", "heads", dtype=dtype, rngs=rngs)
        self.v_proj = dense(d_model, width, "embed", "heads", dtype=dtype, rngs=rngs)
        self.o_proj = dense(width, d_model, "heads", "embed", dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        batch, seq_len, _ = x.shape
        shape = (batch, seq_len, self.num_heads, self.head_dim)
        q = rope(self.q_proj(x).reshape(shape), positions, self.rope_theta)
        k = rope(self.k_proj(x).reshape(shape), positions, self.rope_theta)
        v = self.v_proj(x).reshape(shape)
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=resolve_impl(self.impl, q.dtype))
        return self.o_proj(o.reshape(batch, seq_len, -1))

    def init_cache(self, batch: int, max_len: int) -> dict:
        """The decoding state: keys and values of up to max_len tokens `[batch, max_len, heads, head_dim]` (RoPE
        applied) and how many are filled. Unlike the recurrent mixers' states, it grows with max_len."""
        shape = (batch, max_len, self.num_heads, self.head_dim)
        return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype), "length": jnp.int32(0)}

    def extend(self, x: jax.Array, positions: jax.Array, cache: dict,
               fresh: bool = False) -> tuple[jax.Array, dict]:
        """`__call__` over x `[batch, time, d_model]` following the cached tokens: x's keys and values go into the
        cache after them, and each query attends to every cached token and to x's up to itself. The caller keeps
        length + time <= max_len (then a slice would be clipped, silently, by dynamic_update_slice)."""
        del fresh
        batch, seq_len, _ = x.shape
        shape = (batch, seq_len, self.num_heads, self.head_dim)
        q = rope(self.q_proj(x).reshape(shape), positions, self.rope_theta)
        k = rope(self.k_proj(x).reshape(shape), positions, self.rope_theta)
        v = self.v_proj(x).reshape(shape)
        start = cache["length"]
        keys = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, start, 0, 0))
        values = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, start, 0, 0))
        scores = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), keys.astype(jnp.float32))
        visible = jnp.arange(keys.shape[1])[None, :] <= start + jnp.arange(seq_len)[:, None]  # [t, s]
        scores = jnp.where(visible, scores * self.head_dim**-0.5, -jnp.inf)
        o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), values.astype(jnp.float32))
        o = o.astype(v.dtype).reshape(batch, seq_len, -1)
        return self.o_proj(o), {"k": keys, "v": values, "length": start + seq_len}
