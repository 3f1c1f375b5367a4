"""Build the token mixer a layer's config names: one place that maps config fields to layer arguments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ramjax.layers.attention import Attention
from ramjax.layers.base_conv import BaseConvMixer
from ramjax.layers.gated_deltanet import GatedDeltaNetMixer
from ramjax.layers.gla import GLAMixer
from ramjax.layers.loglinear import LogLinearMixer
from ramjax.layers.mamba2 import Mamba2Mixer
from ramjax.layers.ramnet import RAMNetMixer

MIXERS = ("ramnet", "loglinear", "mamba2", "gated_deltanet", "gla", "attention", "base_conv")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(model_config):
    if model_config.dtype not in DTYPES:
        raise ValueError(f"model.dtype: must be one of {tuple(DTYPES)}, got {model_config.dtype!r}")
    return DTYPES[model_config.dtype]


def parse_pattern(pattern: str, num_layers: int) -> list[str]:
    """The mixer of every layer: `pattern` ("ramnet" or "ramnet,ramnet,ramnet,attention") repeated."""
    kinds = [kind.strip() for kind in str(pattern).split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in MIXERS]
    if not kinds or unknown:
        raise ValueError(f"model.pattern: a comma-separated list of mixers from {MIXERS}, got {pattern!r}")
    if num_layers % len(kinds):
        raise ValueError(f"model.num_layers: must be a multiple of the pattern's length {len(kinds)} "
                         f"({pattern!r}), got {num_layers}")
    return [kinds[layer % len(kinds)] for layer in range(num_layers)]


def make_mixer(kind: str, cfg, cape_heads: int | jax.Array, *, rngs: nnx.Rngs) -> nnx.Module:
    """The mixer `kind` for the model config `cfg`; `cape_heads` (RAM-Net only) may be a traced layer value."""
    dtype = compute_dtype(cfg)
    if kind == "ramnet":
        r = cfg.ramnet
        return RAMNetMixer(cfg.d_model, num_heads=cfg.num_heads, num_factors=r.num_factors,
                           factor_size=r.factor_size, top_k=r.top_k, d_v=r.d_v, gamma=r.gamma, eps=r.eps,
                           grad_eps=r.grad_eps, cape_heads=cape_heads, alpha_init=r.alpha_init,
                           output_norm=r.output_norm, output_gate=r.output_gate, short_conv=r.short_conv,
                           qk_bias=r.get("qk_bias", False), cape_offset_bias=r.get("cape_offset_bias", 0.0),
                           impl=r.impl,
                           decoder_impl=r.get("decoder_impl", "auto"),
                           dtype=dtype, rngs=rngs)
    if kind == "attention":
        a = cfg.attention
        return Attention(cfg.d_model, cfg.num_heads, head_dim=a.head_dim, rope_theta=a.rope_theta, impl=a.impl,
                         dtype=dtype, rngs=rngs)
    if kind == "gla":
        return GLAMixer(cfg.d_model, num_heads=cfg.num_heads, dtype=dtype, rngs=rngs, **cfg.gla.to_dict())
    if kind == "mamba2":
        return Mamba2Mixer(cfg.d_model, dtype=dtype, rngs=rngs, **cfg.mamba2.to_dict())
    if kind == "gated_deltanet":
        return GatedDeltaNetMixer(cfg.d_model, num_heads=cfg.num_heads, dtype=dtype, rngs=rngs,
                                  **cfg.gated_deltanet.to_dict())
    if kind == "base_conv":
        return BaseConvMixer(cfg.d_model, width=cfg.base_conv.width, dtype=dtype, rngs=rngs)
    if kind == "loglinear":
        ll = cfg.loglinear
        options = dict(cfg[ll.base].to_dict(), dtype=dtype) if ll.base in ("mamba2", "gated_deltanet") else {}
        if ll.base == "gated_deltanet":
            options["num_heads"] = cfg.num_heads
        return LogLinearMixer(cfg.d_model, base=ll.base, mode=ll.mode, num_levels=ll.num_levels,
                              decay_hidden=ll.decay_hidden, lambda_init=ll.get("lambda_init", "as_described"),
                              exact_gelu=ll.get("exact_gelu", False),
                              tie_levels_above=ll.get("tie_levels_above", 0), recompute=ll.get("recompute", True),
                              impl=ll.get("impl", "auto"), base_options=options, rngs=rngs)
    raise ValueError(f"model.pattern: unknown mixer {kind!r}; known: {MIXERS}")
