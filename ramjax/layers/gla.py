"""Gated linear attention (GLA, arXiv 2312.06635) token mixer, configured as flash-linear-attention's layer.

q, k of width expand_k * d_model and v of width expand_v * d_model split into heads; a per-key-dimension log
decay log_sigmoid(W2 W1 x) / gate_normaliser from a low-rank projection (the normaliser keeps decays near 1);
S_t = diag(alpha_t) S_{t-1} + k_t v_t^T read by q_t * d_k^-1/2; out = W_o GatedRMSNorm(o, W_g x) per head.

`conv_width > 0`: q, k and v each through a short causal conv + SiLU first (fla's `use_short_conv`, off there and
here by default). MQAR needs some token shift before the recall: Zoology's harness gives GLA one with a BaseConv
layer before it (its `Hybrid(BaseConv, GLA)` alternates the two by layer); this is the layer's own form of it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ramjax import ops
from ramjax.layers.axes import dense, logical_init
from ramjax.layers.conv import ShortConv, convolve_all
from ramjax.layers.norm import GatedRMSNorm, gated_norm_projection


@functools.partial(jax.checkpoint, static_argnums=(1,))
def gate_log_decay(logits: jax.Array, normaliser: float) -> jax.Array:
    """log_sigmoid(logits) / normaliser in fp32. Rematerialised: the backward pass keeps the (16-bit) logits and
    recomputes the rest, instead of two fp32 copies of the [batch, time, d_k] gate per layer."""
    return jax.nn.log_sigmoid(logits.astype(jnp.float32)) / normaliser


class GLAMixer(nnx.Module):
    """x `[batch, time, d_model]`, positions (unused) -> `[batch, time, d_model]`."""

    def __init__(self, d_model: int, *, num_heads: int, expand_k: float = 0.5, expand_v: float = 1.0,
                 gate_rank: int = 16, gate_normaliser: float = 16.0, chunk_size: int = 64, impl: str = "auto",
                 conv_width: int = 0, dtype=jnp.float32, rngs: nnx.Rngs):
        key_width, value_width = int(d_model * expand_k), int(d_model * expand_v)
        if not isinstance(conv_width, int) or isinstance(conv_width, bool) or conv_width < 0:
            raise ValueError(f"model.gla.conv_width: must be an integer >= 0 (0: no conv), got {conv_width!r}")
        if key_width % num_heads or value_width % num_heads:
            raise ValueError(f"model.gla: expand_k * d_model = {key_width} and expand_v * d_model = {value_width} "
                             f"must both be divisible by num_heads = {num_heads}")
        self.num_heads, self.d_k = num_heads, key_width // num_heads
        self.gate_normaliser, self.chunk_size, self.impl = gate_normaliser, chunk_size, impl
        # The layout of the per-head tensors on a device mesh, set by the model (shard_activations): a Pallas kernel
        # then runs per device shard. None: one device, or let XLA place it.
        self.kernel_sharding = None
        self.q_proj = dense(d_model, key_width, "embed", "heads", dtype=dtype, rngs=rngs)
        self.k_proj = dense(d_model, key_width, "embed", "heads", dtype=dtype, rngs=rngs)
        self.v_proj = dense(d_model, value_width, "embed", "heads", dtype=dtype, rngs=rngs)
        self.decay_down = dense(d_model, gate_rank, "embed", None, dtype=dtype, rngs=rngs)
        self.decay_up = nnx.Linear(gate_rank, key_width, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
                                   kernel_init=logical_init(nnx.initializers.lecun_normal(), None, "heads"),
                                   bias_init=logical_init(nnx.initializers.zeros, "heads"))
        self.gate_proj = dense(d_model, value_width, "embed", "heads", dtype=dtype, rngs=rngs)
        self.norm = GatedRMSNorm(value_width // num_heads, axis_name=None)
        self.o_proj = dense(value_width, d_model, "heads", "embed", dtype=dtype, rngs=rngs)
        self.convs = nnx.List([ShortConv(width, conv_width, dtype=dtype, rngs=rngs)
                               for width in (key_width, key_width, value_width)] if conv_width else [])

    def _inputs(self, x: jax.Array, windows=None):
        """q, k, v, log decay, and the convs' windows after x (decoding with convs; else None)."""
        batch, seq_len, _ = x.shape
        split = (batch, seq_len, self.num_heads, -1)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        new_windows = None
        if len(self.convs):
            (q, k, v), new_windows = convolve_all(self.convs, (q, k, v), windows)
        q = q.reshape(split) * (self.d_k**-0.5)
        log_decay = gate_log_decay(self.decay_up(self.decay_down(x)), self.gate_normaliser).reshape(split)
        return q, k.reshape(split), v.reshape(split), log_decay, new_windows

    def _output(self, x: jax.Array, o: jax.Array) -> jax.Array:
        return gated_norm_projection(self.norm, self.gate_proj, self.o_proj, x, o)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        del positions
        q, k, v, log_decay, _ = self._inputs(x)
        with jax.named_scope("op"):  # names the op's share in profiles (experiments/profile_train_step.py)
            o = ops.gated_linear_attention(q, k, v, log_decay, chunk_size=self.chunk_size, impl=self.impl,
                                           sharding=self.kernel_sharding)
        return self._output(x, o)

    def init_cache(self, batch: int, max_len: int) -> dict:
        """The decoding state: S `[batch, heads, d_k, d_v]` in fp32 (independent of max_len), and the convs'
        windows when the layer has convs."""
        del max_len
        d_v = self.v_proj.kernel.shape[-1] // self.num_heads
        cache = {"state": jnp.zeros((batch, self.num_heads, self.d_k, d_v), jnp.float32)}
        if len(self.convs):
            cache["windows"] = [conv.init_window(batch) for conv in self.convs]
        return cache

    def extend(self, x: jax.Array, positions: jax.Array, cache: dict,
               fresh: bool = False) -> tuple[jax.Array, dict]:
        """`__call__` over x continuing from `cache` (the chunked form for a prompt, the step for one token)."""
        del positions, fresh
        q, k, v, log_decay, windows = self._inputs(x, cache.get("windows"))
        o, state = ops.gated_linear_attention(q, k, v, log_decay, chunk_size=self.chunk_size,
                                              initial_state=cache["state"], return_final_state=True)
        new_cache = {"state": state.astype(jnp.float32)}
        if windows is not None:
            new_cache["windows"] = windows
        return self._output(x, o), new_cache
