"""Helpers the tests share: error measures and random inputs."""

import jax
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


def equations(jaxpr):
    """Every equation of a jaxpr, nested ones (jit, scan, custom_vjp) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (tuple, list)) else [param]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from equations(inner)


def matmul_dtypes(fn, *args):
    """[(operand dtypes, result dtype)] of every matrix product (dot_general) in fn's traced program, as a GPU
    traces it (ops.shared.numerics.matmul widens 16-bit operands on CPUs only)."""
    from ramjax.ops.shared import numerics

    widen, numerics.WIDEN_ON_CPU = numerics.WIDEN_ON_CPU, False
    try:
        jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    finally:
        numerics.WIDEN_ON_CPU = widen
    return [(tuple(str(v.aval.dtype) for v in e.invars), str(e.outvars[0].aval.dtype))
            for e in equations(jaxpr) if e.primitive.name == "dot_general"]
