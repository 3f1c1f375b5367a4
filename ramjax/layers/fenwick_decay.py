"""FenwickDecay: per-token, per-level weights lambda for log-linear attention (docs/loglinear.md section 4).

From x_t, a projection gives dl_t = W_l x_t, L numbers per head; a mode turns them into lambda_t [heads, L]:
  fixed         lambda = 1 on every level (plain Mamba-2 / Gated DeltaNet).
  linear        lambda = softplus(Lscale[h, l] * dl_t[h, l]), Lscale initialised to 1 (the original paper's code).
  mlp_softplus  lambda = softplus(W2 GELU(W1 dl_t + b1) + b2), W1 Xavier with b1 = 0, W2 = 0 and b2 = 0.54, so
                lambda starts at softplus(0.54) ~= 1; the MLP is shared across heads (the adaptive decay).
  mlp_softmax   the same MLP ending in a softmax over levels (levels compete), W2 = 0, b2 = 0.
Initialisation (`init`): "as_described" is the above (W_l lecun normal; ours, the papers do not say), the papers'
text; "as_run" is what the public adaptive-decay fork actually trains (every Linear re-initialised N(0, 0.02) with
zero biases, also W_l, W1, W2), so lambda starts near softplus(0) = 0.69 (softmax: 1 / L) rather than 1.
`exact_gelu`: GELU in its exact erf form (PyTorch's default, the fork's) instead of the tanh approximation.
`tie_above` (ours; 0 = off, the papers' model): every level above it takes its lambda. Training on sequences of at
most T tokens never fills the levels above ceil(log2 T), so their weights keep their initialisation; tying them
to the highest trained level is what lets a model answer through them on longer sequences
(experiments/results/loglinear_unseen_levels.md; `ramjax eval --tie-unseen-levels` sets it from the run's
training lengths). With mlp_softmax the tie is applied after the softmax.
`dtype`: the projection and the MLP compute in it (the model's dtype, as the layer's other projections); the last
step (softplus or softmax) and lambda are float32.
Parameters carry logical axis names for sharding: embed, heads, levels, decay_mlp.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ramjax.layers.axes import logical_init, logical_param

MODES = ("fixed", "linear", "mlp_softplus", "mlp_softmax")
INITS = ("as_described", "as_run")

# The fork's std for every Linear (GPT-2's); "as_run" uses it for W_l, W1 and W2.
AS_RUN_STD = 0.02

# softplus(0.54) = 0.9992: the adaptive decay starts as plain (lambda = 1) log-linear attention.
MLP_SOFTPLUS_BIAS = 0.54


@functools.partial(jax.checkpoint, static_argnums=(1,))
def gelu(x: jax.Array, approximate: bool) -> jax.Array:
    """GELU, rematerialised: the backward pass keeps its input, not the tanh approximation's five intermediates
    (each as large as the [batch, time, heads, hidden] input, in fp32)."""
    return jax.nn.gelu(x, approximate=approximate)


class FenwickDecay(nnx.Module):
    """x `[batch, time, d_model]` -> level_weights `[batch, time, heads, L]`."""

    def __init__(
        self, d_model: int, num_heads: int, num_levels: int, mode: str, hidden: int = 64, *,
        init: str = "as_described", exact_gelu: bool = False, tie_above: int = 0, dtype=jnp.float32,
        rngs: nnx.Rngs
    ):
        if mode not in MODES:
            raise ValueError(f"mode: must be one of {MODES}, got {mode!r}")
        if init not in INITS:
            raise ValueError(f"model.loglinear.lambda_init: must be one of {INITS}, got {init!r}")
        for name, value in (("d_model", d_model), ("num_heads", num_heads), ("num_levels", num_levels),
                            ("hidden", hidden)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if not isinstance(tie_above, int) or not 0 <= tie_above < num_levels:
            raise ValueError(f"model.loglinear.tie_levels_above: must be an integer in [0, num_levels = {num_levels})"
                             f" (0: off), got {tie_above!r}")
        self.num_heads, self.num_levels, self.mode, self.exact_gelu = num_heads, num_levels, mode, exact_gelu
        self.tie_above = tie_above
        if mode == "fixed":
            return
        as_run = init == "as_run"
        normal = nnx.initializers.normal(AS_RUN_STD)
        self.level_proj = nnx.Linear(
            d_model, num_heads * num_levels, use_bias=False, dtype=dtype, rngs=rngs,
            kernel_init=logical_init(normal if as_run else nnx.initializers.lecun_normal(), "embed", "heads"),
        )
        if mode == "linear":
            # Lscale: excluded from weight decay by the optimiser's mask (it is a scale, like a norm's).
            self.level_scale = logical_param(jnp.ones((num_heads, num_levels)), "heads", "levels")
            return
        self.mlp_in = nnx.Linear(
            num_levels, hidden, dtype=dtype, rngs=rngs,
            kernel_init=logical_init(normal if as_run else nnx.initializers.xavier_uniform(), "levels", "decay_mlp"),
            bias_init=logical_init(nnx.initializers.zeros, "decay_mlp"),
        )
        out_bias = MLP_SOFTPLUS_BIAS if mode == "mlp_softplus" and not as_run else 0.0
        self.mlp_out = nnx.Linear(
            hidden, num_levels, dtype=dtype, rngs=rngs,
            kernel_init=logical_init(normal if as_run else nnx.initializers.zeros, "decay_mlp", "levels"),
            bias_init=logical_init(nnx.initializers.constant(out_bias), "levels"),
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.mode == "fixed":
            return jnp.ones((*x.shape[:2], self.num_heads, self.num_levels), x.dtype)
        weights = _level_weights(self, x)
        return tie_levels(weights, self.tie_above) if self.tie_above else weights


def tie_levels(weights: jax.Array, above: int) -> jax.Array:
    """level weights `[..., L]` with every level above `above` given the weight of level `above`."""
    return jnp.where(jnp.arange(weights.shape[-1]) > above, weights[..., above:above + 1], weights)


@nnx.remat
def _level_weights(decay: FenwickDecay, x: jax.Array) -> jax.Array:
    """lambda `[batch, time, heads, L]` of a FenwickDecay whose mode is not "fixed". Rematerialised as one piece:
    the backward pass keeps x (which the layer's projections keep anyway) and recomputes the level projection and
    the MLP, rather than keeping its fp32 [batch, time, heads, hidden] activations (two of them: 8 KB per token per
    layer in the LM, 16 heads x 64) and the [.., L] pieces."""
    dl = decay.level_proj(x).reshape(*x.shape[:2], decay.num_heads, decay.num_levels)
    if decay.mode == "linear":
        return jax.nn.softplus(decay.level_scale[...] * dl.astype(jnp.float32))
    logits = decay.mlp_out(gelu(decay.mlp_in(dl), not decay.exact_gelu)).astype(jnp.float32)
    if decay.mode == "mlp_softplus":
        return jax.nn.softplus(logits)
    return jax.nn.softmax(logits, axis=-1)
