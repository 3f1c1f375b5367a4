"""The chunked GLA kernels (kernels.gla_chunk, interpret mode, NaN-poisoned outputs) against a float64 token
recurrence: outputs, final state and all five gradients, for gates per key dimension (GLA) and per head
(Mamba-2). Interpret mode is slow to compile, so one case runs by default and the rest with -m slow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import gla_chunk
from kernels.gla_chunk import chunk_gla
from numerics import matmul_dtypes, rel_rms

FP32_TOLERANCE = 1e-4  # relative RMS error against the float64 reference
BF16_TOLERANCE = 2e-2  # relative RMS error of bf16 inputs against the fp32 kernel on the same (rounded) inputs


def reference_gla(q, k, v, log_decay, initial_state):
    """The recurrence token by token (lax.scan over time): S_t = exp(a_t) * S_{t-1} + k_t v_t^T, o_t = S_t^T q_t.
    Shapes as chunk_gla's; a [B, T, H, 1] gate broadcasts over d_k, and [B, T, 1, d_k] q and k over the heads."""
    q, k = (jnp.broadcast_to(x, v.shape[:3] + x.shape[3:]) for x in (q, k))

    def step(state, x):
        q_t, k_t, v_t, a_t = x  # [B, H, d]
        state = jnp.exp(a_t)[..., None] * state + k_t[..., :, None] * v_t[..., None, :]
        return state, jnp.einsum("bhk,bhkv->bhv", q_t, state)

    time_major = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, log_decay))
    final, o = jax.lax.scan(step, initial_state, time_major)
    return jnp.moveaxis(o, 0, 1), final


def random_problem(seed, *, batch=1, seq_len=37, heads=2, d_k=24, d_v=40, per_dim=True, decay_scale=1.0,
                   shared_qk=False):
    """float64 numpy inputs (q, k, v, log_decay, initial_state) and cotangents (d o, d final state); with
    shared_qk one q and k head for all heads."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, seq_len, 1 if shared_qk else heads, d_k))
    k = rng.normal(size=(batch, seq_len, 1 if shared_qk else heads, d_k)) / np.sqrt(d_k)
    v = rng.normal(size=(batch, seq_len, heads, d_v))
    gate = rng.normal(size=(batch, seq_len, heads, d_k if per_dim else 1))
    log_decay = -np.logaddexp(0.0, gate) * decay_scale  # -softplus: <= 0, strong where decay_scale is large
    initial_state = rng.normal(size=(batch, heads, d_k, d_v))
    d_out = rng.normal(size=(batch, seq_len, heads, d_v))
    d_final = rng.normal(size=(batch, heads, d_k, d_v))
    return (q, k, v, log_decay, initial_state), (d_out, d_final)


def kernel_vjp(inputs, cotangents, *, chunk_size, with_initial_state, dtype=jnp.float32):
    """(o, final state) and the gradients of chunk_gla in interpret mode with poisoned outputs (q, k, v in dtype);
    without an initial state the fifth gradient is not returned."""
    q, k, v, log_decay, initial_state = inputs

    def run(q, k, v, log_decay, *state):
        return chunk_gla(q, k, v, log_decay, *(state or (None,)), chunk_size=chunk_size, interpret=True,
                         poison_output=True)

    args = [jnp.asarray(x, dtype) for x in (q, k, v)] + [jnp.asarray(log_decay, jnp.float32)]
    if with_initial_state:
        args.append(jnp.asarray(initial_state, jnp.float32))
    (o, final), vjp = jax.vjp(jax.jit(run), *args)
    d_out, d_final = cotangents
    grads = vjp((jnp.asarray(d_out, o.dtype), jnp.asarray(d_final, jnp.float32)))
    return (o, final), grads


def reference_vjp(inputs, cotangents, *, with_initial_state):
    q, k, v, log_decay, initial_state = inputs
    if not with_initial_state:
        initial_state = np.zeros_like(initial_state)
    with jax.enable_x64(True):
        outputs, vjp = jax.vjp(jax.jit(reference_gla), *(jnp.asarray(x, jnp.float64) for x in
                                                (q, k, v, log_decay, initial_state)))
        grads = vjp(tuple(jnp.asarray(c, jnp.float64) for c in cotangents))
        outputs, grads = jax.tree.map(np.asarray, (outputs, grads))
    return outputs, grads if with_initial_state else grads[:4]


NAMES = ("o", "final state", "dq", "dk", "dv", "d log_decay", "d initial_state")


def check_against_reference(seed, *, chunk_size, with_initial_state, **problem):
    inputs, cotangents = random_problem(seed, **problem)
    (o, final), grads = kernel_vjp(inputs, cotangents, chunk_size=chunk_size, with_initial_state=with_initial_state)
    (want_o, want_final), want_grads = reference_vjp(inputs, cotangents, with_initial_state=with_initial_state)
    got = [o, final, *grads]
    want = [want_o, want_final, *want_grads]
    for name, x in zip(NAMES, got):
        assert x.dtype == jnp.float32, name
        assert np.all(np.isfinite(np.asarray(x))), f"{name}: not finite (an unwritten poisoned entry?)"
    errors = {name: rel_rms(x, w) for name, x, w in zip(NAMES, got, want)}
    assert max(errors.values()) < FP32_TOLERANCE, errors
    return errors


@pytest.mark.parametrize("min_state_programs", [gla_chunk.MIN_STATE_PROGRAMS,
                                                pytest.param(1, marks=pytest.mark.slow)])
def test_per_dim_gate_fp32_matches_float64_recurrence(monkeypatch, min_state_programs):
    """The default-run case: per-dimension gate, odd T (3 chunks of 16, the last one padded), d_k != d_v, an
    initial state. The sequential kernels' tiles: narrowed to 16 x 16 for this small batch by default, or as
    wide as the other kernels' (min_state_programs 1)."""
    monkeypatch.setattr(gla_chunk, "MIN_STATE_PROGRAMS", min_state_programs)
    check_against_reference(0, chunk_size=16, with_initial_state=True)


