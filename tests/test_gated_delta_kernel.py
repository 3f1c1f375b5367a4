"""The chunked gated delta rule kernels (kernels.gated_delta_chunk, interpret mode, NaN-poisoned outputs) against
a float64 token recurrence: outputs, final state and all six gradients. Interpret mode is slow to compile, so one
case runs by default and the rest with -m slow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import gated_delta_chunk
from kernels.gated_delta_chunk import chunk_gated_delta
from numerics import matmul_dtypes, rel_rms

FP32_TOLERANCE = 1e-4  # relative RMS error against the float64 reference
BF16_TOLERANCE = 2e-2  # relative RMS error of bf16 inputs against the fp32 kernel on the same (rounded) inputs


def reference_gated_delta(q, k, v, log_decay, beta, initial_state):
    """The recurrence token by token (lax.scan over time):
    S_t = exp(a_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T q_t. Shapes as chunk_gated_delta's."""

    def step(state, x):
        q_t, k_t, v_t, a_t, b_t = x  # [B, H, d], [B, H]
        read = jnp.einsum("bhk,bhkv->bhv", k_t, state)
        state = state - b_t[..., None, None] * k_t[..., :, None] * read[..., None, :]
        state = jnp.exp(a_t)[..., None, None] * state + b_t[..., None, None] * k_t[..., :, None] * v_t[..., None, :]
        return state, jnp.einsum("bhk,bhkv->bhv", q_t, state)

    time_major = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, log_decay, beta))
    final, o = jax.lax.scan(step, initial_state, time_major)
    return jnp.moveaxis(o, 0, 1), final


def random_problem(seed, *, batch=1, seq_len=37, heads=2, d_k=24, d_v=40, decay_scale=1.0, aligned=0.0):
    """float64 numpy inputs (q, k, v, log_decay, beta, initial_state) and cotangents (d o, d final state): unit-norm
    keys, beta uniform in [0, 1], log decays -softplus(normal - 2) * decay_scale. With aligned > 0 the keys share a
    common direction (k = aligned * e + noise, normalised): large entries in K K^T, the hard case for the inverse."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, seq_len, heads, d_k)) / np.sqrt(d_k)
    k = rng.normal(size=(batch, seq_len, heads, d_k)) / np.sqrt(d_k) + aligned * rng.normal(size=d_k) / np.sqrt(d_k)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(batch, seq_len, heads, d_v))
    log_decay = -np.logaddexp(0.0, rng.normal(size=(batch, seq_len, heads)) - 2.0) * decay_scale
    beta = rng.uniform(size=(batch, seq_len, heads))
    initial_state = rng.normal(size=(batch, heads, d_k, d_v))
    d_out = rng.normal(size=(batch, seq_len, heads, d_v))
    d_final = rng.normal(size=(batch, heads, d_k, d_v))
    return (q, k, v, log_decay, beta, initial_state), (d_out, d_final)


def kernel_vjp(inputs, cotangents, *, chunk_size, with_initial_state, dtype=jnp.float32, interpret=True):
    """(o, final state) and the gradients of chunk_gated_delta in interpret mode with poisoned outputs (q, k, v in
    dtype); without an initial state the sixth gradient is not returned."""
    q, k, v, log_decay, beta, initial_state = inputs

    def run(q, k, v, log_decay, beta, *state):
        return chunk_gated_delta(q, k, v, log_decay, beta, *(state or (None,)), chunk_size=chunk_size,
                                 interpret=interpret, poison_output=True)

    args = [jnp.asarray(x, dtype) for x in (q, k, v)] + [jnp.asarray(x, jnp.float32) for x in (log_decay, beta)]
    if with_initial_state:
        args.append(jnp.asarray(initial_state, jnp.float32))
    (o, final), vjp = jax.vjp(jax.jit(run), *args)
    d_out, d_final = cotangents
    grads = vjp((jnp.asarray(d_out, o.dtype), jnp.asarray(d_final, jnp.float32)))
    return (o, final), grads


def reference_vjp(inputs, cotangents, *, with_initial_state):
    q, k, v, log_decay, beta, initial_state = inputs
    if not with_initial_state:
        initial_state = np.zeros_like(initial_state)
    with jax.enable_x64(True):
        outputs, vjp = jax.vjp(jax.jit(reference_gated_delta), *(jnp.asarray(x, jnp.float64) for x in
                                                         (q, k, v, log_decay, beta, initial_state)))
        grads = vjp(tuple(jnp.asarray(c, jnp.float64) for c in cotangents))
        outputs, grads = jax.tree.map(np.asarray, (outputs, grads))
    return outputs, grads if with_initial_state else grads[:5]


NAMES = ("o", "final state", "dq", "dk", "dv", "d log_decay", "d beta", "d initial_state")


def check_against_reference(seed, *, chunk_size, with_initial_state, interpret=True, **problem):
    inputs, cotangents = random_problem(seed, **problem)
    (o, final), grads = kernel_vjp(inputs, cotangents, chunk_size=chunk_size, with_initial_state=with_initial_state,
                                   interpret=interpret)
    (want_o, want_final), want_grads = reference_vjp(inputs, cotangents, with_initial_state=with_initial_state)
    got = [o, final, *grads]
    want = [want_o, want_final, *want_grads]
    assert len(got) == (8 if with_initial_state else 7)
    for name, x, w in zip(NAMES, got, want):
        assert x.dtype == jnp.float32, name
        assert x.shape == w.shape, (name, x.shape, w.shape)
        assert np.all(np.isfinite(np.asarray(x))), f"{name}: not finite (an unwritten poisoned entry?)"
    errors = {name: rel_rms(x, w) for name, x, w in zip(NAMES, got, want)}
    print(errors)
    assert max(errors.values()) < FP32_TOLERANCE, errors
    return errors


@pytest.mark.parametrize("min_state_programs", [gated_delta_chunk.MIN_STATE_PROGRAMS,
                                                pytest.param(1, marks=pytest.mark.slow)])
def test_fp32_matches_float64_recurrence_default_case(monkeypatch, min_state_programs):
    """The default-run case: odd T (3 chunks of 16, the last one padded), d_k != d_v, an initial state. The
    sequential kernels' d_v blocks: narrowed to 16 for this small batch by default, or as wide as the other
    kernels' (min_state_programs 1)."""
    monkeypatch.setattr(gated_delta_chunk, "MIN_STATE_PROGRAMS", min_state_programs)
    check_against_reference(0, chunk_size=16, with_initial_state=True)


