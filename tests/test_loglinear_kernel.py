"""The in-chunk log-linear attention kernels (kernels.loglinear_chunk, interpret mode, NaN-poisoned outputs) against
a float64 evaluation of the formula: outputs and all five gradients; and `loglinear_attention(impl="pallas")`
against impl="chunked". Interpret mode is slow to compile, so a few cases run by default and the rest with
-m slow."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.loglinear_chunk import loglinear_intra_chunk
from numerics import rel_rms
from ramjax.ops.loglinear import FenwickState, level_index, loglinear_attention, num_levels

FP32_TOLERANCE = 1e-4  # relative RMS error against the float64 reference
BF16_TOLERANCE = 2e-2  # relative RMS error of bf16 inputs against the fp32 kernel on the same (rounded) inputs
NAMES = ("o", "dq", "dk", "dv", "d g_cum", "d level_weights")


def reference_intra_chunk(q, k, v, g_cum, level_weights, chunk_size):
    """O[t] = sum over s <= t in t's chunk of lambda_t[lvl(t, s)] exp(Gc_t - Gc_s) (q_t . k_s) v_s, the diagonal's
    exp(0) a constant; dense [C, C] matrices per chunk (shapes as loglinear_intra_chunk's; a one-head q and k
    broadcast over v's heads)."""
    batch, seq_len, heads, _ = v.shape
    total = -(-seq_len // chunk_size) * chunk_size

    def chunks(x):  # [B, T, H, ...] -> [B, N, C, H, ...], zero-padded
        x = jnp.pad(x, [(0, 0), (0, total - seq_len)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(batch, total // chunk_size, chunk_size, *x.shape[2:])

    qc, kc, vc, gc, lc = map(chunks, (q, k, v, g_cum, level_weights))
    pos = jnp.arange(chunk_size)
    levels = np.asarray(level_index(pos[:, None], pos[None, :]))  # [C, C]
    strict, diagonal = np.tril(np.ones_like(levels, bool), -1), np.eye(chunk_size, dtype=bool)
    num_level = lc.shape[-1]
    index = np.broadcast_to(np.minimum(levels, num_level - 1)[:, None, :], lc.shape[2:4] + (chunk_size,))
    lam = jnp.take_along_axis(lc, jnp.asarray(index)[None, None], axis=-1)  # [B, N, C(t), H, C(s)]
    lam = jnp.where(((strict | diagonal) & (levels < num_level))[:, None, :], lam, 0.0)  # (levels past L weigh 0)
    exponent = jnp.where(strict[:, :, None], gc[:, :, :, None, :] - gc[:, :, None, :, :], -jnp.inf)  # [B,N,C,C,H]
    decay = jnp.where(diagonal[:, :, None], 1.0, jnp.exp(exponent))
    weights = lam * jnp.moveaxis(decay, 4, 3)  # [B, N, C(t), H, C(s)]
    scores = jnp.einsum("bnthk,bnshk->bnths", qc, kc)
    o = jnp.einsum("bnths,bnshv->bnthv", weights * scores, vc)
    return o.reshape(batch, total, heads, -1)[:, :seq_len]


def random_problem(seed, *, batch=1, seq_len=37, heads=2, d_k=24, d_v=40, chunk_size=16, extra_levels=2,
                   decay_scale=1.0, shared_qk=False):
    """float64 numpy inputs (q, k, v, g_cum, level_weights) and the cotangent of O. g_cum restarts at each chunk;
    level_weights has `extra_levels` columns past the chunk's levels; `shared_qk`: q and k have one head."""
    rng = np.random.default_rng(seed)
    qk_heads = 1 if shared_qk else heads
    q = rng.normal(size=(batch, seq_len, qk_heads, d_k))
    k = rng.normal(size=(batch, seq_len, qk_heads, d_k)) / np.sqrt(d_k)
    v = rng.normal(size=(batch, seq_len, heads, d_v))
    g = -np.logaddexp(0.0, rng.normal(size=(batch, seq_len, heads))) * decay_scale  # -softplus
    total = -(-seq_len // chunk_size) * chunk_size
    g = np.pad(g, ((0, 0), (0, total - seq_len), (0, 0))).reshape(batch, total // chunk_size, chunk_size, heads)
    g_cum = np.cumsum(g, axis=2).reshape(batch, total, heads)[:, :seq_len]
    levels = chunk_size.bit_length() + extra_levels
    level_weights = rng.uniform(0.2, 2.0, size=(batch, seq_len, heads, levels))
    d_out = rng.normal(size=(batch, seq_len, heads, d_v))
    return (q, k, v, g_cum, level_weights), d_out


def kernel_vjp(inputs, d_out, *, chunk_size, dtype=jnp.float32):
    """O and the five gradients of the kernel in interpret mode with poisoned outputs (q, k, v in dtype)."""
    run = functools.partial(loglinear_intra_chunk, chunk_size=chunk_size, interpret=True, poison_output=True)
    args = [jnp.asarray(x, dtype) for x in inputs[:3]] + [jnp.asarray(x, jnp.float32) for x in inputs[3:]]
    o, vjp = jax.vjp(jax.jit(run), *args)
    return o, vjp(jnp.asarray(d_out, o.dtype))


def reference_vjp(inputs, d_out, *, chunk_size):
    with jax.enable_x64(True):
        run = functools.partial(reference_intra_chunk, chunk_size=chunk_size)
        o, vjp = jax.vjp(run, *(jnp.asarray(x, jnp.float64) for x in inputs))
        grads = vjp(jnp.asarray(d_out, jnp.float64))
        return jax.tree.map(np.asarray, (o, grads))


def check_against_reference(seed, *, chunk_size, **problem):
    inputs, d_out = random_problem(seed, chunk_size=chunk_size, **problem)
    o, grads = kernel_vjp(inputs, d_out, chunk_size=chunk_size)
    want_o, want_grads = reference_vjp(inputs, d_out, chunk_size=chunk_size)
    got, want = [o, *grads], [want_o, *want_grads]
    for name, x in zip(NAMES, got):
        assert x.dtype == jnp.float32, name
        assert np.all(np.isfinite(np.asarray(x))), f"{name}: not finite (an unwritten poisoned entry?)"
    errors = {name: rel_rms(x, w) for name, x, w in zip(NAMES, got, want)}
    assert max(errors.values()) < FP32_TOLERANCE, errors
    # Levels past the chunk's get no gradient (the extra columns).
    np.testing.assert_array_equal(np.asarray(grads[4])[..., chunk_size.bit_length():], 0.0)
    return errors


def test_fp32_matches_float64_reference():
    """The default-run case: odd T (3 chunks of 16, the last one padded), d_k != d_v, two extra level columns."""
    check_against_reference(0, chunk_size=16)


def test_shared_qk_head_matches_float64_reference():
    """Mamba-2's layout: one q and k head (its C and B) that all 3 heads of v read, without a copy per head; their
    gradients are the sums over the heads. 2 batch rows, so the head -> row map is exercised."""
    check_against_reference(3, chunk_size=16, batch=2, heads=3, shared_qk=True)


@pytest.mark.slow
@pytest.mark.parametrize("seq_len,chunk_size,decay_scale,d_k,d_v,batch", [
    (150, 64, 1.0, 24, 40, 1),  # 3 chunks of 64, the last one padded
    (150, 64, 1.0, 40, 24, 2),  # d_k > d_v, batch 2
    (50, 32, 1.0, 24, 40, 1),
    (37, 16, 8.0, 24, 40, 1),  # strong decays: exp(Gc) underflows across a chunk
    (100, 64, 8.0, 24, 40, 1),
    (37, 16, 1.0, 80, 136, 1),  # several d_v blocks (256 padded, 64 per block), d_k 128 padded
])
def test_fp32_matches_float64_reference_more_shapes(seq_len, chunk_size, decay_scale, d_k, d_v, batch):
    check_against_reference(seq_len * 7 + chunk_size, chunk_size=chunk_size, seq_len=seq_len,
                            decay_scale=decay_scale, d_k=d_k, d_v=d_v, batch=batch)


@pytest.mark.slow
def test_fewer_level_columns_than_the_chunk_has_levels():
    """L = 3 < log2(64) + 1: the levels past L weigh 0 (the op never reads them: they pair tokens past T)."""
    inputs, d_out = random_problem(5, seq_len=4, chunk_size=64, extra_levels=-4)
    o, grads = kernel_vjp(inputs, d_out, chunk_size=64)
    want_o, want_grads = reference_vjp(inputs, d_out, chunk_size=64)  # (T = 4: levels up to 2 only)
    for name, x, w in zip(NAMES, [o, *grads], [want_o, *want_grads]):
        assert rel_rms(x, w) < FP32_TOLERANCE, name


@pytest.mark.slow
def test_bf16_inputs_match_fp32_kernel():
    """bf16 q, k, v (bf16 matrix-product operands, fp32 accumulation) against the fp32 kernel on the same
    bf16-rounded inputs, within BF16_TOLERANCE; o and dq, dk, dv in bf16, the other gradients in fp32."""
    inputs, d_out = random_problem(3, seq_len=50, chunk_size=32)
    inputs = tuple(np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)) for x in inputs[:3]) + inputs[3:]
    d_out = np.asarray(jnp.asarray(d_out, jnp.bfloat16).astype(jnp.float32))
    o, grads = kernel_vjp(inputs, d_out, chunk_size=32, dtype=jnp.bfloat16)
    want_o, want_grads = kernel_vjp(inputs, d_out, chunk_size=32)
    assert o.dtype == jnp.bfloat16
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3 + [jnp.float32] * 2
    errors = {name: rel_rms(np.asarray(x, np.float32), w)
              for name, x, w in zip(NAMES, [o, *grads], [want_o, *want_grads])}
    assert max(errors.values()) < BF16_TOLERANCE, errors


def test_arguments_are_checked():
    q = jnp.zeros((1, 5, 2, 8))
    v = jnp.zeros((1, 5, 2, 4))
    g = jnp.zeros((1, 5, 2))
    lam = jnp.ones((1, 5, 2, 5))
    with pytest.raises(ValueError, match="^q:"):
        loglinear_intra_chunk(q[0], q[0], v[0], g[0], lam[0])
    with pytest.raises(ValueError, match="^k:"):
        loglinear_intra_chunk(q, q[..., :4], v, g, lam)
    with pytest.raises(ValueError, match="^v:"):
        loglinear_intra_chunk(q, q, v[:, :4], g, lam)
    with pytest.raises(ValueError, match="^g_cum:"):
        loglinear_intra_chunk(q, q, v, g[..., None], lam)
    with pytest.raises(ValueError, match="^level_weights:"):
        loglinear_intra_chunk(q, q, v, g, lam[..., 0])
    for bad in (24, 8, 128):
        with pytest.raises(ValueError, match=f"^chunk_size: expected a power of 2 from 16 to 64, got {bad}"):
            loglinear_intra_chunk(q, q, v, g, lam, chunk_size=bad)
    with pytest.raises(ValueError, match="^q: expected float32 or bfloat16"):
        loglinear_intra_chunk(q.astype(jnp.float16), q, v, g, lam)


def test_gradient_lowers_for_cuda_through_triton():
    """The forward and backward kernels lower to Triton custom calls for CUDA (jax.export; no GPU needed). This
    checks the Pallas-to-Triton lowering only, not Triton's compilation to PTX."""
    from jax import export

    def loss(q, k, v, g_cum, level_weights):
        o = loglinear_intra_chunk(q, k, v, g_cum, level_weights, chunk_size=64)
        return jnp.sum(o.astype(jnp.float32) ** 2)  # (a square: the gradient needs o)

    b, t, h, d_k, d_v = 2, 100, 2, 80, 136
    for qk_heads in (h, 1):  # per head, and one q/k head for all (Mamba-2's C and B)
        shapes = [jax.ShapeDtypeStruct((b, t, qk_heads, d_k), jnp.bfloat16)] * 2 + [
            jax.ShapeDtypeStruct((b, t, h, d_v), jnp.bfloat16), jax.ShapeDtypeStruct((b, t, h), jnp.float32),
            jax.ShapeDtypeStruct((b, t, h, 12), jnp.float32)]
        exported = export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))), platforms=["cuda"],
                                 disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
                                     *shapes)
        module = exported.mlir_module()
        assert module.count("__gpu$xla.gpu.triton") == 2  # outputs forward, gradients backward
        for name in ("loglinear_chunk_outputs", "loglinear_chunk_grads"):
            assert name in module, name


# ---------------------------------------------------------------------------------------------------------------
# loglinear_attention(impl="pallas")


def op_problem(seed, batch=2, seq_len=45, heads=2, d_k=12, d_v=20, start=0, qk_heads=None):
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.normal(size=(batch, seq_len, qk_heads or heads, d_k)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(batch, seq_len, heads, d_v)), jnp.float32)
    g = -jnp.asarray(rng.uniform(0, 0.5, size=(batch, seq_len, heads)), jnp.float32)
    num_level = num_levels(start + seq_len) + 1
    level_weights = jnp.asarray(rng.uniform(0.2, 2.0, size=(batch, seq_len, heads, num_level)), jnp.float32)
    state = None
    if start:
        levels = jnp.asarray(rng.normal(size=(batch, heads, num_level, d_k, d_v)), jnp.float32)
        state = FenwickState(levels, jnp.int32(start))
    cotangents = (jnp.asarray(rng.normal(size=(batch, seq_len, heads, d_v)), jnp.float32),
                  jnp.asarray(rng.normal(size=(batch, heads, num_level, d_k, d_v)), jnp.float32))
    return (q, k, v, g, level_weights), state, cotangents


