"""Gated DeltaNet token mixer, and its log-linear form (docs/loglinear.md section 3).

q, k, v by projections, each through a short causal conv + SiLU; q and k L2-normalised per head (q also scaled
by d_k^-1/2); beta = sigmoid(W_b x); log alpha = -exp(A_log) * softplus(W_a x + dt_bias); the delta-rule state
S <- alpha (I - beta k k^T) S + beta k v^T is read by q; out = W_o GatedRMSNorm(o, W_g x) per head.

With a `FenwickDecay` (`decay_mode` other than None) the state is split into Fenwick levels read with weights
lambda(x): the log-linear Gated DeltaNet. With `decay_mode=None` it is plain Gated DeltaNet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ramjax import ops
from ramjax.layers.axes import dense, logical_param
from ramjax.layers.conv import ShortConv, convolve_all
from ramjax.layers.fenwick_decay import FenwickDecay
from ramjax.layers.mamba2 import dt_bias_init
from ramjax.layers.norm import GatedRMSNorm, gated_norm_projection


@jax.checkpoint
def _l2_normalise(x: jax.Array) -> jax.Array:
    """x / |x| over the last axis in fp32, returned in x's dtype; rematerialised (the backward pass keeps x, not
    fp32 copies)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + 1e-6)).astype(x.dtype)


def _normalised(convolved: jax.Array, split: tuple, scale: float) -> jax.Array:
    """q or k from its conv's output: L2-normalised per head, times `scale`."""
    return _l2_normalise(convolved.reshape(split)) * scale


@functools.partial(nnx.remat, static_argnums=(2, 3))
def _conv_normalised(conv: ShortConv, projected: jax.Array, split: tuple, scale: float) -> jax.Array:
    """`_normalised` of the short conv (with SiLU) of the projection, rematerialised as one piece: the backward
    pass keeps the projection only, not also the conv's output (the norm's input), one [batch, time, heads, d_k]
    tensor less per layer for each of q and k."""
    return _normalised(conv(projected), split, scale)