def test_split_gradient_kernels_match_float64_recurrence(monkeypatch):
    """The per-chunk gradients as two kernels (GRAD_KERNEL_SPLIT: the output side and the WY side, their dk and dg
    summed): odd T over two chunks of 32, strong decays, d_k != d_v, an initial state."""
    monkeypatch.setattr(gated_delta_chunk, "GRAD_KERNEL_SPLIT", True)
    check_against_reference(3, chunk_size=32, with_initial_state=True, seq_len=45, decay_scale=3.0)


@pytest.mark.parametrize("split", [False, True])
def test_reused_inverse_matches_float64_recurrence(monkeypatch, split):
    """REUSE_INVERSE: the backward pass's rerun WY kernel hands each chunk's inverse to the gradients kernel (one
    kernel, or the split WY side) instead of it forming the inverse again; the same gradients (odd T, strong decays,
    d_k != d_v, an initial state)."""
    monkeypatch.setattr(gated_delta_chunk, "REUSE_INVERSE", True)
    monkeypatch.setattr(gated_delta_chunk, "GRAD_KERNEL_SPLIT", split)
    check_against_reference(11, chunk_size=16, with_initial_state=True, seq_len=45, decay_scale=3.0)


def test_saved_forward_pieces_match_float64_recurrence(monkeypatch):
    """SAVE_FORWARD: the backward pass uses the forward's W, chunk states and V' instead of rerunning their
    kernels; the same gradients (odd T, an initial state)."""
    monkeypatch.setattr(gated_delta_chunk, "SAVE_FORWARD", True)
    check_against_reference(5, chunk_size=16, with_initial_state=True)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="TF32 products need a GPU (interpret mode computes IEEE)")
def test_tf32x3_inverse_matches_float64_recurrence_on_a_gpu(monkeypatch):
    """INVERSE_PRECISION "tf32x3" (compiled kernels on a GPU): the inverse's products as three TF32 products each
    keep fp32's tolerance against the float64 recurrence, at chunk 64 with keys sharing a direction (large entries
    in K K^T, the inverse's hard case)."""
    monkeypatch.setattr(gated_delta_chunk, "INVERSE_PRECISION", "tf32x3")
    check_against_reference(7, chunk_size=64, with_initial_state=True, interpret=False, seq_len=200, d_k=64,
                            d_v=64, aligned=2.0)


def test_inverse_precision_is_checked(monkeypatch):
    monkeypatch.setattr(gated_delta_chunk, "INVERSE_PRECISION", "tf32")
    q = jnp.zeros((1, 16, 1, 16))
    with pytest.raises(ValueError, match="INVERSE_PRECISION: 'tf32' is not one of"):
        chunk_gated_delta(q, q, q, jnp.zeros((1, 16, 1)), jnp.zeros((1, 16, 1)), interpret=True)