def op_vjp(inputs, state, cotangents, impl, chunk_size):
    def run(*inputs):
        o, final = loglinear_attention(*inputs, impl=impl, chunk_size=chunk_size, initial_state=state,
                                       return_final_state=True)
        return o, final.levels

    # (jit only without a state: under jit the op's state position would be traced, and the chunked forms need it
    # concrete, so the case with a state runs op by op: slower)
    outputs, vjp = jax.vjp(run if state is not None else jax.jit(run), *inputs)
    return outputs, vjp(cotangents)


@pytest.mark.parametrize("start,levels_kernel,qk_heads,seq_len", [
    (0, True, 1, 45), pytest.param(0, True, None, 101, marks=pytest.mark.slow),
    pytest.param(0, False, 1, 101, marks=pytest.mark.slow), pytest.param(21, True, 1, 101, marks=pytest.mark.slow),
    pytest.param(21, False, None, 101, marks=pytest.mark.slow)])
def test_op_pallas_equals_chunked(start, levels_kernel, qk_heads, seq_len, monkeypatch):
    """impl="pallas" against impl="chunked": o, the final state and the gradients of q, k, v, g and
    level_weights; start > 0 continues from an initial state (the chunks then start 21 mod 16 = 5 tokens early).
    fp32 reads the levels above the chunk in XLA by default; levels_kernel takes kernels.loglinear_levels for it.
    qk_heads 1: Mamba-2's one q and k head, which the kernels read without copies per head. 45 tokens: 3 chunks of
    16, two levels above the chunk; 101: 7 chunks, three."""
    from ramjax.ops.loglinear import attention

    monkeypatch.setattr(attention, "LEVELS_KERNEL_DTYPES", frozenset({"bfloat16", "float32"} if levels_kernel
                                                                      else {"bfloat16"}))
    inputs, state, cotangents = op_problem(7, seq_len=seq_len, heads=3, start=start, qk_heads=qk_heads)
    (o, final), grads = op_vjp(inputs, state, cotangents, "pallas", 16)
    (want_o, want_final), want_grads = op_vjp(inputs, state, cotangents, "chunked", 16)
    assert rel_rms(o, want_o) < 1e-5
    assert rel_rms(final, want_final) < 1e-6
    for name, got, want in zip(("q", "k", "v", "g", "level_weights"), grads, want_grads):
        assert got.dtype == want.dtype, name
        assert rel_rms(got, want) < 1e-5, name