def test_shared_qk_heads_match_float64_recurrence():
    """Mamba-2's layout: one q and k (C and B) for every head of v, read without a copy per head; their gradients
    are the sums over the heads. Scalar gate, 3 heads, 2 batch rows (so the head -> row map is exercised)."""
    check_against_reference(5, chunk_size=16, with_initial_state=True, batch=2, heads=3, per_dim=False,
                            shared_qk=True)


def test_sub_chunk_programs_match_float64_recurrence(monkeypatch):
    """The output, dv and dq/dk/dA kernels with one program per 16-row sub-chunk (SUB_CHUNK_PROGRAMS): four
    sub-chunks per chunk (the first, middle ones and the last, which adds the end state's term to dA), odd T, strong
    decays, d_k > d_v, and 16-wide blocks: two d_k blocks and two d_v blocks. (By default d_k 32 takes the
    per-chunk programs: SUB_CHUNK_MIN_DK is lowered to reach the sub-chunk ones at a size interpret mode runs fast.)"""
    monkeypatch.setattr(gla_chunk, "SUB_CHUNK_PROGRAMS", frozenset({"gla_chunk_outputs", "gla_chunk_dv",
                                                                    "gla_chunk_dqk"}))
    monkeypatch.setattr(gla_chunk, "SUB_CHUNK_MIN_DK", 16)
    monkeypatch.setattr(gla_chunk, "MAX_BLOCK", 16)
    check_against_reference(17, chunk_size=64, with_initial_state=True, seq_len=90, decay_scale=3.0, d_k=32,
                            d_v=24)
    monkeypatch.setattr(gla_chunk, "SUB_CHUNK_PROGRAMS", frozenset({"gla_chunk_dq"}))
    with pytest.raises(ValueError, match="SUB_CHUNK_PROGRAMS: unknown kernel 'gla_chunk_dq'"):
        check_against_reference(17, chunk_size=64, with_initial_state=True)


def test_sub_chunk_programs_from_d_k_64_with_per_dimension_gates_only():
    """The default choice of programs per chunk: the sub-chunk form for the named kernels at d_k >= 64 with a
    per-key-dimension gate, one program per chunk below it or with a scalar gate."""
    def split(d_k, per_dim, name="gla_chunk_dqk", chunk=64):
        q = jnp.zeros((1, 80, 2, d_k), jnp.bfloat16)
        v = jnp.zeros((1, 80, 2, 32), jnp.bfloat16)
        lay = gla_chunk._layout(q, q, v, jnp.zeros((1, 80, 2, d_k if per_dim else 1)), chunk)
        return gla_chunk._sub_chunk_split(lay, name)

    assert gla_chunk.SUB_CHUNK_PROGRAMS == {"gla_chunk_outputs", "gla_chunk_dv", "gla_chunk_dqk"}
    assert [split(d, True) for d in (32, 48, 64, 128)] == [1, 1, 4, 4]
    assert split(64, True, chunk=32) == 2 and split(64, False) == 1
    assert split(64, True, name="gla_chunk_states") == 1


