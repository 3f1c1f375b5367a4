"""Helpers the tests share: error measures and random inputs."""

import jax.numpy as jnp
import numpy as np

from ramjax.numerics import rel_rms  # noqa: F401  (the tests import it from here)


def random_codes(rng, shape, num_slots, *, distinct=True):
    """Sparse codes [..., K]: indices (distinct per token unless told otherwise) and weights summing to <= 1."""
    *lead, top_k = shape
    if distinct:
        keys = rng.random((*lead, num_slots))
        idx = np.argsort(keys, axis=-1)[..., :top_k]
    else:
        idx = rng.integers(0, num_slots, size=shape)
    val = rng.dirichlet(np.ones(top_k + 1), size=tuple(lead))[..., :top_k]
    return jnp.asarray(idx, jnp.int32), jnp.asarray(val, jnp.float32)
