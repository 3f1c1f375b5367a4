"""Accuracy of each ramjax.ops.gated_delta.chunked.INVERSE_METHOD on the chunk inverse's hard case (nearly equal
unit keys, beta ~ 1, almost no decay; chunk 64), against the float64 recurrence: output and key-gradient relative
RMS error, once at XLA's default matmul precision and once with the chunked form's other products at full fp32
(which isolates the inverse). The methods differ on CUDA only; elsewhere all three are IEEE block doubling.

    python experiments/inverse_method_accuracy.py
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ramjax.numerics import rel_rms
from ramjax.ops import gated_delta_rule
from ramjax.ops.gated_delta import chunked
from ramjax.timing import module_settings


def aligned_key_inputs(seed: int = 0, time: int = 130, heads: int = 2, dim: int = 16):
    """The inputs of tests/test_linear_attention.py's aligned-keys case, as NumPy float64 arrays."""
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(dim,)) + 0.05 * rng.normal(size=(1, time, heads, dim))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    q, v = rng.normal(size=(2, 1, time, heads, dim))
    return q, k, v, np.full((1, time, heads), -1e-3), np.full((1, time, heads), 0.99)


def errors(inputs, chunk_size: int) -> tuple[float, float]:
    """(output, key-gradient) errors of the chunked form in fp32 against the float64 recurrence."""
    def loss(k, args, impl):
        return jnp.sum(gated_delta_rule(args[0], k, *args[2:], impl=impl, chunk_size=chunk_size) * args[2])

    with jax.enable_x64(True):
        args64 = [jnp.asarray(x, jnp.float64) for x in inputs]
        want = np.asarray(gated_delta_rule(*args64, impl="recurrent"))
        want_grad = np.asarray(jax.grad(loss)(args64[1], args64, "recurrent"))
    args = [jnp.asarray(x, jnp.float32) for x in inputs]
    got = jax.jit(functools.partial(gated_delta_rule, impl="chunked", chunk_size=chunk_size))(*args)
    got_grad = jax.jit(jax.grad(loss), static_argnums=2)(args[1], args, "chunked")
    assert bool(jnp.isfinite(got_grad).all()), "non-finite gradient"
    return rel_rms(got, want), rel_rms(got_grad, want_grad)


def main():
    inputs = aligned_key_inputs()
    print(f"backend {jax.default_backend()}, jax {jax.__version__}; default INVERSE_METHOD {chunked.INVERSE_METHOD!r}")
    print("| method | precision of the other products | output error | gradient error |")
    print("|---|---|---|---|")
    for precision in ("default", "highest"):
        for method in chunked.INVERSE_METHODS:
            setting = f"ramjax.ops.gated_delta.chunked.INVERSE_METHOD='{method}'"
            with module_settings([setting]), jax.default_matmul_precision(precision):
                out, grad = errors(inputs, chunk_size=64)
            print(f"| {method} | {precision} | {out:.2e} | {grad:.2e} |")


if __name__ == "__main__":
    main()
