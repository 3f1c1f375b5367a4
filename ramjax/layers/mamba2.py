"""Mamba-2 (SSD) token mixer, and its log-linear form (docs/loglinear.md section 2, "Mamba-2 mapping").

x -> z (gate), x_in, B, C, dt by separate projections; short causal conv + SiLU on x_in, B and C; per head
dt = softplus(dt_raw + dt_bias), A = -exp(A_log); the recurrence runs with q = C, k = B, v = x_in * dt and the
log decay g = A * dt; y = recurrence + D * x_in; out = W_out RMSNorm(y * silu(z)). One B/C group shared by all
heads (ngroups = 1, as in the Mamba-2 language models).

With a `FenwickDecay` (`decay_mode` other than None) the recurrence is log-linear attention weighted per level
by lambda(x): the log-linear Mamba-2. With `decay_mode=None` it is plain Mamba-2 (a chunked linear recurrence).

Switches that strip the layer down to the adaptive-decay fork's synthetic-task layer (docs/loglinear.md section 6):
`conv_width=0` (no short conv and no SiLU on x_in, B, C), `gate=False` (no silu(z)), `output_norm=False` (no
RMSNorm before W_out), `d_skip=False`, `dt_scales_v=False` (v = x_in) and `a_init="arange"` (A_h = -(h + 1):
-1 with one head). With one head, the shared B and C are the fork's per-head k and q.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ramjax import ops
from ramjax.layers.axes import dense, logical_param
from ramjax.layers.conv import ShortConv, convolve_all
from ramjax.layers.fenwick_decay import FenwickDecay
from ramjax.layers.mlp import silu_gate
from ramjax.layers.norm import RMSNorm

A_INITS = ("uniform", "arange")


def dt_bias_init(key, num_heads: int, dt_min: float = 1e-3, dt_max: float = 0.1) -> jax.Array:
    """softplus^-1 of dt drawn log-uniformly in [dt_min, dt_max] (Mamba's initialisation)."""
    dt = jnp.exp(jax.random.uniform(key, (num_heads,), minval=math.log(dt_min), maxval=math.log(dt_max)))
    return dt + jnp.log(-jnp.expm1(-dt))


@nnx.remat
def _gated_output(mixer: "Mamba2Mixer", x: jax.Array, y: jax.Array, x_in: jax.Array) -> jax.Array:
    """out_proj(RMSNorm((y + D x_in) * silu(z))), rematerialised as one piece: the backward pass keeps x, y and
    x_in (x and x_in are kept anyway for the input projections and v) and recomputes z = z_proj(x), the gate and
    the norm, rather than keeping z and the gated and normalised [batch, time, d_inner] tensors of every layer."""
    if mixer.d_skip is not None:
        y = y + mixer.d_skip[...].astype(y.dtype)[:, None] * x_in
    y = y.reshape(*x.shape[:2], -1)
    if mixer.z_proj is not None:
        y = silu_gate(y, mixer.z_proj(x))
    if mixer.norm is not None:
        y = mixer.norm(y)
    return mixer.out_proj(y)


class Mamba2Mixer(nnx.Module):
    """x `[batch, time, d_model]`, positions (unused: the recurrence is position-free) -> `[batch, time, d_model]`."""

    def __init__(self, d_model: int, *, expand: int = 2, head_dim: int = 64, d_state: int = 64, conv_width: int = 4,
                 chunk_size: int = 64, gate: bool = True, output_norm: bool = True, d_skip: bool = True,
                 dt_scales_v: bool = True, a_init: str = "uniform", decay_mode: str | None = None,
                 num_levels: int = 15, decay_hidden: int = 64, lambda_init: str = "as_described",
                 exact_gelu: bool = False, tie_levels_above: int = 0, recompute: bool = True,
                 loglinear_impl: str = "auto", impl: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        d_inner = expand * d_model
        if d_inner % head_dim:
            raise ValueError(f"model.mamba2.head_dim: must divide expand * d_model = {d_inner}, got {head_dim}")
        if not isinstance(conv_width, int) or conv_width < 0:
            raise ValueError(f"model.mamba2.conv_width: must be an integer >= 0 (0: no conv), got {conv_width!r}")
        if a_init not in A_INITS:
            raise ValueError(f"model.mamba2.a_init: must be one of {A_INITS}, got {a_init!r}")
        self.num_heads, self.head_dim, self.d_state, self.chunk_size = d_inner // head_dim, head_dim, d_state, chunk_size
        self.impl = impl  # of the plain recurrence (ops.gated_linear_attention)
        self.recompute, self.loglinear_impl = recompute, loglinear_impl  # of the log-linear op (loglinear_attention)
        # The layout of the per-head tensors on a device mesh, set by the model (shard_activations): a Pallas kernel
        # then runs per device shard. None: one device, or let XLA place it.
        self.kernel_sharding = None
        self.dt_scales_v = dt_scales_v
        self.z_proj = dense(d_model, d_inner, "embed", "heads", dtype=dtype, rngs=rngs) if gate else None
        self.x_proj = dense(d_model, d_inner, "embed", "heads", dtype=dtype, rngs=rngs)
        self.b_proj = dense(d_model, d_state, "embed", None, dtype=dtype, rngs=rngs)
        self.c_proj = dense(d_model, d_state, "embed", None, dtype=dtype, rngs=rngs)
        self.dt_proj = dense(d_model, self.num_heads, "embed", "heads", dtype=dtype, rngs=rngs)
        convs = [ShortConv(width, conv_width, dtype=dtype, rngs=rngs) if conv_width else None
                 for width in (d_inner, d_state, d_state)]
        self.x_conv, self.b_conv, self.c_conv = convs
        self.dt_bias = logical_param(dt_bias_init(rngs.params(), self.num_heads), "heads")
        if a_init == "uniform":
            a = jax.random.uniform(rngs.params(), (self.num_heads,), minval=1.0, maxval=16.0)
        else:
            a = jnp.arange(1, self.num_heads + 1, dtype=jnp.float32)
        self.a_log = logical_param(jnp.log(a), "heads")
        self.d_skip = logical_param(jnp.ones((self.num_heads,)), "heads") if d_skip else None
        self.norm = RMSNorm(d_inner, axis_name="heads") if output_norm else None
        self.out_proj = dense(d_inner, d_model, "heads", "embed", dtype=dtype, rngs=rngs)
        self.decay = (FenwickDecay(d_model, self.num_heads, num_levels, decay_mode, decay_hidden, init=lambda_init,
                                   exact_gelu=exact_gelu, tie_above=tie_levels_above, dtype=dtype, rngs=rngs)
                      if decay_mode is not None else None)

    def _convs(self) -> tuple:
        """The short convs of x_in, B, C; empty with conv_width 0."""
        return () if self.x_conv is None else (self.x_conv, self.b_conv, self.c_conv)

    def _inputs(self, x: jax.Array, windows=None):
        """q, k (one head, `[batch, time, 1, d_state]`: C and B are shared by the heads), v, log decay, x_in of the
        recurrence, and the convs' windows after x (decoding)."""
        batch, seq_len, _ = x.shape
        heads = (batch, seq_len, self.num_heads, self.head_dim)
        projected = (self.x_proj(x), self.b_proj(x), self.c_proj(x))
        if self._convs():
            (x_in, b, c), new_windows = convolve_all(self._convs(), projected, windows)
        else:
            (x_in, b, c), new_windows = projected, windows
        x_in = x_in.reshape(heads)
        dt = jax.nn.softplus(self.dt_proj(x).astype(jnp.float32) + self.dt_bias[...])  # [batch, time, heads]
        log_decay = -jnp.exp(self.a_log[...]) * dt
        k, q = b[:, :, None, :], c[:, :, None, :]
        v = x_in * dt[..., None].astype(x_in.dtype) if self.dt_scales_v else x_in
        return q, k, v, log_decay, x_in, new_windows

    def _output(self, x: jax.Array, y: jax.Array, x_in: jax.Array) -> jax.Array:
        return _gated_output(self, x, y, x_in)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        del positions
        q, k, v, log_decay, x_in, _ = self._inputs(x)
        level_weights = None if self.decay is None else self.decay(x)
        with jax.named_scope("op"):  # names the op's share in profiles (experiments/profile_train_step.py)
            if level_weights is None:
                y = ops.gated_linear_attention(q, k, v, log_decay, chunk_size=self.chunk_size, impl=self.impl,
                                               sharding=self.kernel_sharding)
            else:  # q, k: one head (C, B) for all heads, as the op takes them
                y = ops.loglinear_attention(q, k, v, log_decay, level_weights, chunk_size=self.chunk_size,
                                            impl=self.loglinear_impl, recompute=self.recompute,
                                            sharding=self.kernel_sharding)
        return self._output(x, y, x_in)

    def init_cache(self, batch: int, max_len: int) -> dict:
        """The decoding state: the convs' windows and S `[batch, heads, d_state, head_dim]` (fp32), or with the
        log-linear decay one such state per Fenwick level and the position (`FenwickState`)."""
        del max_len
        if self.decay is None:
            state = jnp.zeros((batch, self.num_heads, self.d_state, self.head_dim), jnp.float32)
        else:
            state = ops.loglinear_init(batch, self.num_heads, self.decay.num_levels, self.d_state, self.head_dim)
        return {"state": state, "windows": [conv.init_window(batch) for conv in self._convs()]}

    def extend(self, x: jax.Array, positions: jax.Array, cache: dict,
               fresh: bool = False) -> tuple[jax.Array, dict]:
        """`__call__` over x continuing from `cache`; returns (y, the cache after x). `fresh`: the cache is
        `init_cache`'s (nothing seen yet). The log-linear chunked form aligns its chunks to the absolute position,
        which must then be known at trace time: from a fresh cache it is 0; otherwise (a traced position) the
        recurrent form runs, per token."""
        del positions
        q, k, v, log_decay, x_in, windows = self._inputs(x, cache["windows"])
        if self.decay is None:
            y, state = ops.gated_linear_attention(q, k, v, log_decay, chunk_size=self.chunk_size,
                                                  initial_state=cache["state"], return_final_state=True)
            state = state.astype(jnp.float32)
        else:
            y, state = ops.loglinear_attention(
                q, k, v, log_decay, self.decay(x), chunk_size=self.chunk_size,
                impl="chunked" if fresh else "recurrent", initial_state=None if fresh else cache["state"],
                return_final_state=True)
        return self._output(x, y, x_in), {"state": state, "windows": windows}
