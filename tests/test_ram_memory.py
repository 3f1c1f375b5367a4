"""PDMA: the dense reference against float64 NumPy, the scan path and the step form against the reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import random_codes, rel_rms
from ramjax.ops import cape_shift, pdma, pdma_init, pdma_step, product_topk
from ramjax.ops.memory import decay_factor


def numpy_pdma(read_idx, read_val, write_idx, write_val, v, num_slots, gamma, eps):
    """The spec's recurrence, slot by slot, in float64 loops."""
    read_idx, write_idx = np.asarray(read_idx), np.asarray(write_idx)
    read_val, write_val, v = (np.asarray(a, np.float64) for a in (read_val, write_val, v))
    batch, seq_len, heads, d_v = v.shape
    out = np.zeros_like(v)
    for b in range(batch):
        for h in range(heads):
            memory = np.zeros((num_slots, d_v))
            normaliser = np.full(num_slots, 1.0 / num_slots)
            for t in range(seq_len):
                w = np.zeros(num_slots)
                np.add.at(w, write_idx[b, t, h], write_val[b, t, h])
                for m in np.nonzero(w)[0]:
                    a = max(1.0 - w[m], 0.0) ** gamma
                    memory[m] = a * memory[m] + w[m] * v[b, t, h]
                    normaliser[m] = a * normaliser[m] + w[m]
                for j, m in enumerate(read_idx[b, t, h]):
                    out[b, t, h] += read_val[b, t, h, j] * memory[m] / (normaliser[m] + eps)
    return out


def ramnet_codes(seed, batch, seq_len, heads, num_factors, d_p, top_k, cape):
    """Read and write codes as the layer makes them: product_topk of random queries and keys, then CAPE."""
    rng = np.random.default_rng(seed)
    num_slots = d_p**num_factors
    q = rng.normal(size=(batch, seq_len, heads, num_factors * d_p)).astype(np.float32) * 2
    k = rng.normal(size=(batch, seq_len, heads, num_factors * d_p)).astype(np.float32) * 2
    read_idx, read_val = product_topk(q, num_factors=num_factors, top_k=top_k)
    write_idx, write_val = product_topk(k, num_factors=num_factors, top_k=top_k)
    if cape:
        positions = jnp.arange(seq_len, dtype=jnp.int32)[None, :, None, None]
        read_idx = cape_shift(read_idx, positions, num_slots)
        write_idx = cape_shift(write_idx, positions, num_slots)
    return read_idx, read_val, write_idx, write_val


@functools.partial(jax.jit, static_argnames=("num_slots", "gamma", "impl"))
def output_and_grads(read_idx, read_val, write_idx, write_val, v, cotangent, *, num_slots, gamma, impl):
    """o and the gradients of <o, cotangent> w.r.t. read_val, write_val and v."""

    def run(read_val, write_val, v):
        return pdma(read_idx, read_val, write_idx, write_val, v, num_slots=num_slots, gamma=gamma, impl=impl)

    o, pullback = jax.vjp(run, read_val, write_val, v)
    return o, pullback(cotangent)


def test_dense_reference_equals_float64_loop():
    rng = np.random.default_rng(0)
    num_slots, shape = 16, (2, 11, 2, 3)
    read_idx, read_val = random_codes(rng, shape, num_slots)
    # Repeated write indices within a token, and the same slots again in the next tokens.
    write_idx, write_val = random_codes(rng, shape, num_slots, distinct=False)
    write_idx = write_idx.at[:, :, :, 1].set(write_idx[:, :, :, 0])
    v = jnp.asarray(rng.normal(size=(2, 11, 2, 5)), jnp.float32)
    for gamma in (0.0, 0.5, 1.0, 2.0):
        got = pdma(read_idx, read_val, write_idx, write_val, v, num_slots=num_slots, gamma=gamma, impl="dense")
        want = numpy_pdma(read_idx, read_val, write_idx, write_val, v, num_slots, gamma, 1e-6)
        assert rel_rms(got, want) < 1e-5, gamma


# Every gamma at T = 1; gamma 0 and 2 at T = 63 and 257 by default, 0.5 and 1 there (~10 s on 2 cores) slow.
@pytest.mark.parametrize("seq_len,gamma,cape", [
    pytest.param(t, g, c, id=f"{t}-{g}-{c}", marks=pytest.mark.slow if t > 1 and g in (0.5, 1.0) else ())
    for t in (1, 63, 257) for g in (0.0, 0.5, 1.0, 2.0) for c in (False, True)])
