"""Gated DeltaNet token mixer, and its log-linear form (docs/loglinear.md section 3).

q, k, v by projections, each through a short causal conv + SiLU; q and k L2-normalised per head (q also scaled
by d_k^-1/2); beta = sigmoid(W_b x); log alpha = -exp(A_log) * softplus(W_a x + dt_bias); the delta-rule state
S <- alpha (I - beta k k^T) S + beta k v^T is read by q; out = W_o GatedRMSNorm(o, W_g x) per head.

With a `FenwickDecay` (`decay_mode` other than None) the state is split into Fenwick levels read with weights
lambda(x): the log-linear Gated DeltaNet. With `decay_mode=None` it is plain Gated DeltaNet.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ramjax import ops
from ramjax.layers.axes import dense, logical_param
from ramjax.layers.conv import ShortConv
from ramjax.layers.fenwick_decay import FenwickDecay
from ramjax.layers.mamba2 import _dt_bias_init
from ramjax.layers.norm import GatedRMSNorm


def _l2_normalise(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class GatedDeltaNetMixer(nnx.Module):
    """x `[batch, time, d_model]`, positions (unused) -> `[batch, time, d_model]`."""

    def __init__(self, d_model: int, *, num_heads: int, head_dim: int = 0, expand_v: int = 2, conv_width: int = 4,
                 chunk_size: int = 64, decay_mode: str | None = None, num_levels: int = 15, decay_hidden: int = 64,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        head_dim = head_dim or d_model // num_heads
        self.num_heads, self.d_k, self.d_v, self.chunk_size = num_heads, head_dim, expand_v * head_dim, chunk_size
        key_width, value_width = num_heads * self.d_k, num_heads * self.d_v
        self.q_proj = dense(d_model, key_width, "embed", "heads", dtype=dtype, rngs=rngs)
        self.k_proj = dense(d_model, key_width, "embed", "heads", dtype=dtype, rngs=rngs)
        self.v_proj = dense(d_model, value_width, "embed", "heads", dtype=dtype, rngs=rngs)
        self.q_conv = ShortConv(key_width, conv_width, dtype=dtype, rngs=rngs)
        self.k_conv = ShortConv(key_width, conv_width, dtype=dtype, rngs=rngs)
        self.v_conv = ShortConv(value_width, conv_width, dtype=dtype, rngs=rngs)
        self.beta_proj = dense(d_model, num_heads, "embed", "heads", dtype=dtype, rngs=rngs)
        self.a_proj = dense(d_model, num_heads, "embed", "heads", dtype=dtype, rngs=rngs)
        self.dt_bias = logical_param(_dt_bias_init(rngs.params(), num_heads), "heads")
        a_init = jax.random.uniform(rngs.params(), (num_heads,), minval=1.0, maxval=16.0)
        self.a_log = logical_param(jnp.log(a_init), "heads")
        self.gate_proj = dense(d_model, value_width, "embed", "heads", dtype=dtype, rngs=rngs)
        self.norm = GatedRMSNorm(self.d_v, axis_name=None)
        self.o_proj = dense(value_width, d_model, "heads", "embed", dtype=dtype, rngs=rngs)
        self.decay = (FenwickDecay(d_model, num_heads, num_levels, decay_mode, decay_hidden, rngs=rngs)
                      if decay_mode is not None else None)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        del positions
        batch, seq_len, _ = x.shape
        split = (batch, seq_len, self.num_heads, -1)
        q = _l2_normalise(self.q_conv(self.q_proj(x)).reshape(split)) * (self.d_k**-0.5)
        k = _l2_normalise(self.k_conv(self.k_proj(x)).reshape(split))
        v = self.v_conv(self.v_proj(x)).reshape(split)
        beta = jax.nn.sigmoid(self.beta_proj(x).astype(jnp.float32))
        log_decay = -jnp.exp(self.a_log[...]) * jax.nn.softplus(self.a_proj(x).astype(jnp.float32) + self.dt_bias[...])
        level_weights = None if self.decay is None else self.decay(x)
        with jax.named_scope("op"):  # names the op's share in profiles (experiments/profile_train_step.py)
            if level_weights is None:
                o = ops.gated_delta_rule(q, k, v, log_decay, beta, chunk_size=self.chunk_size)
            else:
                o = ops.loglinear_gated_delta(q, k, v, log_decay, beta, level_weights, chunk_size=self.chunk_size)
        o = self.norm(o, self.gate_proj(x).reshape(o.shape))
        return self.o_proj(o.reshape(batch, seq_len, -1))
