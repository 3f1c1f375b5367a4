"""Recurrent state size: the numbers a model carries from token to token, summed over layers.

The x-axis of the RAM-Net paper's MQAR figure ("total recurrent state size"). Per layer, per sequence:
  ramnet          heads x M x (d_v + 1)            memory slots and their normalisers
  gla             heads x d_k x d_v                 (d_k = expand_k d_model / heads, d_v = expand_v d_model / heads)
  mamba2          heads x head_dim x d_state        (heads = expand d_model / head_dim)
  gated_deltanet  heads x d_k x d_v                 (d_k = head_dim or d_model / heads, d_v = expand_v d_k)
  loglinear       num_levels x the base's state     one state per Fenwick level
  attention       2 x seq_len x d_model             the key-value cache at the given length
  base_conv       0                                 a convolution only
Short-convolution caches (width x channels) are left out, as the papers do.
"""

from __future__ import annotations

from ramjax.models.mixers import parse_pattern


def mixer_state_size(kind: str, cfg, seq_len: int) -> int:
    d, h = cfg.d_model, cfg.num_heads
    if kind == "ramnet":
        r = cfg.ramnet
        return h * r.factor_size**r.num_factors * (r.d_v + 1)
    if kind == "gla":
        return h * int(d * cfg.gla.expand_k) // h * int(d * cfg.gla.expand_v) // h
    if kind == "mamba2":
        m = cfg.mamba2
        return (m.expand * d // m.head_dim) * m.head_dim * m.d_state
    if kind == "gated_deltanet":
        g = cfg.gated_deltanet
        d_k = g.head_dim or d // h
        return h * d_k * g.expand_v * d_k
    if kind == "loglinear":
        return cfg.loglinear.num_levels * mixer_state_size(cfg.loglinear.base, cfg, seq_len)
    if kind == "attention":
        return 2 * seq_len * (cfg.attention.head_dim or d // h) * h
    if kind == "base_conv":
        return 0
    raise ValueError(f"model.pattern: unknown mixer {kind!r}")


def recurrent_state_size(cfg, seq_len: int) -> int:
    """Summed over the layers of the model config `cfg`, for a sequence of `seq_len` tokens."""
    return sum(mixer_state_size(kind, cfg, seq_len) for kind in parse_pattern(cfg.pattern, cfg.num_layers))
