"""Helpers the tests share: error measures and random inputs."""

import numpy as np
import jax.numpy as jnp


def rel_rms(actual, expected) -> float:
    """Relative RMS error ||actual - expected|| / ||expected|| (0 when both are 0)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    denom = np.sqrt(np.mean(expected**2))
    err = np.sqrt(np.mean((actual - expected) ** 2))
    return float(err / denom) if denom > 0 else float(err)


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
