"""The Pallas kernels (interpret mode on the CPU) against plain references, outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.pdma import pdma as kernel_pdma
from kernels.sparse_scan import sparse_gated_scan, sparse_gated_scan_loop
from kernels.token_scan import token_scan, token_scan_loop
from ramjax.numerics import rel_rms
from ramjax.ops.memory import pdma

PALLAS = [("triton", True), ("tpu", True), ("token", True)]
ALL = [("xla", False), ("sorted", False)] + PALLAS
SCAN_BACKENDS = [b for b in ALL if b[0] != "token"]  # the sparse gated scan's backends


def scan_inputs(rng, g, t, ku, kr, ru, d, m):
    return (
        rng.integers(-1, m, (g, t, ku)).astype(np.int32),
        -rng.exponential(0.5, (g, t, ku)).astype(np.float32),
        rng.normal(size=(g, t, ku)).astype(np.float32),
        rng.integers(0, ru, (g, t, ku)).astype(np.int32),
        rng.normal(size=(g, t, ru, d)).astype(np.float32),
        rng.integers(-1, m, (g, t, kr)).astype(np.int32),
        rng.normal(size=(d,)).astype(np.float32),
    )


SCAN_SHAPES = [(2, 37, 3, 5, 2, 20, 7), (1, 63, 8, 16, 1, 65, 16), (3, 1, 1, 2, 1, 3, 4)]
# One shape per backend in the default run (each case compiles three chunk sizes); the rest are `slow`. The sorted
# backend's scan (~15 s on 2 cores, even at the smallest shape) is all slow: PDMA does not call it (its sorted backend,
# kernels/pdma_sorted.py, runs by default in the PDMA tests below, on the same kernels/sorted_scan.py stages).
FAST_SCAN_SHAPE = {"xla": SCAN_SHAPES[0], "triton": SCAN_SHAPES[0], "tpu": SCAN_SHAPES[0]}


def _scan_params():
    return [pytest.param(backend, interpret, shape, id=f"shape{i}-{backend}-{interpret}",
                         marks=[pytest.mark.slow] if FAST_SCAN_SHAPE.get(backend) != shape else [])
            for backend, interpret in SCAN_BACKENDS for i, shape in enumerate(SCAN_SHAPES)]


@pytest.mark.parametrize("backend,interpret,shape", _scan_params())
def test_sparse_gated_scan_matches_the_token_loop(backend, interpret, shape):
    """Random slots (with -1 = none, and repeats inside a step), decays, scales and rows; odd sizes."""
    g, t, ku, kr, ru, d, m = shape
    args = scan_inputs(np.random.default_rng(sum(shape)), g, t, ku, kr, ru, d, m)
    expected = sparse_gated_scan_loop(*args, m)
    for chunk in (1, 4, 16):
        out = sparse_gated_scan(*map(jnp.asarray, args), num_slots=m, backend=backend, chunk=chunk,
                                interpret=interpret, **({"poison_output": True} if backend != "xla" else {}))
        assert out.shape == expected.shape
        assert rel_rms(out, expected) < 1e-6, (backend, chunk)


# slow: ~12 s on 2 cores for 2^30; the sorted backend's small-memory cases above and in the PDMA tests run by default.
@pytest.mark.slow
@pytest.mark.parametrize("num_slots", [2**20, 2**30])
def test_sorted_scan_with_a_huge_memory(num_slots):
    """The sorted backend holds no M-sized array; 2^30 slots take its batched-sort path (row * (M + 1) + slot
    no longer fits in int32). Slots drawn from a few values so that they repeat."""
    rng = np.random.default_rng(num_slots % 97)
    args = list(scan_inputs(rng, 3, 29, 4, 3, 2, 5, 6))
    lookup = np.array([0, 7, num_slots - 1, 12345, 99, num_slots // 2])
    for i in (0, 5):
        args[i] = np.where(args[i] >= 0, lookup[np.maximum(args[i], 0)], -1).astype(np.int32)
    expected = sparse_gated_scan_loop(*(np.where(a >= 0, np.searchsorted(np.sort(lookup), a), -1)
                                        if i in (0, 5) else a for i, a in enumerate(args)), 6)
    out = sparse_gated_scan(*map(jnp.asarray, args), num_slots=num_slots, backend="sorted", chunk=8)
    assert rel_rms(out, expected) < 1e-6


def test_sparse_gated_scan_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    args = list(map(jnp.asarray, scan_inputs(rng, 1, 4, 2, 2, 1, 3, 5)))
    with pytest.raises(ValueError, match="backend"):
        sparse_gated_scan(*args, num_slots=5, backend="cuda")
    with pytest.raises(ValueError, match="chunk"):
        sparse_gated_scan(*args, num_slots=5, chunk=3)
    bad = list(args)
    bad[1] = bad[1][:, :, :1]
    with pytest.raises(ValueError, match="upd_log_decay"):
        sparse_gated_scan(*bad, num_slots=5)


def token_scan_inputs(rng, g, t, kd, ka, kr, d, m):
    """Random decay, add and read events (slot -1 = none; repeats inside a step), rows and initial state."""
    return (rng.integers(-1, m, (g, kd, t)).astype(np.int32), -rng.exponential(0.5, (g, kd, t)).astype(np.float32),
            rng.integers(-1, m, (g, ka, t)).astype(np.int32), rng.normal(size=(g, ka, t)).astype(np.float32),
            rng.normal(size=(g, ka, t)).astype(np.float32), rng.normal(size=(g, t, d)).astype(np.float32),
            rng.integers(-1, m, (g, kr, t)).astype(np.int32), rng.normal(size=(d,)).astype(np.float32), 0.3)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape", [(2, 37, 3, 5, 2, 20, 7), (3, 5, 1, 2, 3, 3, 4)])
def test_token_scan_matches_the_step_loop(shape, reverse):
    """Decay and add events on separate slots, forwards and backwards in time, chunks that do and do not
    divide T, more columns than one tile; NaN-poisoned outputs."""
    g, t, kd, ka, kr, d, m = shape
    args = token_scan_inputs(np.random.default_rng(sum(shape)), g, t, kd, ka, kr, d, m)
    want, want_scalar = token_scan_loop(*args, m, reverse=reverse)
    for chunk in (1, 16):
        out, out_scalar = token_scan(*map(jnp.asarray, args[:8]), args[8], num_slots=m, chunk=chunk, d_tile=16,
                                     reverse=reverse, interpret=True, poison_output=True)
        assert out.shape == want.shape and out_scalar.shape == want_scalar.shape
        assert rel_rms(out, want) < 1e-6 and rel_rms(out_scalar, want_scalar) < 1e-6, chunk


def test_token_scan_adds_are_decays():
    """PDMA's forward pass: the same events decay and add (the kernel then skips the add group's stores)."""
    dslot, dld, _, acoef, ascalar, rows, rslot, init_row, init_scalar = token_scan_inputs(
        np.random.default_rng(1), 1, 40, 8, 8, 16, 65, 16)
    args = (dslot, dld, dslot, acoef, ascalar, rows, rslot, init_row, init_scalar)
    want, want_scalar = token_scan_loop(*args, 16)
    out, out_scalar = token_scan(*map(jnp.asarray, args[:8]), init_scalar, num_slots=16, chunk=16,
                                 adds_are_decays=True, interpret=True, poison_output=True)
    assert rel_rms(out, want) < 1e-6 and rel_rms(out_scalar, want_scalar) < 1e-6


def pdma_codes(rng, batch, t, heads, k, m, d_v, repeats=False):
    read_idx = rng.integers(0, m, (batch, t, heads, k))
    write_idx = rng.integers(0, m, (batch, t, heads, k))
    if repeats and k > 1:
        # The hard cases for a parallel kernel: one slot written twice in a step, and in adjacent steps.
        write_idx[..., 1] = write_idx[..., 0]
        write_idx[:, 1::2, :, 0] = write_idx[:, 0:-1:2, :, 0]
        read_idx[..., 1] = read_idx[..., 0]
    read_val = rng.uniform(0, 1, (batch, t, heads, k)) / k
    write_val = rng.uniform(0, 1, (batch, t, heads, k)) / k * 1.5
    v = rng.normal(size=(batch, t, heads, d_v))
    return read_idx, read_val, write_idx, write_val, v


def reference(codes, m, gamma, cotangent):
    """Dense float64 PDMA and its gradients with respect to (read_val, write_val, v)."""
    def loss(rv, wv, v):
        return jnp.sum(pdma(ri, rv, wi, wv, v, num_slots=m, gamma=gamma, impl="dense") * cotangent)

    with jax.enable_x64(True):
        ri, rv, wi, wv, v = (jnp.asarray(x, jnp.int32 if i in (0, 2) else jnp.float64) for i, x in enumerate(codes))
        o = jax.jit(lambda rv, wv, v: pdma(ri, rv, wi, wv, v, num_slots=m, gamma=gamma, impl="dense"))(rv, wv, v)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(rv, wv, v)  # jitted: op by op is several times slower
        return np.asarray(o), [np.asarray(x) for x in grads]


def kernel_results(codes, m, gamma, cotangent, backend, interpret, v_dtype=jnp.float32, **options):
    ri, rv, wi, wv, v = codes
    rv, wv = jnp.asarray(rv, jnp.float32), jnp.asarray(wv, jnp.float32)
    v = jnp.asarray(v, v_dtype)
    run = jax.jit(lambda rv, wv, v: kernel_pdma(ri, rv, wi, wv, v, num_slots=m, gamma=gamma, backend=backend,
                                                interpret=interpret, poison_output=backend != "xla", **options))

    def loss(rv, wv, v):
        return jnp.sum(run(rv, wv, v).astype(jnp.float32) * jnp.asarray(cotangent, jnp.float32))

    return run(rv, wv, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(rv, wv, v)


# Every size the issue names appears: T in {1, 63, 257}, d_v in {20, 64}, K in {1, 8}, M in {16, 1024},
# gamma in {0, 1, 2}; chunk sizes that do and do not divide T.
PDMA_CASES = [
    # batch, T, heads, K, M, d_v, gamma, repeats, chunk
    (2, 1, 2, 8, 16, 20, 1.0, True, 16),
    (1, 63, 2, 8, 16, 64, 2.0, True, 16),
    (1, 63, 1, 1, 1024, 20, 0.0, False, 4),
    (1, 257, 1, 8, 1024, 64, 1.0, True, 16),
    (2, 257, 1, 1, 16, 20, 2.0, False, 8),
    (1, 63, 3, 8, 1024, 20, 0.0, True, 8),
]


# The cases of each backend in the default run (indices into PDMA_CASES): case 1 everywhere, and every case on some
# backend; the rest (~40 s on 2 cores) with -m slow. The token scan's interpret mode is the slowest: case 1 alone.
FAST_PDMA_CASES = {"xla": (1, 3), "sorted": (1, 2), "triton": (0, 1, 2, 4), "tpu": (1, 2, 4, 5), "token": (1,)}


def _pdma_params():
    """Every backend at every case, FAST_PDMA_CASES by default and the rest with -m slow."""
    params = []
    for i, case in enumerate(PDMA_CASES):
        for backend, interpret in ALL:
            slow = i not in FAST_PDMA_CASES[backend]
            params.append(pytest.param(backend, interpret, case, marks=[pytest.mark.slow] if slow else [],
                                       id="{}-B{}_T{}_H{}_K{}_M{}_dv{}_g{}_rep{}_C{}".format(backend, *case)))
    return params


@pytest.mark.parametrize("backend,interpret,case", _pdma_params())
def test_pdma_kernel_matches_dense_float64(backend, interpret, case):
    batch, t, heads, k, m, d_v, gamma, repeats, chunk = case
    if backend == "tpu" and t == 257 and m == 1024:
        pytest.skip("the TPU kernel's interpret mode runs token by token: covered at the smaller sizes")
    rng = np.random.default_rng(t * 7 + k + m)
    codes = pdma_codes(rng, batch, t, heads, k, m, d_v, repeats)
    cotangent = rng.normal(size=(batch, t, heads, d_v))
    o_ref, grads_ref = reference(codes, m, gamma, cotangent)
    o, grads = kernel_results(codes, m, gamma, cotangent, backend, interpret, chunk=chunk)
    assert np.all(np.isfinite(o))
    assert rel_rms(o, o_ref) < 1e-5
    for name, g, g_ref in zip(("read_val", "write_val", "v"), grads, grads_ref):
        assert np.all(np.isfinite(g)), name
        assert rel_rms(g, g_ref) < 1e-5, name


@pytest.mark.parametrize("case", [PDMA_CASES[1], PDMA_CASES[3]], ids=["M16_g2", "M1024_T257"])
def test_pdma_sorted_block_kernel_matches_dense_float64(case):
    """Backend "sorted" with its in-block recurrence by the Pallas kernel (interpret mode, NaN-poisoned outputs)."""
    batch, t, heads, k, m, d_v, gamma, repeats, _ = case
    rng = np.random.default_rng(t + m)
    codes = pdma_codes(rng, batch, t, heads, k, m, d_v, repeats)
    cotangent = rng.normal(size=(batch, t, heads, d_v))
    o_ref, grads_ref = reference(codes, m, gamma, cotangent)
    o, grads = kernel_results(codes, m, gamma, cotangent, "sorted", True, chunk=16, block_kernel=True)
    assert rel_rms(o, o_ref) < 1e-5
    for name, g, g_ref in zip(("read_val", "write_val", "v"), grads, grads_ref):
        assert rel_rms(g, g_ref) < 1e-5, name


def _segmented_loop(starts, ld, x, reverse):
    """The segmented recurrence one event at a time (numpy, float64)."""
    h = np.zeros_like(x, np.float64)
    for row in range(x.shape[0]):
        order = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
        prev = None
        for i in order:
            h[row, i] = x[row, i] + (0.0 if starts[row, i] or prev is None else np.exp(ld[row, i]) * h[row, prev])
            prev = i
    return h


# slow: ~25 s on 2 cores per direction; the kernel runs by default, both directions (forward and backward pass),
# in test_pdma_sorted_block_kernel_matches_dense_float64 above.
@pytest.mark.slow
@pytest.mark.parametrize("reverse", [False, True])
def test_sorted_block_kernel_matches_the_event_loop(reverse):
    """kernels/sorted_blocks.py (interpret mode, NaN-poisoned outputs) and the jax.numpy blocks == an event loop;
    odd lengths (padded), widths that are and are not powers of 2, resets."""
    from kernels import sorted_blocks, sorted_scan

    rng = np.random.default_rng(11 + reverse)
    for g, n, d, block in ((2, 61, 5, 16), (1, 96, 64, 32), (3, 50, 1, 64)):
        starts = rng.random((g, n)) < 0.2
        ld = np.where(starts, 0.0, -rng.exponential(0.3, (g, n))).astype(np.float32)
        x = rng.normal(size=(g, n, d + 1)).astype(np.float32)
        # In reverse, starts[i] ends the segment at i; the loop's "starts" is the same flag.
        expected = _segmented_loop(starts, ld, x, reverse)
        args = (jnp.asarray(starts), jnp.asarray(ld), jnp.asarray(x[..., :d]), jnp.asarray(x[..., d]))
        h_v, h_z = sorted_blocks.segmented_recurrence(*args, block=block, reverse=reverse, interpret=True,
                                                      poison_output=True)
        assert rel_rms(h_v, expected[..., :d]) < 1e-6 and rel_rms(h_z, expected[..., d]) < 1e-6
        j_v, j_z = sorted_scan.segmented_recurrence(*args, block=block, reverse=reverse)
        assert rel_rms(j_v, expected[..., :d]) < 1e-6 and rel_rms(j_z, expected[..., d]) < 1e-6


# The TPU and token kernels' bf16 cases (~16 s on 2 cores) are slow; their fp32 cases and the bf16 path of the
# Triton kernel run by default.
@pytest.mark.parametrize("backend,interpret", [pytest.param(b, i, marks=pytest.mark.slow) if b in ("tpu", "token")
                                               else (b, i) for b, i in PALLAS + [("sorted", False)]])
def test_pdma_kernel_bf16_values(backend, interpret):
    rng = np.random.default_rng(3)
    codes = pdma_codes(rng, 1, 63, 2, 8, 16, 64, repeats=True)
    cotangent = rng.normal(size=(1, 63, 2, 64))
    o_ref, grads_ref = reference(codes, 16, 1.0, cotangent)
    o, grads = kernel_results(codes, 16, 1.0, cotangent, backend, interpret, v_dtype=jnp.bfloat16, chunk=8)
    assert o.dtype == jnp.bfloat16 and grads[2].dtype == jnp.bfloat16
    assert rel_rms(o, o_ref) < 1e-2
    for g, g_ref in zip(grads, grads_ref):
        assert rel_rms(g, g_ref) < 1e-2


def test_pdma_kernel_xla_backward_flag_gives_the_same_gradients():
    rng = np.random.default_rng(4)
    codes = pdma_codes(rng, 1, 40, 2, 4, 16, 20, repeats=True)
    cotangent = rng.normal(size=(1, 40, 2, 20))
    _, kernel_grads = kernel_results(codes, 16, 1.0, cotangent, "triton", True, chunk=8)
    _, xla_grads = kernel_results(codes, 16, 1.0, cotangent, "triton", True, chunk=8, xla_backward=True)
    for a, b in zip(kernel_grads, xla_grads):
        assert rel_rms(a, b) < 1e-6


@pytest.mark.parametrize("backend,interpret", [("triton", True), ("sorted", False)])
def test_pdma_full_reset_and_saturated_repeats_stay_finite(backend, interpret):
    """w = 1 empties a slot (and repeats summing past 1 clip at 0): finite outputs and gradients."""
    t, k, m = 12, 2, 4
    read_idx = np.zeros((1, t, 1, k), np.int32)
    write_idx = np.zeros((1, t, 1, k), np.int32)
    write_val = np.full((1, t, 1, k), 0.75)  # two writes of 0.75 to slot 0: w = 1.5 -> (1 - w) clipped to 0
    read_val = np.full((1, t, 1, k), 0.5)
    v = np.random.default_rng(5).normal(size=(1, t, 1, 8))
    codes = (read_idx, read_val, write_idx, write_val, v)
    cotangent = np.ones((1, t, 1, 8))
    o_ref, grads_ref = reference(codes, m, 1.0, cotangent)
    o, grads = kernel_results(codes, m, 1.0, cotangent, backend, interpret, chunk=4)
    assert rel_rms(o, o_ref) < 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert np.all(np.isfinite(g))
        assert rel_rms(g, g_ref) < 1e-4


def test_ops_pdma_pallas_impl_runs_the_kernel_on_cpu():
    rng = np.random.default_rng(6)
    ri, rv, wi, wv, v = (jnp.asarray(x, jnp.float32) if i in (1, 3, 4) else jnp.asarray(x)
                         for i, x in enumerate(pdma_codes(rng, 2, 33, 2, 4, 16, 20)))
    o_pallas = pdma(ri, rv, wi, wv, v, num_slots=16, impl="pallas")
    o_scan = pdma(ri, rv, wi, wv, v, num_slots=16, impl="scan")
    assert rel_rms(o_pallas, o_scan) < 1e-5