@pytest.mark.slow
def test_scalar_gate_sub_chunk_form_matches_float64_recurrence(monkeypatch):
    """A scalar gate through the 16-row sub-chunk kernels (SCALAR_GATE_FULL_WIDTH off; by default it takes the
    whole-chunk ones): two sub-chunks per chunk, strong decays, d_k > d_v."""
    monkeypatch.setattr(gla_chunk, "SCALAR_GATE_FULL_WIDTH", False)
    check_against_reference(11, chunk_size=32, with_initial_state=True, seq_len=50, per_dim=False, decay_scale=4.0,
                            d_k=40, d_v=24)


@pytest.mark.slow
def test_32_row_sub_chunks_match_float64_recurrence(monkeypatch):
    """SUB = 32 (an A/B setting for GPU timing: fewer, larger products per chunk): per-dimension gate, chunk 64,
    strong decays, several d_v blocks."""
    monkeypatch.setattr(gla_chunk, "SUB", 32)
    check_against_reference(13, chunk_size=64, with_initial_state=True, seq_len=150, decay_scale=4.0, d_k=24,
                            d_v=72)


def test_sequential_kernels_narrow_their_tiles_for_few_sequences():
    assert gla_chunk.state_tiles(16, 32, 64) == (16, 16)  # the LM at 16384 x 2: 16 sequences, 16 x 2 x 4 programs
    assert gla_chunk.state_tiles(64, 32, 64) == (32, 16)  # 4096 x 8: 64 sequences x 4 d_v blocks = 256
    assert gla_chunk.state_tiles(256, 32, 64) == (32, 64)  # enough sequences: the full width
    assert gla_chunk.state_tiles(1, 128, 128) == (16, 16)
    assert gla_chunk.state_tiles(8, 128, 256) == (32, 32)  # 8 x 4 x 8 = 256


@pytest.mark.slow
@pytest.mark.parametrize("seq_len,chunk_size,per_dim,with_initial_state,decay_scale,d_k,d_v,batch", [
    (50, 16, False, False, 1.0, 24, 40, 1),  # scalar gate, no initial state
    (50, 32, True, False, 1.0, 24, 40, 2),  # two sub-chunks per chunk, batch 2
    (150, 64, True, True, 1.0, 24, 40, 1),  # four sub-chunks per chunk, 3 chunks
    (150, 64, False, True, 1.0, 40, 24, 1),  # scalar gate, d_k > d_v
    (37, 16, True, True, 4.0, 24, 40, 1),  # strong decays: exp(A) underflows across a chunk
    (50, 32, False, True, 4.0, 24, 40, 1),
    (37, 16, True, True, 1.0, 80, 72, 1),  # several d_k and d_v blocks (128 padded, 64 per block)
    (37, 16, False, True, 1.0, 80, 72, 1),
])
def test_fp32_matches_float64_recurrence(seq_len, chunk_size, per_dim, with_initial_state, decay_scale, d_k, d_v,
                                         batch):
    check_against_reference(seq_len * 7 + chunk_size, chunk_size=chunk_size, with_initial_state=with_initial_state,
                            seq_len=seq_len, per_dim=per_dim, decay_scale=decay_scale, d_k=d_k, d_v=d_v,
                            batch=batch)


@pytest.mark.slow
@pytest.mark.parametrize("per_dim", [True, False])
def test_bf16_inputs_match_fp32_kernel(per_dim):
    """bf16 q, k, v (bf16 matrix-product operands, fp32 accumulation) against the fp32 kernel on the same
    bf16-rounded inputs, within BF16_TOLERANCE; o in bf16, the final state and the gate's gradient in fp32."""
    inputs, cotangents = random_problem(3, seq_len=50, per_dim=per_dim)
    q, k, v = (np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)) for x in inputs[:3])
    inputs = (q, k, v, *inputs[3:])
    d_out = np.asarray(jnp.asarray(cotangents[0], jnp.bfloat16).astype(jnp.float32))
    cotangents = (d_out, cotangents[1])
    options = dict(chunk_size=32, with_initial_state=True)
    (o, final), grads = kernel_vjp(inputs, cotangents, dtype=jnp.bfloat16, **options)
    (want_o, want_final), want_grads = kernel_vjp(inputs, cotangents, **options)
    assert o.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3 + [jnp.float32] * 2
    errors = {name: rel_rms(np.asarray(x, np.float32), w)
              for name, x, w in zip(NAMES, [o, final, *grads], [want_o, want_final, *want_grads])}
    assert max(errors.values()) < BF16_TOLERANCE, errors