class GatedDeltaNetMixer(nnx.Module):
    """x `[batch, time, d_model]`, positions (unused) -> `[batch, time, d_model]`."""

    def __init__(self, d_model: int, *, num_heads: int, head_dim: int = 0, expand_v: int = 2, conv_width: int = 4,
                 chunk_size: int = 64, decay_mode: str | None = None, num_levels: int = 15, decay_hidden: int = 64,
                 lambda_init: str = "as_described", exact_gelu: bool = False, tie_levels_above: int = 0,
                 recompute: bool = True, loglinear_impl: str = "auto", impl: str = "auto", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        head_dim = head_dim or d_model // num_heads
        self.num_heads, self.d_k, self.d_v, self.chunk_size = num_heads, head_dim, expand_v * head_dim, chunk_size
        self.impl = impl  # of the plain delta rule (ops.gated_delta_rule)
        self.recompute, self.loglinear_impl = recompute, loglinear_impl  # of the log-linear op (loglinear_gated_delta)
        # The layout of the per-head tensors on a device mesh, set by the model (shard_activations): a Pallas kernel
        # then runs per device shard. None: one device, or let XLA place it.
        self.kernel_sharding = None
        key_width, value_width = num_heads * self.d_k, num_heads * self.d_v
        self.q_proj = dense(d_model, key_width, "embed", "heads", dtype=dtype, rngs=rngs)
        self.k_proj = dense(d_model, key_width, "embed", "heads", dtype=dtype, rngs=rngs)
        self.v_proj = dense(d_model, value_width, "embed", "heads", dtype=dtype, rngs=rngs)
        self.q_conv = ShortConv(key_width, conv_width, dtype=dtype, rngs=rngs)
        self.k_conv = ShortConv(key_width, conv_width, dtype=dtype, rngs=rngs)
        self.v_conv = ShortConv(value_width, conv_width, dtype=dtype, rngs=rngs)
        self.beta_proj = dense(d_model, num_heads, "embed", "heads", dtype=dtype, rngs=rngs)
        self.a_proj = dense(d_model, num_heads, "embed", "heads", dtype=dtype, rngs=rngs)
        self.dt_bias = logical_param(dt_bias_init(rngs.params(), num_heads), "heads")
        a_init = jax.random.uniform(rngs.params(), (num_heads,), minval=1.0, maxval=16.0)
        self.a_log = logical_param(jnp.log(a_init), "heads")
        self.gate_proj = dense(d_model, value_width, "embed", "heads", dtype=dtype, rngs=rngs)
        self.norm = GatedRMSNorm(self.d_v, axis_name=None)
        self.o_proj = dense(value_width, d_model, "heads", "embed", dtype=dtype, rngs=rngs)
        self.decay = (FenwickDecay(d_model, num_heads, num_levels, decay_mode, decay_hidden, init=lambda_init,
                                   exact_gelu=exact_gelu, tie_above=tie_levels_above, dtype=dtype, rngs=rngs)
                      if decay_mode is not None else None)

    def _inputs(self, x: jax.Array, windows=None):
        """q, k, v, beta, log decay, and the convs' windows after x (decoding)."""
        batch, seq_len, _ = x.shape
        split = (batch, seq_len, self.num_heads, -1)
        q_scale = self.d_k**-0.5
        if windows is None:  # training: q and k through their conv and norm as one rematerialised piece each
            q = _conv_normalised(self.q_conv, self.q_proj(x), split, q_scale)
            k = _conv_normalised(self.k_conv, self.k_proj(x), split, 1.0)
            v, new_windows = self.v_conv(self.v_proj(x)), None
        else:
            (q, k, v), new_windows = convolve_all((self.q_conv, self.k_conv, self.v_conv),
                                                  (self.q_proj(x), self.k_proj(x), self.v_proj(x)), windows)
            q, k = _normalised(q, split, q_scale), _normalised(k, split, 1.0)
        v = v.reshape(split)
        beta = jax.nn.sigmoid(self.beta_proj(x).astype(jnp.float32))
        log_decay = -jnp.exp(self.a_log[...]) * jax.nn.softplus(self.a_proj(x).astype(jnp.float32) + self.dt_bias[...])
        return q, k, v, beta, log_decay, new_windows

    def _output(self, x: jax.Array, o: jax.Array) -> jax.Array:
        return gated_norm_projection(self.norm, self.gate_proj, self.o_proj, x, o)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        del positions
        q, k, v, beta, log_decay, _ = self._inputs(x)
        level_weights = None if self.decay is None else self.decay(x)
        with jax.named_scope("op"):  # names the op's share in profiles (experiments/profile_train_step.py)
            if level_weights is None:
                o = ops.gated_delta_rule(q, k, v, log_decay, beta, chunk_size=self.chunk_size, impl=self.impl,
                                         sharding=self.kernel_sharding)
            else:
                o = ops.loglinear_gated_delta(q, k, v, log_decay, beta, level_weights, chunk_size=self.chunk_size,
                                              impl=self.loglinear_impl, recompute=self.recompute,
                                              sharding=self.kernel_sharding)
        return self._output(x, o)

    def init_cache(self, batch: int, max_len: int) -> dict:
        """The decoding state: the convs' windows and S `[batch, heads, d_k, d_v]` (fp32), or one per Fenwick
        level and the position with the log-linear decay (`FenwickState`)."""
        del max_len
        if self.decay is None:
            state = jnp.zeros((batch, self.num_heads, self.d_k, self.d_v), jnp.float32)
        else:
            state = ops.loglinear_init(batch, self.num_heads, self.decay.num_levels, self.d_k, self.d_v)
        return {"state": state, "windows": [conv.init_window(batch) for conv in (self.q_conv, self.k_conv,
                                                                                  self.v_conv)]}

    def extend(self, x: jax.Array, positions: jax.Array, cache: dict,
               fresh: bool = False) -> tuple[jax.Array, dict]:
        """`__call__` over x continuing from `cache`; returns (y, the cache after x). `fresh`: the cache is
        `init_cache`'s (nothing seen yet). The log-linear chunked form aligns its chunks to the absolute position,
        which must then be known at trace time: from a fresh cache it is 0; otherwise (a traced position) the
        recurrent form runs, per token."""
        del positions
        q, k, v, beta, log_decay, windows = self._inputs(x, cache["windows"])
        if self.decay is None:
            o, state = ops.gated_delta_rule(q, k, v, log_decay, beta, chunk_size=self.chunk_size,
                                            initial_state=cache["state"], return_final_state=True)
            state = state.astype(jnp.float32)
        else:
            o, state = ops.loglinear_gated_delta(
                q, k, v, log_decay, beta, self.decay(x), chunk_size=self.chunk_size,
                impl="chunked" if fresh else "recurrent", initial_state=None if fresh else cache["state"],
                return_final_state=True)
        return self._output(x, o), {"state": state, "windows": windows}
