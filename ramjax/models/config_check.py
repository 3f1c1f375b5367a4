"""Checks of `config.model` before anything is built: each error names the config field, its value and what is
allowed, so that a bad value is one line at start-up rather than a traceback from inside a traced op."""

from __future__ import annotations

import math

from ramjax.errors import ConfigError
from ramjax.layers.attention import IMPLS as ATTENTION_IMPLS
from ramjax.layers.fenwick_decay import INITS as LAMBDA_INITS
from ramjax.layers.mamba2 import A_INITS
from ramjax.models.lm import BLOCKS, NORMS, WEIGHT_INITS
from ramjax.models.mixers import MIXERS
from ramjax.ops import addressing, gated_delta, gla, loglinear
from ramjax.ops.memory import IMPLS as PDMA_IMPLS

DTYPES = ("bfloat16", "float32")
LOGLINEAR_BASES = ("mamba2", "gated_deltanet")
LOGLINEAR_MODES = ("fixed", "linear", "mlp_softplus", "mlp_softmax")


def _int(field: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{field}: must be an integer >= {minimum}, got {value!r}")
    return value


def _number(field: str, value, low: float, high: float = math.inf, *, high_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or value > high or (high_open and value >= high):
        upper = "" if high == math.inf else (f" and < {high}" if high_open else f" and <= {high}")
        raise ConfigError(f"{field}: must be a finite number >= {low}{upper}, got {value!r}")
    return float(value)


def _bool(field: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{field}: must be True or False, got {value!r}")


def _choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{field}: must be one of {tuple(allowed)}, got {value!r}")


def mixers_of(pattern: str) -> list[str]:
    """The mixer kinds `model.pattern` names (comma-separated, repeated over the depth)."""
    kinds = [p.strip() for p in str(pattern).split(",") if p.strip()]
    if not kinds:
        raise ConfigError(f"model.pattern: must name at least one mixer of {MIXERS}, got {pattern!r}")
    for kind in kinds:
        _choice("model.pattern", kind, MIXERS)
    return kinds


def _check_ramnet(r) -> None:
    num_factors = _int("model.ramnet.num_factors", r.num_factors)
    factor_size = r.factor_size
    if isinstance(factor_size, int) and not isinstance(factor_size, bool) and factor_size == 1:
        raise ConfigError("model.ramnet.factor_size: 1 gives a memory of a single slot (M = factor_size ** "
                          "num_factors = 1); use 2 or more")
    factor_size = _int("model.ramnet.factor_size", factor_size, 2)
    num_slots = factor_size**num_factors
    top_k = _int("model.ramnet.top_k", r.top_k)
    if top_k > num_slots:
        raise ConfigError(f"model.ramnet.top_k: must be <= M = factor_size ** num_factors = {num_slots}, got {top_k}")
    _int("model.ramnet.d_v", r.d_v)
    _number("model.ramnet.gamma", r.gamma, 0.0)
    _number("model.ramnet.eps", r.eps, 0.0)
    _number("model.ramnet.grad_eps", r.grad_eps, 0.0, 1.0, high_open=True)
    _int("model.ramnet.short_conv", r.short_conv, 0)
    _choice("model.ramnet.impl", r.impl, PDMA_IMPLS)
    _choice("model.ramnet.decoder_impl", r.get("decoder_impl", "auto"), addressing.IMPLS)


def _check_chunked(name: str, section) -> None:
    chunk_size = _int(f"model.{name}.chunk_size", section.chunk_size)
    impl = section.get("impl", "auto")
    _choice(f"model.{name}.impl", impl, gated_delta.IMPLS if name == "gated_deltanet" else gla.IMPLS)
    if impl == "pallas" and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
        raise ConfigError(f"model.{name}.chunk_size: impl 'pallas' needs a power of 2 >= 16, got {chunk_size}")


def _head_dim(name: str, section, d_model: int, num_heads: int) -> int:
    """model.<name>.head_dim, or (when 0) d_model / num_heads: the layer would round that down, so that heads of
    a d_model num_heads does not divide would silently leave part of d_model out."""
    head_dim = _int(f"model.{name}.head_dim", section.head_dim, 0)
    if head_dim == 0 and d_model % num_heads:
        raise ConfigError(f"model.d_model: {d_model} is not divisible by model.num_heads = {num_heads} (with "
                          f"model.{name}.head_dim = 0 a head is d_model / num_heads wide); set model.{name}.head_dim "
                          "explicitly or pick divisible sizes")
    return head_dim or d_model // num_heads


def _check_attention(model) -> None:
    _choice("model.attention.impl", model.attention.impl, ATTENTION_IMPLS)
    head_dim = _head_dim("attention", model.attention, model.d_model, model.num_heads)
    if head_dim < 2 or head_dim % 2:  # RoPE rotates pairs of dimensions
        raise ConfigError(f"model.attention.head_dim: must be even and >= 2 for RoPE, got {head_dim} (0: d_model "
                          f"{model.d_model} / num_heads {model.num_heads})")


def _check_gla(model) -> None:
    g = model.gla
    _int("model.gla.conv_width", g.get("conv_width", 0), 0)
    _int("model.gla.gate_rank", g.gate_rank)
    for name in ("expand_k", "expand_v"):
        # q, k (expand_k) and v (expand_v) are int(expand * d_model) wide, split evenly into the heads.
        width = int(model.d_model * _number(f"model.gla.{name}", g[name], 0.0))
        if width < model.num_heads or width % model.num_heads:
            raise ConfigError(f"model.gla.{name}: {name} * d_model = {width} must be a positive multiple of "
                              f"model.num_heads = {model.num_heads}, got {name} = {g[name]!r}")


def _check_mamba2(m, d_model: int) -> None:
    """The sizes of the Mamba-2 layer, and its switches (all on, and A uniform, in Mamba-2; off and arange in the
    fork)."""
    expand = _int("model.mamba2.expand", m.expand)
    head_dim = _int("model.mamba2.head_dim", m.head_dim)
    _int("model.mamba2.d_state", m.d_state)
    if (expand * d_model) % head_dim:  # its heads are expand * d_model / head_dim
        raise ConfigError(f"model.mamba2.head_dim: must divide expand * d_model = {expand * d_model}, got {head_dim}")
    _int("model.mamba2.conv_width", m.conv_width, 0)
    for name in ("gate", "output_norm", "d_skip", "dt_scales_v"):
        _bool(f"model.mamba2.{name}", m.get(name, True))
    _choice("model.mamba2.a_init", m.get("a_init", "uniform"), A_INITS)


def check_model(model, max_seq_len: int | None = None) -> None:
    """Every field of `config.model` the model's mixers use; `max_seq_len`: the longest sequence the run
    trains or evaluates on (for the log-linear levels), None to skip that check."""
    kinds = set(mixers_of(model.pattern))
    for field in ("d_model", "num_layers", "num_heads", "vocab_size"):
        _int(f"model.{field}", model[field])
    _int("model.mlp_hidden", model.get("mlp_hidden", 0), 0)  # 0: 8/3 d_model (ramjax/models/lm.py mlp_hidden)
    _choice("model.dtype", model.dtype, DTYPES)
    _choice("model.block", model.get("block", "pre_norm"), BLOCKS)
    _choice("model.norm", model.get("norm", "rms"), NORMS)
    _bool("model.feed_forward", model.get("feed_forward", True))
    _choice("model.weight_init", model.get("weight_init", "default"), WEIGHT_INITS)
    _number("model.init_std", model.get("init_std", 0.02), 0.0)
    if model.get("init_std", 0.02) == 0:
        raise ConfigError("model.init_std: must be > 0, got 0")
    if "ramnet" in kinds:
        _check_ramnet(model.ramnet)
    if "attention" in kinds:
        _check_attention(model)
    for kind in ("gla", "mamba2", "gated_deltanet"):
        if kind in kinds:
            _check_chunked(kind, model[kind])
    if "gla" in kinds:
        _check_gla(model)
    if "base_conv" in kinds:
        _int("model.base_conv.width", model.base_conv.width)
    if "mamba2" in kinds or ("loglinear" in kinds and model.loglinear.base == "mamba2"):
        _check_mamba2(model.mamba2, model.d_model)
    if "gated_deltanet" in kinds or ("loglinear" in kinds and model.loglinear.base == "gated_deltanet"):
        _head_dim("gated_deltanet", model.gated_deltanet, model.d_model, model.num_heads)
        _int("model.gated_deltanet.expand_v", model.gated_deltanet.expand_v)
        _int("model.gated_deltanet.conv_width", model.gated_deltanet.conv_width, 0)
    if "loglinear" in kinds:
        ll = model.loglinear
        _choice("model.loglinear.base", ll.base, LOGLINEAR_BASES)
        _choice("model.loglinear.mode", ll.mode, LOGLINEAR_MODES)
        _int("model.loglinear.decay_hidden", ll.get("decay_hidden", 64))
        _check_chunked(ll.base, model[ll.base])
        _choice("model.loglinear.lambda_init", ll.get("lambda_init", "as_described"), LAMBDA_INITS)
        _bool("model.loglinear.exact_gelu", ll.get("exact_gelu", False))
        _bool("model.loglinear.recompute", ll.get("recompute", True))
        _choice("model.loglinear.impl", ll.get("impl", "auto"),
                loglinear.ATTENTION_IMPLS if ll.base == "mamba2" else loglinear.DELTA_IMPLS)
        levels = _int("model.loglinear.num_levels", ll.num_levels)
        tie = _int("model.loglinear.tie_levels_above", ll.get("tie_levels_above", 0), 0)
        if tie >= levels:
            raise ConfigError(f"model.loglinear.tie_levels_above: must be below num_levels = {levels} (0: off), "
                              f"got {tie}")
        if max_seq_len is not None and levels < loglinear.num_levels(max_seq_len):
            raise ConfigError(f"model.loglinear.num_levels: {levels} levels cover sequences up to "
                              f"{2 ** (levels - 1)} tokens; this run's longest is {max_seq_len}, which needs "
                              f"{loglinear.num_levels(max_seq_len)}")