def test_scan_equals_dense(seq_len, gamma, cape):
    batch, heads, d_v, num_factors, d_p, top_k = 2, 3, 20, 3, 4, 5
    codes = ramnet_codes(seq_len, batch, seq_len, heads, num_factors, d_p, top_k, cape)
    rng = np.random.default_rng(seq_len + 1)
    v = jnp.asarray(rng.normal(size=(batch, seq_len, heads, d_v)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=v.shape), jnp.float32)
    num_slots = d_p**num_factors
    o_dense, grads_dense = output_and_grads(*codes, v, cotangent, num_slots=num_slots, gamma=gamma, impl="dense")
    o_scan, grads_scan = output_and_grads(*codes, v, cotangent, num_slots=num_slots, gamma=gamma, impl="scan")
    assert rel_rms(o_scan, o_dense) < 1e-5
    for name, got, want in zip(("read_val", "write_val", "v"), grads_scan, grads_dense):
        assert rel_rms(got, want) < 1e-5, name


def test_repeated_writes_within_and_across_steps():
    """Duplicate indices in one token act as one write of their summed weight, in every implementation."""
    rng = np.random.default_rng(7)
    num_slots, shape = 8, (1, 40, 2, 4)
    read_idx, read_val = random_codes(rng, shape, num_slots, distinct=False)
    write_idx = jnp.asarray(rng.integers(0, 3, size=shape), jnp.int32)  # few slots: many repeats
    write_val = jnp.asarray(rng.dirichlet(np.ones(5), size=shape[:3])[..., :4], jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, 40, 2, 6)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=v.shape), jnp.float32)
    codes = (read_idx, read_val, write_idx, write_val)
    want = numpy_pdma(*codes, v, num_slots, 1.5, 1e-6)
    o_dense, grads_dense = output_and_grads(*codes, v, cotangent, num_slots=num_slots, gamma=1.5, impl="dense")
    o_scan, grads_scan = output_and_grads(*codes, v, cotangent, num_slots=num_slots, gamma=1.5, impl="scan")
    assert rel_rms(o_dense, want) < 1e-5
    assert rel_rms(o_scan, want) < 1e-5
    for got, ref in zip(grads_scan, grads_dense):
        assert rel_rms(got, ref) < 1e-5


def _run_steps(codes, v, num_slots, gamma):
    read_idx, read_val, write_idx, write_val = codes
    state = pdma_init(v.shape[0], v.shape[2], num_slots, v.shape[3])

    def step(state, inputs):
        o, state = pdma_step(state, *inputs, gamma=gamma)
        return state, o

    inputs = [jnp.moveaxis(a, 1, 0) for a in (read_idx, read_val, write_idx, write_val, v)]
    _, o = jax.lax.scan(step, state, inputs)
    return jnp.moveaxis(o, 0, 1)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_step_over_sequence_equals_pdma(gamma):
    batch, seq_len, heads, d_v = 2, 50, 3, 7
    codes = ramnet_codes(11, batch, seq_len, heads, 2, 4, 3, cape=True)
    v = jnp.asarray(np.random.default_rng(12).normal(size=(batch, seq_len, heads, d_v)), jnp.float32)
    o_steps = jax.jit(_run_steps, static_argnums=(2, 3))(codes, v, 16, gamma)
    o_dense = pdma(*codes, v, num_slots=16, gamma=gamma, impl="dense")
    assert rel_rms(o_steps, o_dense) < 1e-5


def test_step_with_repeated_writes_equals_pdma():
    rng = np.random.default_rng(13)
    shape = (1, 30, 2, 3)
    read_idx, read_val = random_codes(rng, shape, 4, distinct=False)
    write_idx, write_val = random_codes(rng, shape, 4, distinct=False)
    v = jnp.asarray(rng.normal(size=(1, 30, 2, 5)), jnp.float32)
    codes = (read_idx, read_val, write_idx, write_val)
    o_steps = _run_steps(codes, v, 4, 1.0)
    assert rel_rms(o_steps, numpy_pdma(*codes, v, 4, 1.0, 1e-6)) < 1e-5