@pytest.mark.slow
def test_op_pallas_bf16_matches_chunked_bf16():
    inputs, _, _ = op_problem(8, seq_len=40)
    q, k, v = (x.astype(jnp.bfloat16) for x in inputs[:3])
    o = loglinear_attention(q, k, v, *inputs[3:], impl="pallas", chunk_size=32)
    want = loglinear_attention(q, k, v, *inputs[3:], impl="chunked", chunk_size=32)
    assert o.dtype == jnp.bfloat16
    assert rel_rms(o, want) < BF16_TOLERANCE


def test_op_auto_does_not_pick_the_kernel():
    """Not yet timed on a GPU: impl="auto" stays on the XLA chunked form (the kernels' names do not appear)."""
    inputs, _, _ = op_problem(9, seq_len=40)
    for impl in ("auto", "pallas"):
        program = str(jax.make_jaxpr(functools.partial(loglinear_attention, impl=impl, chunk_size=16))(*inputs))
        assert ("loglinear_chunk_outputs" in program) == (impl == "pallas"), impl


def test_op_pallas_rejects_what_the_kernel_cannot_take():
    inputs, _, _ = op_problem(9, seq_len=8)
    with pytest.raises(ValueError, match="chunk_size: impl='pallas' needs a power of 2 from 16 to 64, got 128"):
        loglinear_attention(*inputs, impl="pallas", chunk_size=128)
    with pytest.raises(ValueError, match="chunk_size: impl='pallas' needs a power of 2 from 16 to 64, got 8"):
        loglinear_attention(*inputs, impl="pallas", chunk_size=8)
    with pytest.raises(ValueError, match="q: impl='pallas' takes float32 or bfloat16, got float16"):
        loglinear_attention(inputs[0].astype(jnp.float16), *inputs[1:], impl="pallas", chunk_size=16)