def test_sequential_kernels_narrow_their_blocks_for_few_sequences():
    assert gated_delta_chunk.state_block_v(16, 128) == 16  # the LM at 16384 x 2: 16 sequences x 8 blocks
    assert gated_delta_chunk.state_block_v(64, 128) == 32  # 4096 x 8: 64 x 4 = 256 programs
    assert gated_delta_chunk.state_block_v(256, 128) == 64  # enough sequences: the full width
    assert gated_delta_chunk.state_block_v(1, 16) == 16


@pytest.mark.slow
@pytest.mark.parametrize("seq_len,chunk_size,with_initial_state,decay_scale,d_k,d_v,batch", [
    (50, 16, False, 1.0, 24, 40, 1),  # no initial state
    (50, 64, True, 1.0, 24, 40, 2),  # one padded chunk of 64, batch 2
    (150, 64, True, 1.0, 40, 24, 1),  # 3 chunks of 64, d_k > d_v
    (37, 32, True, 1.0, 24, 40, 1),
    (37, 16, True, 8.0, 24, 40, 1),  # strong decays: exp(g) underflows across a chunk
    (50, 64, False, 8.0, 24, 40, 1),
    (37, 16, True, 1.0, 80, 72, 1),  # several d_v blocks (128 padded, 64 per block)
])
def test_fp32_matches_float64_recurrence(seq_len, chunk_size, with_initial_state, decay_scale, d_k, d_v, batch):
    check_against_reference(seq_len * 7 + chunk_size, chunk_size=chunk_size, with_initial_state=with_initial_state,
                            seq_len=seq_len, decay_scale=decay_scale, d_k=d_k, d_v=d_v, batch=batch)


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size,decay_scale", [(64, 0.1), (32, 1.0)])
def test_aligned_keys_match_float64_recurrence(chunk_size, decay_scale):
    """Keys sharing one direction (pairwise cosines about 0.9) and weak decays: K K^T near all-ones, where a badly
    conditioned form of the inverse (the Neumann product) fails in fp32."""
    check_against_reference(11, chunk_size=chunk_size, with_initial_state=True, seq_len=100, aligned=3.0,
                            decay_scale=decay_scale)


ON_GPU = jax.default_backend() == "gpu"


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (compiles the Triton kernels)")
@pytest.mark.parametrize("seq_len,chunk_size,d_k,d_v,decay_scale,aligned", [
    (37, 16, 24, 40, 1.0, 0.0),
    (150, 64, 40, 24, 8.0, 0.0),
    (300, 64, 128, 128, 1.0, 0.0),
    (200, 64, 64, 64, 0.1, 3.0),
])
def test_gpu_fp32_matches_float64_recurrence(seq_len, chunk_size, d_k, d_v, decay_scale, aligned):
    """The compiled Triton kernels (not interpret mode) against the float64 recurrence."""
    check_against_reference(seq_len + d_k, chunk_size=chunk_size, with_initial_state=True, interpret=False,
                            seq_len=seq_len, d_k=d_k, d_v=d_v, decay_scale=decay_scale, aligned=aligned, batch=2)


@pytest.mark.slow
def test_bf16_inputs_match_fp32_kernel():
    """bf16 q, k, v (bf16 matrix-product operands, fp32 accumulation, fp32 inverse) against the fp32 kernel on the
    same bf16-rounded inputs, within BF16_TOLERANCE; o, dq, dk, dv in bf16, the rest fp32."""
    inputs, cotangents = random_problem(3, seq_len=50)
    q, k, v = (np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)) for x in inputs[:3])
    inputs = (q, k, v, *inputs[3:])
    d_out = np.asarray(jnp.asarray(cotangents[0], jnp.bfloat16).astype(jnp.float32))
    cotangents = (d_out, cotangents[1])
    options = dict(chunk_size=32, with_initial_state=True)
    (o, final), grads = kernel_vjp(inputs, cotangents, dtype=jnp.bfloat16, **options)
    (want_o, want_final), want_grads = kernel_vjp(inputs, cotangents, **options)
    assert o.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3 + [jnp.float32] * 3
    errors = {name: rel_rms(np.asarray(x, np.float32), w)
              for name, x, w in zip(NAMES, [o, final, *grads], [want_o, want_final, *want_grads])}
    print(errors)
    assert max(errors.values()) < BF16_TOLERANCE, errors


