"""Flax NNX layers built on ramjax.ops."""

from ramjax.layers.fenwick_decay import FenwickDecay

__all__ = ["FenwickDecay"]
