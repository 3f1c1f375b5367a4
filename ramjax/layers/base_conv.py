"""Zoology's BaseConv token mixer (HazyResearch/zoology, zoology/mixers/base_conv.py), as its MQAR configs use it.

y = conv(u) * (W u + b) + u: a short causal depthwise convolution (no activation) gated elementwise by a linear
projection of the same input, plus the input. Zoology's reference MQAR models alternate it with the sequence mixer
(`Hybrid(BaseConv, mixer)` gives layer 0 the conv and layer 1 the mixer of a 2-layer model), so it is the token
shift those models recall through. Here it is the mixer kind "base_conv" of `model.pattern`, e.g.
"base_conv,ramnet" with 2 layers; its only field is `model.base_conv.width` (Zoology's kernel_size, 3).
"""

from __future__ import annotations

import jax
from flax import nnx

from ramjax.layers.axes import dense
from ramjax.layers.conv import ShortConv


class BaseConvMixer(nnx.Module):
    """x `[batch, time, d_model]`, positions (unused) -> `[batch, time, d_model]`."""

    def __init__(self, d_model: int, *, width: int = 3, dtype, rngs: nnx.Rngs):
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"model.base_conv.width: must be an integer >= 1, got {width!r}")
        self.conv = ShortConv(d_model, width, activation=False, dtype=dtype, rngs=rngs)
        # Output channels on "heads", as the conv's: the two are multiplied channel by channel.
        self.projection = dense(d_model, d_model, "embed", "heads", dtype=dtype, rngs=rngs, bias=True)

    def _mix(self, x: jax.Array, convolved: jax.Array) -> jax.Array:
        return (convolved * self.projection(x) + x.astype(convolved.dtype)).astype(x.dtype)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        del positions
        return self._mix(x, self.conv(x))

    def init_cache(self, batch: int, max_len: int) -> dict:
        """The decoding state: the conv's last width - 1 inputs."""
        del max_len
        return {"window": self.conv.init_window(batch)}

    def extend(self, x: jax.Array, positions: jax.Array, cache: dict,
               fresh: bool = False) -> tuple[jax.Array, dict]:
        """`__call__` over x continuing after the inputs in `cache`."""
        del positions, fresh
        convolved, window = self.conv.extend(x, cache["window"])
        return self._mix(x, convolved), {"window": window}
