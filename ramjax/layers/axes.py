"""Logical axis names on parameters, for sharding.

Parameters are annotated with logical names (embed, heads, mlp, vocab, levels, ...) and stay unsharded when
created; the training loop maps the names to mesh axes through the config's rules. Creating them sharded
eagerly would need a mesh at construction time, which tests and single-device runs do not have.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def logical_init(initializer, *names: str | None):
    """`initializer`, with its parameter annotated by the logical axis `names` (one per dimension)."""
    return nnx.with_partitioning(initializer, names, eager_sharding=False)


def logical_param(value: jax.Array, *names: str | None) -> nnx.Param:
    """A parameter holding `value`, annotated by the logical axis `names` (one per dimension)."""
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def dense(in_features: int, out_features: int, in_axis: str | None, out_axis: str | None, *, dtype, rngs: nnx.Rngs,
          init=None, bias: bool = False) -> nnx.Linear:
    """A Linear whose kernel carries the logical axes (in_axis, out_axis); bias-free unless `bias` (then a zero-
    initialised bias on out_axis)."""
    init = nnx.initializers.lecun_normal() if init is None else init
    return nnx.Linear(in_features, out_features, use_bias=bias, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
                      kernel_init=logical_init(init, in_axis, out_axis),
                      bias_init=logical_init(nnx.initializers.zeros_init(), out_axis))
