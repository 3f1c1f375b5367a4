"""A log-decay of -inf (a gate of exactly 0, or exp(A_log) overflowing) empties the state: every implementation
of every decayed op stays finite, in outputs and gradients, and they agree (the chunked forms subtract cumulative
log-decays, where -inf - -inf used to give NaN)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import rel_rms

from ramjax.ops.gated_delta import gated_delta_rule
from ramjax.ops.gla import gated_linear_attention
from ramjax.ops.loglinear import loglinear_attention, loglinear_gated_delta

B, T, H, D, L = 1, 70, 2, 8, 8


def inputs(per_dim=False):
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q, k = (jnp.asarray(unit(rng.normal(size=(B, T, H, D))), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32)
    g = -rng.exponential(1.0, size=(B, T, H, D) if per_dim else (B, T, H)).astype(np.float32)
    g[0, 10, 0] = -np.inf
    g[0, 41, 1] = -np.inf
    beta = jnp.asarray(rng.uniform(size=(B, T, H)), jnp.float32)
    weights = jnp.asarray(rng.uniform(size=(B, T, H, L)), jnp.float32)
    return q, k, v, jnp.asarray(g), beta, weights


CASES = {
    "gla_scalar": (gated_linear_attention, lambda q, k, v, g, b, w: (q, k, v, g), ("dense", "recurrent", "chunked")),
    "gla_per_dim": (gated_linear_attention, lambda q, k, v, g, b, w: (q, k, v, g), ("dense", "recurrent", "chunked")),
    "gated_delta": (gated_delta_rule, lambda q, k, v, g, b, w: (q, k, v, g, b), ("recurrent", "chunked")),
    "loglinear": (loglinear_attention, lambda q, k, v, g, b, w: (q, k, v, g, w), ("dense", "recurrent", "chunked")),
    "loglinear_delta": (loglinear_gated_delta, lambda q, k, v, g, b, w: (q, k, v, g, b, w),
                        ("dense", "recurrent", "chunked")),
}


# Jitted: ~1-3 s a case on 2 cores (op by op, the log-linear ones took 13-16 s).
@pytest.mark.parametrize("name", CASES)
def test_minus_infinity_log_decay_is_finite_and_consistent(name):
    fn, pick, impls = CASES[name]
    args = pick(*inputs(per_dim=name == "gla_per_dim"))
    results = {}
    for impl in impls:
        def loss(*a, impl=impl):
            return jnp.sum(fn(*a, impl=impl, chunk_size=16) ** 2)

        value, grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))(*args)
        assert np.isfinite(float(value)), impl
        for grad in grads:
            assert np.all(np.isfinite(np.asarray(grad))), impl
        results[impl] = (value, grads)
    reference = results["recurrent"]
    for impl, (value, grads) in results.items():
        assert float(value) == pytest.approx(float(reference[0]), rel=1e-5), impl
        for grad, grad_ref in zip(grads, reference[1]):
            assert rel_rms(grad, grad_ref) < 1e-4, impl
