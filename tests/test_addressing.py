"""product_topk against brute force (the materialised Kronecker product), and cape_shift."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import rel_rms
from ramjax.ops import cape_shift, product_topk


def brute_force_topk(x, num_factors, top_k, temperature=1.0):
    """Materialises all M = d_p ** U products (left to right, like any Kronecker product) and sorts them."""
    d_p = x.shape[-1] // num_factors
    probs = np.asarray(jax.nn.softmax(jnp.asarray(x).reshape(*x.shape[:-1], num_factors, d_p) / temperature))
    full = probs[..., 0, :]
    for u in range(1, num_factors):
        full = (full[..., :, None] * probs[..., u, None, :]).reshape(*x.shape[:-1], -1)
    flat = full.reshape(-1, full.shape[-1])
    slots = np.arange(flat.shape[-1])
    order = np.stack([np.lexsort((slots, -row))[:top_k] for row in flat])
    idx = order.reshape(*x.shape[:-1], top_k)
    return idx, np.take_along_axis(full, idx, axis=-1)


def brute_force_values(x, num_factors, idx, temperature=1.0):
    """Entries `idx` of the materialised Kronecker product of the factor softmaxes of x (differentiable)."""
    d_p = x.shape[-1] // num_factors
    probs = jax.nn.softmax(x.reshape(*x.shape[:-1], num_factors, d_p) / temperature, axis=-1)
    full = probs[..., 0, :]
    for u in range(1, num_factors):
        full = (full[..., :, None] * probs[..., u, None, :]).reshape(*x.shape[:-1], -1)
    return jnp.take_along_axis(full, jnp.asarray(idx), axis=-1)


@st.composite
def topk_problems(draw):
    num_factors = draw(st.integers(1, 4))
    d_p = draw(st.integers(2, 6))
    num_slots = d_p**num_factors
    hypothesis.assume(num_slots <= 4096)
    top_k = draw(st.one_of(st.just(1), st.just(num_slots), st.integers(1, min(num_slots, 24))))
    batch_shape = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    x = np.random.default_rng(seed).normal(size=(*batch_shape, num_factors * d_p)) * scale
    return x.astype(np.float32), num_factors, top_k


# slow: ~15-19 s on 2 cores (60 examples, M up to 4096); XLA against brute force runs by default in
# test_product_topk_with_temperature below and in tests/test_decoder_kernel.py's property test (ties included).
@pytest.mark.slow
@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(topk_problems())
def test_product_topk_equals_brute_force(problem):
    x, num_factors, top_k = problem
    idx, val = product_topk(x, num_factors=num_factors, top_k=top_k)
    want_idx, want_val = brute_force_topk(x, num_factors, top_k)
    assert idx.dtype == jnp.int32 and idx.shape == x.shape[:-1] + (top_k,)
    np.testing.assert_array_equal(np.asarray(idx), want_idx)
    np.testing.assert_allclose(np.asarray(val), want_val, rtol=1e-6, atol=0)
    assert np.all(np.diff(np.asarray(val), axis=-1) <= 0), "values must be sorted descending"


# (4, 4, 40), (2, 16, 100): K above RANK_BY_COMPARISON_MAX_K, where the beam is put in index order by a sort;
# (1, 1024, 8): a factor wider than the kernel takes, whose softmax is summed by jnp.sum
@pytest.mark.parametrize("num_factors,d_p,top_k", [(1, 7, 3), (2, 2, 4), (3, 4, 8), (5, 4, 8), (2, 16, 16),
                                                   (4, 4, 40), (2, 16, 100), (1, 1024, 8)])
def test_product_topk_with_temperature(num_factors, d_p, top_k):
    x = np.random.default_rng(1).normal(size=(3, 5, num_factors * d_p)).astype(np.float32)
    idx, val = product_topk(x, num_factors=num_factors, top_k=top_k, temperature=0.37)
    want_idx, want_val = brute_force_topk(x, num_factors, top_k, temperature=0.37)
    np.testing.assert_array_equal(np.asarray(idx), want_idx)
    np.testing.assert_allclose(np.asarray(val), want_val, rtol=1e-5)  # fp32 against float64 (d_p 16: ~1e-6)


def test_ties_go_to_the_lower_index():
    # All-zero logits make every slot equally likely: the top-K must be slots 0..K-1 in order (K 40: the sorted
    # beam of large K).
    for top_k in (10, 40):
        idx, val = product_topk(jnp.zeros((2, 3 * 4)), num_factors=3, top_k=top_k)
        np.testing.assert_array_equal(np.asarray(idx), np.tile(np.arange(top_k), (2, 1)))
        np.testing.assert_allclose(np.asarray(val), 1 / 64, rtol=1e-6)
    # Two factors with a tie inside the second: slots (0, 1) and (0, 2) tie, (0, 1) = slot 1 comes first.
    x = jnp.concatenate([jnp.array([[5.0, 0, 0, 0, 0]]), jnp.array([[0.0, 1.0, 1.0, 0, 0]])], axis=-1)
    idx, _ = product_topk(x, num_factors=2, top_k=3)
    np.testing.assert_array_equal(np.asarray(idx[0]), [1, 2, 0])


def test_mixed_radix_first_factor_most_significant():
    # Factor 1 peaks at entry 2, factor 2 at entry 1, d_p = 3: the best slot is 2 * 3 + 1 = 7.
    x = jnp.array([0.0, 0.0, 9.0, 0.0, 9.0, 0.0])
    idx, val = product_topk(x, num_factors=2, top_k=1)
    assert int(idx[0]) == 7


@pytest.mark.parametrize("num_factors,d_p,top_k", [(1, 5, 2), (2, 3, 9), (3, 4, 8), (4, 2, 5)])
def test_product_topk_gradient_matches_brute_force(num_factors, d_p, top_k):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(4, num_factors * d_p)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(4, top_k)), jnp.float32)
    want_idx, _ = brute_force_topk(np.asarray(x), num_factors, top_k)
    grad = jax.grad(lambda x: jnp.sum(product_topk(x, num_factors=num_factors, top_k=top_k)[1] * cotangent))(x)
    want = jax.grad(lambda x: jnp.sum(brute_force_values(x, num_factors, want_idx) * cotangent))(x)
    assert rel_rms(grad, want) < 1e-6


def test_product_topk_under_jit_and_bf16():
    x = np.random.default_rng(3).normal(size=(2, 7, 20)).astype(np.float32)
    idx, val = jax.jit(lambda x: product_topk(x, num_factors=5, top_k=8))(x)
    want_idx, _ = brute_force_topk(x, 5, 8)
    np.testing.assert_array_equal(np.asarray(idx), want_idx)
    _, val16 = product_topk(jnp.asarray(x, jnp.bfloat16), num_factors=5, top_k=8)
    assert val16.dtype == jnp.float32, "bf16 keys still get fp32 address weights"


def test_large_memory_never_materialised():
    # M = 16 ** 5 = 2 ** 20 slots: the beam search touches K * min(K, d_p) candidates per factor only.
    x = np.random.default_rng(4).normal(size=(512, 5 * 16)).astype(np.float32)
    compiled = jax.jit(lambda x: product_topk(x, num_factors=5, top_k=8)).lower(x).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 512 * 2**20 * 4 / 100, f"temp memory {temp} bytes suggests a length-M vector per token"
    idx, val = compiled(x)
    assert int(idx.max()) < 2**20 and np.all(np.asarray(val) > 0)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(x=np.zeros((3, 10)), num_factors=3, top_k=2), "num_factors=3 does not divide"),
        (dict(x=np.zeros((3, 8)), num_factors=2, top_k=17), "top_k: must be <= M"),
        (dict(x=np.zeros((3, 8)), num_factors=2, top_k=0), "top_k: must be a positive integer"),
        (dict(x=np.zeros((3, 8)), num_factors=0, top_k=1), "num_factors: must be a positive integer"),
        (dict(x=np.zeros((3, 8), np.int32), num_factors=2, top_k=1), "x: expected a floating dtype"),
        (dict(x=np.zeros((3, 8)), num_factors=2, top_k=1, temperature=0.0), "temperature: must be > 0"),
        (dict(x=np.zeros((1, 64 * 8)), num_factors=8, top_k=1), "more than int32"),
    ],
)
def test_product_topk_rejects_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        product_topk(**kwargs)


def test_cape_shift_is_cyclic_and_broadcasts():
    num_slots = 64
    idx = jnp.asarray(np.random.default_rng(5).integers(0, num_slots, (2, 9, 3, 4)), jnp.int32)
    positions = jnp.arange(9, dtype=jnp.int32)[None, :, None, None]
    shifted = cape_shift(idx, positions, num_slots)
    want = (np.asarray(idx) - np.arange(9)[None, :, None, None]) % num_slots
    np.testing.assert_array_equal(np.asarray(shifted), want)
    # P_t moves the entry at slot j to slot (j - t) mod M: shifting by M is the identity.
    np.testing.assert_array_equal(np.asarray(cape_shift(idx, num_slots, num_slots)), np.asarray(idx))


def test_cape_shift_long_positions_do_not_overflow():
    idx = jnp.array([[0, 5, 1023]], jnp.int32)
    position = jnp.array([[2**31 - 7]], jnp.int32)
    want = (np.array([[0, 5, 1023]], np.int64) - (2**31 - 7)) % 1024
    np.testing.assert_array_equal(np.asarray(cape_shift(idx, position, 1024)), want)


def test_cape_shift_rejects_bad_arguments():
    with pytest.raises(ValueError, match="positions: shape"):
        cape_shift(jnp.zeros((2, 3), jnp.int32), jnp.zeros((4,), jnp.int32), 8)
    with pytest.raises(ValueError, match="idx: expected an integer dtype"):
        cape_shift(jnp.zeros((2, 3)), jnp.zeros((3,), jnp.int32), 8)
    with pytest.raises(ValueError, match="num_slots"):
        cape_shift(jnp.zeros((2, 3), jnp.int32), jnp.zeros((3,), jnp.int32), 0)


def test_auto_takes_the_kernel_on_gpus_only_where_its_unrolled_search_is_small(monkeypatch):
    from ramjax.ops.addressing import decoder

    monkeypatch.setattr(decoder.jax, "default_backend", lambda: "gpu")
    assert decoder.resolve_impl("auto", jnp.bfloat16, 8, 4) == "pallas"  # the measured case
    assert decoder.resolve_impl("auto", jnp.float32, 8, 4, 5) == "pallas"  # the model's K at M = 1024
    assert decoder.resolve_impl("auto", jnp.float32, 32, 4, 2) == "pallas"  # a top-K schedule's start at M = 16
    assert decoder.resolve_impl("auto", jnp.float32, 32, 4, 5) == "xla"  # U x K = 160: minutes of compile
    assert decoder.resolve_impl("auto", jnp.float32, 8, 4, 10) == "xla"  # U x K = 80
    assert decoder.resolve_impl("auto", jnp.float32, 64, 4) == "xla"  # K above PALLAS_MAX_TOP_K
    assert decoder.resolve_impl("auto", jnp.float32, 8, 1024) == "xla"  # U = 1: 8 x 1024 candidates a stage
    assert decoder.resolve_impl("auto", jnp.float64, 8, 4) == "xla"
    assert decoder.resolve_impl("pallas", jnp.float32, 64, 4) == "pallas"  # asked for explicitly
