"""The log-linear token mixer: a Mamba-2 or Gated DeltaNet base whose state is split into Fenwick levels,
read with per-token level weights lambda from a `FenwickDecay` of the chosen mode (docs/loglinear.md)."""

from __future__ import annotations

import jax
from flax import nnx

from ramjax.layers.fenwick_decay import MODES
from ramjax.layers.gated_deltanet import GatedDeltaNetMixer
from ramjax.layers.mamba2 import Mamba2Mixer

BASES = ("mamba2", "gated_deltanet")


class LogLinearMixer(nnx.Module):
    """x `[batch, time, d_model]`, positions -> `[batch, time, d_model]`.

    `base_options` are the base layer's own arguments (the config's `model.mamba2` or `model.gated_deltanet`)."""

    def __init__(self, d_model: int, *, base: str, mode: str, num_levels: int = 15, decay_hidden: int = 64,
                 lambda_init: str = "as_described", exact_gelu: bool = False, tie_levels_above: int = 0,
                 recompute: bool = True, impl: str = "auto", base_options: dict, rngs: nnx.Rngs):
        if base not in BASES:
            raise ValueError(f"model.loglinear.base: must be one of {BASES}, got {base!r}")
        if mode not in MODES:
            raise ValueError(f"model.loglinear.mode: must be one of {MODES}, got {mode!r}")
        base_type = Mamba2Mixer if base == "mamba2" else GatedDeltaNetMixer
        self.base = base_type(d_model, decay_mode=mode, num_levels=num_levels, decay_hidden=decay_hidden,
                              lambda_init=lambda_init, exact_gelu=exact_gelu,
                              tie_levels_above=tie_levels_above, recompute=recompute,
                              loglinear_impl=impl, **base_options, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        return self.base(x, positions)

    def init_cache(self, batch: int, max_len: int) -> dict:
        return self.base.init_cache(batch, max_len)

    def extend(self, x: jax.Array, positions: jax.Array, cache: dict,
               fresh: bool = False) -> tuple[jax.Array, dict]:
        return self.base.extend(x, positions, cache, fresh)