@pytest.mark.slow
def test_bf16_matrix_products_and_fp32_inverse():
    """With bf16 q, k, v every matrix product multiplies bf16 operands into fp32, except the inverse's and its
    gradient's, which are fp32 x fp32 at full precision."""
    inputs, _ = random_problem(4, seq_len=20, d_k=16, d_v=16)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in inputs[:3])
    log_decay, beta, state = (jnp.asarray(x, jnp.float32) for x in inputs[3:])

    def loss(q, k, v, log_decay, beta, state):
        o, final = chunk_gated_delta(q, k, v, log_decay, beta, state, chunk_size=16, interpret=True)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

    dots = matmul_dtypes(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)), q, k, v, log_decay, beta, state)
    kinds = set(dots)
    assert kinds == {(("bfloat16", "bfloat16"), "float32"), (("float32", "float32"), "float32")}, kinds
    # the inverse: 2 products per doubling round (4 rounds at C = 16), in the forward's WY kernel, the backward's
    # recomputed WY kernel and the gradient kernel; plus 2 for the inverse's gradient
    assert sum(d == (("float32", "float32"), "float32") for d in dots) == 3 * 8 + 2


def test_arguments_are_checked():
    q = jnp.zeros((1, 5, 2, 8))
    v = jnp.zeros((1, 5, 2, 4))
    a = -jnp.ones((1, 5, 2))
    b = jnp.full((1, 5, 2), 0.5)
    with pytest.raises(ValueError, match="^q:"):
        chunk_gated_delta(q[0], q[0], v[0], a[0], b[0])
    with pytest.raises(ValueError, match="^k:"):
        chunk_gated_delta(q, q[..., :4], v, a, b)
    with pytest.raises(ValueError, match="^v:"):
        chunk_gated_delta(q, q, v[:, :4], a, b)
    with pytest.raises(ValueError, match="^log_decay:.*shape"):
        chunk_gated_delta(q, q, v, a[..., None], b)
    with pytest.raises(ValueError, match="^beta:.*shape"):
        chunk_gated_delta(q, q, v, a, b[:, :, :1])
    with pytest.raises(ValueError, match="^beta:.*floating"):
        chunk_gated_delta(q, q, v, a, jnp.ones((1, 5, 2), jnp.int32))
    with pytest.raises(ValueError, match="^log_decay: must be <= 0"):
        chunk_gated_delta(q, q, v, a.at[0, 3, 1].set(0.5), b)
    with pytest.raises(ValueError, match="^initial_state:"):
        chunk_gated_delta(q, q, v, a, b, jnp.zeros((1, 2, 4, 8)))
    with pytest.raises(ValueError, match="^chunk_size:"):
        chunk_gated_delta(q, q, v, a, b, chunk_size=24)
    with pytest.raises(ValueError, match="^q: expected float32 or bfloat16"):
        chunk_gated_delta(q.astype(jnp.float16), q, v, a, b)


@pytest.mark.parametrize("split,precision,reuse", [(False, "ieee", False), (True, "ieee", False),
                                                   (False, "tf32x3", False), (False, "ieee", True)])
def test_gradient_lowers_for_cuda_through_triton(monkeypatch, split, precision, reuse):
    """The forward and backward kernels lower to Triton custom calls for CUDA (jax.export; no GPU needed), also with
    the inverse's products as TF32 x 3 (INVERSE_PRECISION, which interpret mode cannot run: CPUs have no TF32).
    This checks the Pallas-to-Triton lowering only, not Triton's compilation to PTX."""
    from jax import export
    monkeypatch.setattr(gated_delta_chunk, "GRAD_KERNEL_SPLIT", split)
    monkeypatch.setattr(gated_delta_chunk, "INVERSE_PRECISION", precision)
    monkeypatch.setattr(gated_delta_chunk, "REUSE_INVERSE", reuse)

    def loss(q, k, v, log_decay, beta, state):
        o, final = chunk_gated_delta(q, k, v, log_decay, beta, state, chunk_size=64)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(final**2)  # (squares: the gradient needs o)

    b, t, h, d_k, d_v = 2, 100, 2, 80, 40
    shapes = [jax.ShapeDtypeStruct((b, t, h, d_k), jnp.bfloat16)] * 2 + [
        jax.ShapeDtypeStruct((b, t, h, d_v), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, t, h), jnp.float32), jax.ShapeDtypeStruct((b, t, h), jnp.float32),
        jax.ShapeDtypeStruct((b, h, d_k, d_v), jnp.float32)]
    exported = export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*shapes)
    module = exported.mlir_module()
    # WY, states and outputs forward; WY and states again, state gradients and the chunk gradients (one kernel or
    # two) backward
    assert module.count("__gpu$xla.gpu.triton") == 7 + split
    grads = ("gated_delta_grads_outputs", "gated_delta_grads_wy") if split else ("gated_delta_grads",)
    for name in ("gated_delta_wy", "gated_delta_states", "gated_delta_outputs", "gated_delta_state_grads", *grads):
        assert name in module, name
