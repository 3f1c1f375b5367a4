"""The fused address-decoder kernel (kernels.product_topk, interpret mode) against the XLA decoder and brute force:
slots, values and gradients, with NaN-poisoned output buffers."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.product_topk import product_topk as kernel_topk
from numerics import rel_rms
from ramjax.ops import product_topk
from test_addressing import brute_force_topk, brute_force_values


def kernel(x, num_factors, top_k, temperature=1.0, **options):
    return kernel_topk(jnp.asarray(x), num_factors=num_factors, top_k=top_k, temperature=temperature,
                       interpret=True, poison_output=True, **options)


def brute_force_gradient(x, num_factors, top_k, cotangent, temperature=1.0):
    """d/dx of sum(cotangent * top-K values) in float64, the top-K slots taken from the materialised product."""
    want_idx, _ = brute_force_topk(x, num_factors, top_k, temperature)
    with jax.enable_x64(True):
        grad = jax.grad(lambda x: jnp.sum(brute_force_values(x, num_factors, want_idx, temperature) * cotangent))(
            jnp.asarray(x, jnp.float64))
        return np.asarray(grad)


@st.composite
def decoder_problems(draw):
    num_factors = draw(st.integers(1, 4))
    d_p = draw(st.integers(2, 5))
    num_slots = d_p**num_factors
    hypothesis.assume(num_slots <= 256)
    # K = M is drawn only for small memories: interpret mode unrolls K selection rounds per factor.
    top_k = draw(st.one_of(st.just(1), st.just(min(num_slots, 16)), st.integers(1, min(num_slots, 12))))
    rows = draw(st.integers(1, 9))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    x = rng.normal(size=(rows, num_factors * d_p)) * draw(st.sampled_from([0.1, 1.0, 4.0]))
    if draw(st.booleans()):
        # Exact ties: each factor's logits copied from its first digit's in some rows and columns.
        tie = rng.random(x.shape) < 0.3
        x = np.where(tie, np.repeat(x[:, ::d_p], d_p, axis=1), x)
    return x.astype(np.float32), num_factors, top_k


@hypothesis.settings(max_examples=10, deadline=None, derandomize=True)
@hypothesis.given(decoder_problems())
def test_kernel_equals_xla_and_brute_force(problem):
    """Same slots as the XLA decoder and brute force, ties included (equal logits give equal probabilities in
    every implementation); values to fp32 rounding (the kernel and XLA may round exp differently by an ulp)."""
    x, num_factors, top_k = problem
    idx, val = kernel(x, num_factors, top_k)
    xla_idx, xla_val = product_topk(x, num_factors=num_factors, top_k=top_k, impl="xla")
    want_idx, want_val = brute_force_topk(x, num_factors, top_k)
    assert idx.dtype == jnp.int32 and val.dtype == jnp.float32 and idx.shape == x.shape[:-1] + (top_k,)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(xla_idx))
    np.testing.assert_array_equal(np.asarray(idx), want_idx)
    np.testing.assert_allclose(np.asarray(val), np.asarray(xla_val), rtol=1e-6, atol=0)
    np.testing.assert_allclose(np.asarray(val), want_val, rtol=1e-6, atol=0)


# (5, 4, 8) and (2, 6, 10) are slow (~8 s each on 2 cores): the other three cover one and several factors, K = 1
# and K = M, temperatures above and below 1.
@pytest.mark.parametrize("num_factors,d_p,top_k,temperature", [
    pytest.param(5, 4, 8, 1.0, marks=pytest.mark.slow), (1, 7, 7, 0.5), (2, 2, 1, 2.0), (2, 3, 9, 1.0),
    pytest.param(2, 6, 10, 0.37, marks=pytest.mark.slow)])
def test_kernel_gradient_matches_float64_brute_force(num_factors, d_p, top_k, temperature):
    rng = np.random.default_rng(num_factors * 100 + d_p)
    x = rng.normal(size=(2, 5, num_factors * d_p)).astype(np.float32)
    cotangent = rng.normal(size=(2, 5, top_k)).astype(np.float32)

    def loss(x, decode):
        return jnp.sum(decode(x)[1] * cotangent)

    grad = jax.grad(loss)(jnp.asarray(x), lambda x: kernel(x, num_factors, top_k, temperature))
    xla = jax.grad(loss)(jnp.asarray(x), lambda x: product_topk(x, num_factors=num_factors, top_k=top_k,
                                                                 temperature=temperature, impl="xla"))
    want = brute_force_gradient(x, num_factors, top_k, cotangent, temperature)
    assert rel_rms(grad, want) < 1e-5
    assert rel_rms(grad, xla) < 1e-5


# slow: ~14 s on 2 cores; the default run keeps the kernel's property test above (ties, sizes, gradients).
@pytest.mark.slow
def test_kernel_rows_across_several_blocks_and_bf16_keys():
    """More rows than one program's block (the last block ragged), bf16 keys, and ties from all-equal logits."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3, 45, 20)).astype(np.float32)
    x[0, :4] = 0.0  # every slot equally likely: slots 0..K-1 in order
    for dtype in (jnp.float32, jnp.bfloat16):
        keys = jnp.asarray(x, dtype)
        idx, val = kernel(keys, 5, 8, block_rows=16)
        xla_idx, xla_val = product_topk(keys, num_factors=5, top_k=8, impl="xla")
        np.testing.assert_array_equal(np.asarray(idx), np.asarray(xla_idx))
        np.testing.assert_allclose(np.asarray(val), np.asarray(xla_val), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(idx[0, :4]), np.tile(np.arange(8), (4, 1)))
        grad = jax.grad(lambda k: jnp.sum(kernel(k, 5, 8, block_rows=16)[1]))(keys)
        assert grad.dtype == dtype and grad.shape == keys.shape


def test_op_dispatches_to_the_kernel_and_checks_arguments():
    x = np.random.default_rng(8).normal(size=(4, 3, 12)).astype(np.float32)
    idx, val = product_topk(x, num_factors=3, top_k=5, impl="pallas")
    want_idx, want_val = brute_force_topk(x, 3, 5)
    np.testing.assert_array_equal(np.asarray(idx), want_idx)
    np.testing.assert_allclose(np.asarray(val), want_val, rtol=1e-6)
    with pytest.raises(ValueError, match="impl: must be one of"):
        product_topk(x, num_factors=3, top_k=5, impl="triton")
    with jax.enable_x64(True):
        with pytest.raises(ValueError, match="impl='pallas' computes in float32"):
            product_topk(jnp.asarray(x, jnp.float64), num_factors=3, top_k=5, impl="pallas")