def test_bf16_matrix_products_take_bf16_operands():
    """Every matrix product in the kernels (forward and backward) multiplies bf16 operands into fp32."""
    inputs, _ = random_problem(4, seq_len=20, d_k=16, d_v=16)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in inputs[:3])
    log_decay, state = (jnp.asarray(x, jnp.float32) for x in inputs[3:])

    def loss(q, k, v, log_decay, state):
        o, final = chunk_gla(q, k, v, log_decay, state, chunk_size=16, interpret=True)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

    dots = matmul_dtypes(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), q, k, v, log_decay, state)
    assert len(dots) >= 10  # 2 + 2 forward (states twice: the backward recomputes them), 1 + 2 + 3 backward
    assert set(dots) == {(("bfloat16", "bfloat16"), "float32")}, set(dots)


def test_arguments_are_checked():
    q = jnp.zeros((1, 5, 2, 8))
    v = jnp.zeros((1, 5, 2, 4))
    a = -jnp.ones((1, 5, 2, 1))
    with pytest.raises(ValueError, match="^q:"):
        chunk_gla(q[0], q[0], v[0], a[0])
    with pytest.raises(ValueError, match="^k:"):
        chunk_gla(q, q[..., :4], v, a)
    with pytest.raises(ValueError, match="^v:"):
        chunk_gla(q, q, v[:, :4], a)
    with pytest.raises(ValueError, match="^log_decay:.*shape"):
        chunk_gla(q, q, v, -jnp.ones((1, 5, 2, 4)))
    with pytest.raises(ValueError, match="^log_decay: must be <= 0"):
        chunk_gla(q, q, v, a.at[0, 3, 1, 0].set(0.5))
    with pytest.raises(ValueError, match="^initial_state:"):
        chunk_gla(q, q, v, a, jnp.zeros((1, 2, 4, 8)))
    with pytest.raises(ValueError, match="^chunk_size:"):
        chunk_gla(q, q, v, a, chunk_size=24)
    with pytest.raises(ValueError, match="^q: expected float32 or bfloat16"):
        chunk_gla(q.astype(jnp.float16), q, v, a)


@pytest.mark.parametrize("per_dim,shared_qk,sub_chunk_programs", [(True, False, False), (False, False, False),
                                                            (False, True, False), (True, False, True)])
def test_gradient_lowers_for_cuda_through_triton(monkeypatch, per_dim, shared_qk, sub_chunk_programs):
    """The forward and backward kernels lower to Triton custom calls for CUDA (jax.export; no GPU needed). This
    checks the Pallas-to-Triton lowering only, not Triton's compilation to PTX."""
    from jax import export
    if sub_chunk_programs:
        monkeypatch.setattr(gla_chunk, "SUB_CHUNK_PROGRAMS", frozenset({"gla_chunk_outputs", "gla_chunk_dv",
                                                                        "gla_chunk_dqk"}))

    def loss(q, k, v, log_decay, state):
        o, final = chunk_gla(q, k, v, log_decay, state, chunk_size=64)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(final**2)  # (squares: the gradient needs o)

    b, t, h, d_k, d_v = 2, 100, 2, 80, 40
    shapes = [jax.ShapeDtypeStruct((b, t, 1 if shared_qk else h, d_k), jnp.bfloat16)] * 2 + [
        jax.ShapeDtypeStruct((b, t, h, d_v), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, t, h, d_k if per_dim else 1), jnp.float32),
        jax.ShapeDtypeStruct((b, h, d_k, d_v), jnp.float32)]
    exported = export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*shapes)
    module = exported.mlir_module()
    # states and outputs forward; states again, state gradients, dv and dq/dk/dA backward
    assert module.count("__gpu$xla.gpu.triton") == 6
    for name in ("gla_chunk_states", "gla_chunk_outputs", "gla_chunk_state_grads", "gla_chunk_dv", "gla_chunk_dqk"):
        assert name in module, name