def test_decay_factor_is_exact_forward_with_smoothed_backward():
    w = jnp.array([0.0, 0.3, 0.9, 1.0], jnp.float32)
    grad_eps = 1e-3
    for gamma in (0.5, 1.0, 2.0, 3.5):
        np.testing.assert_allclose(decay_factor(w, gamma, grad_eps), (1 - np.asarray(w)) ** gamma, rtol=1e-6)
        grad = jax.vmap(jax.grad(lambda w: decay_factor(w, gamma, grad_eps)))(w)
        proxy = -gamma * (1 - grad_eps) * (grad_eps + (1 - grad_eps) * (1 - np.asarray(w))) ** (gamma - 1)
        np.testing.assert_allclose(grad, proxy, rtol=1e-5)
        assert np.all(np.isfinite(grad)), "the proxy keeps the gradient finite at w = 1"
    assert float(decay_factor(jnp.float32(1.0), 0.0, grad_eps)) == 1.0  # gamma = 0: no decay at all
    assert float(jax.grad(lambda w: decay_factor(w, 0.0, grad_eps))(0.5)) == 0.0


def test_reads_see_the_same_steps_write():
    # One slot, one token: w = 1 replaces the slot with v, z = 1, so o = r * v / (1 + eps).
    idx = jnp.zeros((1, 1, 1, 1), jnp.int32)
    one = jnp.ones((1, 1, 1, 1), jnp.float32)
    v = jnp.array([[[[2.0, -3.0]]]])
    for impl in ("dense", "scan"):
        o = pdma(idx, 0.5 * one, idx, one, v, num_slots=4, impl=impl)
        np.testing.assert_allclose(np.asarray(o)[0, 0, 0], 0.5 * np.array([2.0, -3.0]) / (1 + 1e-6), rtol=1e-6)


def test_unwritten_slots_read_zero_with_initial_normaliser():
    # Nothing written yet: S = 0 everywhere, so reads return 0 even though z_0 = 1 / M is tiny.
    read_idx = jnp.array([[[[3, 5]]]], jnp.int32)
    read_val = jnp.array([[[[0.6, 0.4]]]], jnp.float32)
    write_idx = jnp.array([[[[1, 2]]]], jnp.int32)
    write_val = jnp.array([[[[0.5, 0.5]]]], jnp.float32)
    v = jnp.ones((1, 1, 1, 3))
    for impl in ("dense", "scan"):
        o = pdma(read_idx, read_val, write_idx, write_val, v, num_slots=8, impl=impl)
        np.testing.assert_array_equal(np.asarray(o), 0.0)


def test_auto_dtypes_and_jit():
    codes = ramnet_codes(21, 1, 33, 2, 2, 4, 4, cape=True)
    v = jnp.asarray(np.random.default_rng(22).normal(size=(1, 33, 2, 8)), jnp.float32)
    want = pdma(*codes, v, num_slots=16, impl="dense")
    got = jax.jit(functools.partial(pdma, num_slots=16))(*codes, v)
    assert rel_rms(got, want) < 1e-5
    o16 = pdma(*codes, v.astype(jnp.bfloat16), num_slots=16, impl="scan")
    assert o16.dtype == jnp.bfloat16
    assert rel_rms(o16, want) < 1e-2


def _scan_memory(num_slots, seq_len, with_grad):
    batch, heads, top_k, d_v = 1, 2, 8, 16
    idx = jax.ShapeDtypeStruct((batch, seq_len, heads, top_k), jnp.int32)
    val = jax.ShapeDtypeStruct((batch, seq_len, heads, top_k), jnp.float32)
    v = jax.ShapeDtypeStruct((batch, seq_len, heads, d_v), jnp.float32)

    def loss(read_idx, read_val, write_idx, write_val, v):
        return jnp.sum(pdma(read_idx, read_val, write_idx, write_val, v, num_slots=num_slots, impl="scan"))

    fn = jax.grad(loss, argnums=(1, 3, 4)) if with_grad else loss
    return jax.jit(fn).lower(idx, val, idx, val, v).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("with_grad", [False, True])
def test_scan_memory_does_not_grow_with_num_slots(with_grad):
    small = _scan_memory(2**10, 512, with_grad)
    large = _scan_memory(2**20, 512, with_grad)
    assert large <= small * 1.05 + 4096, (small, large)


def test_scan_runs_with_a_million_slots():
    """M = 16 ** 5 = 2 ** 20 on the CPU at T = 512, checked against the step form (which stores M rows)."""
    batch, seq_len, heads, d_v = 1, 512, 2, 16
    codes = ramnet_codes(31, batch, seq_len, heads, 5, 16, 8, cape=True)
    v = jnp.asarray(np.random.default_rng(32).normal(size=(batch, seq_len, heads, d_v)), jnp.float32)
    o_scan = jax.jit(functools.partial(pdma, num_slots=2**20, impl="scan"))(*codes, v)
    o_steps = jax.jit(_run_steps, static_argnums=(2, 3))(codes, v, 2**20, 1.0)
    assert rel_rms(o_scan, o_steps) < 1e-5


def _good_args(num_slots=8):
    rng = np.random.default_rng(0)
    read_idx, read_val = random_codes(rng, (1, 4, 2, 3), num_slots)
    write_idx, write_val = random_codes(rng, (1, 4, 2, 3), num_slots)
    v = jnp.zeros((1, 4, 2, 5))
    return dict(read_idx=read_idx, read_val=read_val, write_idx=write_idx, write_val=write_val, v=v)


@pytest.mark.parametrize(
    "change,kwargs,needle",
    [
        (dict(read_idx=jnp.full((1, 4, 2, 3), 8, jnp.int32)), {}, r"read_idx: indices must lie in \[0, 8\)"),
        (dict(write_idx=jnp.full((1, 4, 2, 3), -1, jnp.int32)), {}, r"write_idx: indices must lie in \[0, 8\)"),
        (dict(read_idx=jnp.zeros((1, 4, 2, 3), jnp.float32)), {}, "read_idx: expected an integer dtype"),
        (dict(write_val=jnp.zeros((1, 4, 2, 2))), {}, "write_val: expected shape"),
        (dict(read_idx=jnp.zeros((1, 5, 2, 3), jnp.int32)), {}, "read_idx: expected shape"),
        (dict(v=jnp.zeros((1, 4, 2))), {}, r"v: expected shape \[batch, time, heads, d_v\]"),
        (dict(write_idx=jnp.zeros((1, 4, 2, 9), jnp.int32), write_val=jnp.zeros((1, 4, 2, 9))), {},
         "write_idx: K = 9 slots per token is more than num_slots = 8"),
        ({}, dict(gamma=-0.5), "gamma: must be a finite number >= 0"),
        ({}, dict(eps=-1.0), "eps: must be a number >= 0"),
        ({}, dict(grad_eps=1.0), r"grad_eps: must be a number in \[0, 1\)"),
        ({}, dict(impl="pallas2"), "impl: must be one of"),
        ({}, dict(num_slots=0), "num_slots: must be a positive integer"),
    ],
)
def test_pdma_rejects_bad_arguments(change, kwargs, needle):
    args = {**_good_args(), **change}
    kwargs = {"num_slots": 8, **kwargs}
    with pytest.raises(ValueError, match=needle):
        pdma(**args, **kwargs)


def test_pdma_step_rejects_bad_arguments():
    state = pdma_init(1, 2, 8, 5)
    idx, val = random_codes(np.random.default_rng(0), (1, 2, 3), 8)
    with pytest.raises(ValueError, match=r"v: expected shape \[batch, heads, d_v\]"):
        pdma_step(state, idx, val, idx, val, jnp.zeros((1, 2, 4)))
    with pytest.raises(ValueError, match=r"write_idx: indices must lie in \[0, 8\)"):
        pdma_step(state, idx, val, idx + 8, val, jnp.zeros((1, 2, 5)))
    with pytest.raises(ValueError, match="state: expected memory"):
        pdma_step((state.memory[0], state.normaliser), idx, val, idx, val, jnp.zeros((1, 2, 5)))


def test_auto_picks_dense_only_for_a_small_memory_on_cpu():
    from ramjax.ops.memory import resolve_impl

    assert jax.default_backend() == "cpu"
    assert resolve_impl("auto", 32, 64) == "dense"
    assert resolve_impl("auto", 1024, 64) == "scan"
    assert resolve_impl("auto", 2**20, 16) == "scan"
    assert resolve_impl("dense", 2**20, 16) == "dense"
