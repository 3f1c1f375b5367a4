"""Log-linear attention: the Fenwick partition, and dense == recurrent == chunked for outputs, states, gradients."""

import contextlib
import functools
import io

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import matmul_dtypes, rel_rms
from ramjax.ops.gated_delta import gated_delta_rule
from ramjax.ops.loglinear import (
    FenwickState,
    level_index,
    loglinear_attention,
    loglinear_gated_delta,
    loglinear_gated_delta_step,
    loglinear_init,
    loglinear_step,
    num_levels,
)

BASES = ["mamba2", "gated_delta"]


def test_level_index_equals_bucket_definition():
    """Brute force over all s <= t < 2048: the level is the bucket [(t >> l) << l, + 2^(l-1)) holding s."""
    n = 2048
    t, s = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    levels = np.asarray(level_index(jnp.asarray(t, jnp.int32), jnp.asarray(s, jnp.int32)))
    past = s <= t
    for level in range(num_levels(n)):
        if level == 0:
            in_bucket = s == t
        else:
            start = (t >> level) << level
            in_bucket = (s >= start) & (s < start + 2 ** (level - 1)) & (((t >> (level - 1)) & 1) == 1)
        np.testing.assert_array_equal((levels == level) & past, in_bucket & past, err_msg=f"level {level}")
    # Every past position lands in exactly one bucket, and buckets have 2^(l-1) keys (1 at level 0).
    assert levels[past].max() < num_levels(n)
    for tt in (0, 1, 6, 7, 100, 1023, 1024, 2047):
        counts = np.bincount(levels[tt, : tt + 1], minlength=num_levels(n))
        for level, count in enumerate(counts):
            present = level == 0 or (tt >> (level - 1)) & 1
            assert count == ((1 if level == 0 else 2 ** (level - 1)) if present else 0), (tt, level)
        assert np.count_nonzero(counts) == bin(tt).count("1") + 1


def test_num_levels():
    assert [num_levels(t) for t in (1, 2, 3, 4, 5, 8, 9, 16384, 16385)] == [1, 2, 3, 3, 4, 4, 5, 15, 16]
    with pytest.raises(ValueError, match="seq_len"):
        num_levels(0)


def random_inputs(seed, batch, seq_len, heads, d_k, d_v, extra_levels=1, decay=0.3, base="mamba2"):
    """Random (q, k, v, g, level_weights), with beta after g for the gated-delta base (unit-norm keys)."""
    rng = np.random.default_rng(seed)
    num_level = num_levels(seq_len) + extra_levels

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    q, k = normal(batch, seq_len, heads, d_k), normal(batch, seq_len, heads, d_k)
    v = normal(batch, seq_len, heads, d_v)
    g = -jnp.asarray(rng.uniform(0, decay, size=(batch, seq_len, heads)), jnp.float32)
    level_weights = jnp.asarray(rng.uniform(0.2, 2.0, size=(batch, seq_len, heads, num_level)), jnp.float32)
    if base == "mamba2":
        return q, k, v, g, level_weights
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    beta = jnp.asarray(rng.uniform(0.0, 1.0, size=(batch, seq_len, heads)), jnp.float32)
    return q, k, v, g, beta, level_weights


OPS = {"mamba2": loglinear_attention, "gated_delta": loglinear_gated_delta}
STEPS = {"mamba2": loglinear_step, "gated_delta": loglinear_gated_delta_step}


@functools.partial(jax.jit, static_argnames=("base", "impl", "chunk_size"))
def outputs_state_grads(inputs, cotangent, state_cotangent, *, base, impl, chunk_size=64):
    def run(*inputs):
        o, state = OPS[base](*inputs, impl=impl, chunk_size=chunk_size, return_final_state=True)
        return o, state.levels

    @jax.jit  # one compile: op by op, the forms' many small ops make these tests several times slower
    def outputs_and_pullback(inputs, cotangent, state_cotangent):
        (o, levels), pullback = jax.vjp(run, *inputs)
        return o, levels, pullback((cotangent, state_cotangent))

    return outputs_and_pullback(inputs, cotangent, state_cotangent)


# 1, 2, 63 and 100 tokens run by default (100: partial chunks of 16 and 64, and several Fenwick levels above a chunk
# of 16); 1000 (ten levels, ~6-13 s on 2 cores) is slow.
@pytest.mark.parametrize("seq_len,base", [(n, b) for n in (1, 2, 63, 100) for b in BASES] + [
    pytest.param(1000, b, marks=pytest.mark.slow) for b in BASES])
def test_dense_recurrent_chunked_agree(seq_len, base):
    batch, heads, d_k, d_v = 2, 2, 5, 7
    inputs = random_inputs(seq_len, batch, seq_len, heads, d_k, d_v, base=base)
    rng = np.random.default_rng(seq_len + 7)
    cotangent = jnp.asarray(rng.normal(size=(batch, seq_len, heads, d_v)), jnp.float32)
    state_cotangent = jnp.asarray(rng.normal(size=(batch, heads, inputs[-1].shape[-1], d_k, d_v)), jnp.float32)
    want_o, want_levels, want_grads = outputs_state_grads(inputs, cotangent, state_cotangent, base=base, impl="dense")
    names = ("q", "k", "v", "g", "level_weights") if base == "mamba2" else ("q", "k", "v", "g", "beta", "level_weights")
    for impl, chunk_size in (("recurrent", 64), ("chunked", 16), ("chunked", 64)):
        o, levels, grads = outputs_state_grads(
            inputs, cotangent, state_cotangent, base=base, impl=impl, chunk_size=chunk_size
        )
        assert rel_rms(o, want_o) < 1e-5, (impl, chunk_size)
        assert rel_rms(levels, want_levels) < 1e-5, (impl, chunk_size)
        for name, got, want in zip(names, grads, want_grads):
            assert rel_rms(got, want) < 1e-5, (impl, chunk_size, name)


def test_dense_equals_float64_loop():
    """The reference itself, against the definition evaluated pair by pair in float64."""
    q, k, v, g, lam = (np.asarray(a, np.float64) for a in random_inputs(3, 1, 37, 2, 4, 3))
    big_g = np.cumsum(g, axis=1)
    want = np.zeros_like(v)
    for t in range(37):
        for s in range(t + 1):
            level = 0 if s == t else (t ^ s).bit_length()
            w = lam[:, t, :, level] * np.exp(big_g[:, t] - big_g[:, s]) * np.sum(q[:, t] * k[:, s], -1)
            want[:, t] += w[..., None] * v[:, s]
    got = loglinear_attention(*random_inputs(3, 1, 37, 2, 4, 3), impl="dense")
    assert rel_rms(got, want) < 1e-6


def _plain_ssd(q, k, v, g):
    """Mamba-2 SSD / gated linear attention with a scalar decay, written independently: a scan over time."""

    def step(state, inputs):
        q_t, k_t, v_t, g_t = inputs
        state = jnp.exp(g_t)[..., None, None] * state + jnp.einsum("bhk,bhv->bhkv", k_t, v_t)
        return state, jnp.einsum("bhk,bhkv->bhv", q_t, state)

    batch, _, heads, d_k = q.shape
    init = jnp.zeros((batch, heads, d_k, v.shape[-1]))
    _, o = jax.lax.scan(step, init, [jnp.moveaxis(a, 1, 0) for a in (q, k, v, g)])
    return jnp.moveaxis(o, 0, 1)


# Dense against the independent scan by default; recurrent and chunked (~11-14 s on 2 cores) equal dense in
# test_dense_recurrent_chunked_agree, so their cases here are slow.
ALL_ONES_IMPLS = ["dense", pytest.param("recurrent", marks=pytest.mark.slow),
                  pytest.param("chunked", marks=pytest.mark.slow)]


@pytest.mark.parametrize("impl", ALL_ONES_IMPLS)
def test_all_ones_weights_is_plain_gated_linear_attention(impl):
    q, k, v, g, level_weights = random_inputs(5, 2, 150, 3, 6, 4)
    o = jax.jit(functools.partial(loglinear_attention, impl=impl, chunk_size=16))(q, k, v, g,
                                                                                  jnp.ones_like(level_weights))
    assert rel_rms(o, _plain_ssd(q, k, v, g)) < 1e-5


def _plain_gated_deltanet(q, k, v, g, beta):
    """Gated DeltaNet written independently: S <- alpha (I - beta k k^T) S + beta k v^T, o = S^T q."""

    def step(state, inputs):
        q_t, k_t, v_t, g_t, b_t = inputs
        eye = jnp.eye(k_t.shape[-1])
        transition = jnp.exp(g_t)[..., None, None] * (eye - b_t[..., None, None] * k_t[..., :, None] * k_t[..., None, :])
        state = transition @ state + b_t[..., None, None] * k_t[..., :, None] * v_t[..., None, :]
        return state, jnp.einsum("bhk,bhkv->bhv", q_t, state)

    batch, _, heads, d_k = q.shape
    init = jnp.zeros((batch, heads, d_k, v.shape[-1]))
    _, o = jax.lax.scan(step, init, [jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, beta)])
    return jnp.moveaxis(o, 0, 1)


@pytest.mark.parametrize("impl", ALL_ONES_IMPLS)
def test_all_ones_weights_is_plain_gated_deltanet(impl):
    q, k, v, g, beta, level_weights = random_inputs(6, 2, 150, 3, 6, 4, base="gated_delta")
    o = jax.jit(functools.partial(loglinear_gated_delta, impl=impl, chunk_size=16))(q, k, v, g, beta,
                                                                                    jnp.ones_like(level_weights))
    assert rel_rms(o, _plain_gated_deltanet(q, k, v, g, beta)) < 1e-5


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("prefill_impl", ["dense", "chunked"])
def test_prefill_then_steps_equals_one_pass(prefill_impl, base):
    inputs = random_inputs(9, 2, 90, 2, 5, 3, base=base)
    want = jax.jit(functools.partial(OPS[base], impl="dense"))(*inputs)
    cut = 37
    prefill = jax.jit(functools.partial(OPS[base], impl=prefill_impl, chunk_size=16, return_final_state=True))
    o_prefill, state = prefill(*(a[:, :cut] for a in inputs))
    assert int(state.position) == cut
    step = jax.jit(STEPS[base])
    outputs = [o_prefill]
    for t in range(cut, 90):
        o_t, state = step(state, *(a[:, t] for a in inputs))
        outputs.append(o_t[:, None])
    assert rel_rms(jnp.concatenate(outputs, axis=1), want) < 1e-5
    assert int(state.position) == 90


# A cut at 16 (a chunk boundary) and at 37 (inside a chunk of 16), each continued by every form. Jitted, the twelve
# cases take ~12 s on 2 cores (op by op, two of them took 37 s).
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("impl", ["dense", "recurrent", "chunked"])
@pytest.mark.parametrize("cut", [16, 37])
def test_continuing_from_a_state_equals_one_pass(impl, cut, base):
    inputs = random_inputs(10, 1, 100, 2, 4, 6, base=base)
    op = functools.partial(OPS[base], chunk_size=16, return_final_state=True)
    want_o, want_state = jax.jit(functools.partial(op, impl="dense"))(*inputs)
    first = [a[:, :cut] for a in inputs]
    rest = [a[:, cut:] for a in inputs]
    o1, state = jax.jit(functools.partial(op, impl="chunked"))(*first)

    # The state's position as a Python int under jit: the chunked form needs it known at trace time.
    @jax.jit
    def continue_from(levels, *rest):
        return op(*rest, impl=impl, initial_state=FenwickState(levels, cut))

    o2, final = continue_from(state.levels, *rest)
    assert rel_rms(jnp.concatenate([o1, o2], axis=1), want_o) < 1e-5
    assert rel_rms(final.levels, want_state.levels) < 1e-5
    assert int(final.position) == 100


def test_init_and_dtypes():
    state = loglinear_init(2, 3, 5, 4, 6)
    assert state.levels.shape == (2, 3, 5, 4, 6) and int(state.position) == 0
    q, k, v, g, level_weights = random_inputs(11, 1, 40, 2, 8, 8)
    want = loglinear_attention(q, k, v, g, level_weights, impl="dense")
    got = loglinear_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), g, level_weights, impl="chunked")
    assert got.dtype == jnp.bfloat16 and rel_rms(got, want) < 2e-2


@pytest.mark.parametrize("base", ["mamba2", "gated_delta"])
def test_bf16_chunked_runs_on_a_cpu_past_one_level(base):
    """bf16 inputs at 300 tokens in chunks of 64 (levels above the chunk read): XLA:CPU rejected the level read's
    BF16 x BF16 = F32 product from 256 tokens on, so the GPU configs failed on a CPU; numerics.matmul now widens
    16-bit operands there. Within bf16 tolerance of float32."""
    inputs = random_inputs(14, 2, 300, 2, 32, 32, base=base)
    q, k, v, rest = *inputs[:3], inputs[3:]
    op = loglinear_attention if base == "mamba2" else loglinear_gated_delta
    run = jax.jit(lambda q, k, v: op(q, k, v, *rest, impl="chunked", chunk_size=64))
    got = run(*(a.astype(jnp.bfloat16) for a in (q, k, v)))
    assert got.dtype == jnp.bfloat16 and rel_rms(got, run(q, k, v)) < 2e-2


def test_chunked_multiplies_bf16_operands_with_float32_accumulation():
    q, k, v, g, level_weights = random_inputs(12, 1, 40, 2, 8, 8)
    low = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    dots = matmul_dtypes(lambda q, k, v: loglinear_attention(q, k, v, g, level_weights, impl="chunked",
                                                             chunk_size=8), *low)
    bf16 = [d for d in dots if d[0] == ("bfloat16", "bfloat16")]
    # q k^T, scores x v, each chunk's k^T v, and one read of the level states per level above the chunk
    assert len(bf16) >= 4 and all(out == "float32" for _, out in bf16)


@pytest.mark.parametrize("op", ["gated_delta_rule", "loglinear_gated_delta"])
def test_delta_chunked_multiplies_bf16_operands_except_the_inverse(op):
    """bf16 q, k, v: the chunk pieces' products take bf16 operands (float32 out); the inverse
    (I + diag(beta) L)^-1 is built from float32 products only."""
    q, k, v, g, beta, level_weights = random_inputs(13, 1, 40, 2, 8, 8, base="gated_delta")
    low = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    if op == "gated_delta_rule":
        run = lambda q, k, v: gated_delta_rule(q, k, v, g, beta, impl="chunked", chunk_size=8)  # noqa: E731
    else:
        run = lambda q, k, v: loglinear_gated_delta(q, k, v, g, beta, level_weights, impl="chunked",  # noqa: E731
                                                    chunk_size=8)
    dots = matmul_dtypes(run, *low)
    bf16 = [d for d in dots if d[0] == ("bfloat16", "bfloat16")]
    f32 = [d for d in dots if d[0] == ("float32", "float32")]
    # k k^T, T Gamma K, T V, q k^T, its product with T and with W, scores x V, ...; the inverse's 2 log2(C) products
    assert len(bf16) >= 6 and all(out == "float32" for _, out in bf16)
    assert len(f32) >= 2 * 3


def _args(seq_len=8, num_level=None):
    q, k, v, g, level_weights = random_inputs(0, 1, seq_len, 2, 4, 3)
    if num_level is not None:
        level_weights = level_weights[..., :num_level]
    return dict(q=q, k=k, v=v, g=g, level_weights=level_weights)


@pytest.mark.parametrize(
    "change,kwargs,needle",
    [
        (dict(k=jnp.zeros((1, 8, 2, 5))), {}, "k: expected shape"),
        (dict(v=jnp.zeros((1, 7, 2, 3))), {}, "v: expected shape"),
        (dict(g=jnp.zeros((1, 8, 3))), {}, "g: expected shape"),
        (dict(g=jnp.full((1, 8, 2), 0.1)), {}, "g: log decays must be <= 0"),
        (dict(level_weights=jnp.ones((1, 8, 2, 3))), {}, r"level_weights: L = 3 levels, but .* need num_levels\(8\) = 4"),
        (dict(q=jnp.zeros((1, 8, 2, 4), jnp.int32)), {}, "q: expected a floating dtype"),
        ({}, dict(impl="fast"), "impl: must be one of"),
        ({}, dict(chunk_size=48), "chunk_size: must be a power of two"),
    ],
)
def test_rejects_bad_arguments(change, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        loglinear_attention(**{**_args(), **change}, **kwargs)


def test_gated_delta_rejects_bad_beta():
    q, k, v, g, beta, level_weights = random_inputs(0, 1, 8, 2, 4, 3, base="gated_delta")
    with pytest.raises(ValueError, match="beta: expected shape"):
        loglinear_gated_delta(q, k, v, g, beta[..., :1], level_weights)
    with pytest.raises(ValueError, match="g: log decays must be <= 0"):
        loglinear_gated_delta(q, k, v, -g, beta, level_weights)


def test_rejects_a_state_with_too_few_levels_for_what_follows():
    args = _args(seq_len=8)
    state = FenwickState(jnp.zeros((1, 2, 5, 4, 3)), jnp.int32(30))
    with pytest.raises(ValueError, match=r"num_levels\(38\) = 7"):
        loglinear_attention(**{**args, "level_weights": jnp.ones((1, 8, 2, 5))}, initial_state=state)


@pytest.mark.parametrize("base", ["mamba2", "gated_delta"])
def test_chunked_gradients_hold_under_strong_decays(base):
    """Log decays of -15 to -25 per token: the chunked path's gradient for g (tiny next to the others) must
    still match the float64 reference, which needs in-chunk decays summed directly, not differenced."""
    rng = np.random.default_rng(21)
    batch, seq_len, heads, d_k, d_v = 2, 67, 2, 5, 7  # 5 chunks of 16, the last one partial
    q, k, v = (rng.standard_normal((batch, seq_len, heads, d)) for d in (d_k, d_k, d_v))
    if base == "gated_delta":
        k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    g = -rng.uniform(15.0, 25.0, (batch, seq_len, heads))
    lw = rng.uniform(0.5, 1.5, (batch, seq_len, heads, num_levels(seq_len)))
    args = [q, k, v, g] + ([rng.uniform(0.1, 0.9, (batch, seq_len, heads))] if base == "gated_delta" else []) + [lw]
    op = loglinear_attention if base == "mamba2" else loglinear_gated_delta

    def grads(impl, dtype):
        def loss(*a):
            return jnp.sum(op(*a, impl=impl, chunk_size=16))

        return jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*(jnp.asarray(a, dtype) for a in args))

    with jax.enable_x64(True):
        want = [np.asarray(w) for w in grads("dense", jnp.float64)]
    for got, expected in zip(grads("chunked", jnp.float32), want):
        assert rel_rms(got, expected) < 1e-4


@pytest.mark.parametrize("base", BASES)
def test_recompute_changes_what_is_saved_not_the_gradients(base):
    """recompute=True (the default) reruns the chunked forward in the backward pass: a remat in the program, the
    same outputs and gradients as keeping the intermediates."""
    inputs = random_inputs(3, 2, 100, 2, 5, 7, base=base)

    def loss(recompute, *inputs):
        o = OPS[base](*inputs, impl="chunked", chunk_size=16, recompute=recompute)
        return jnp.sum(jnp.sin(o))

    grads = {r: jax.jit(jax.grad(functools.partial(loss, r), argnums=tuple(range(len(inputs)))))(*inputs)
             for r in (True, False)}
    for got, want in zip(grads[True], grads[False]):
        assert rel_rms(got, want) < 1e-6
    assert "remat" in str(jax.make_jaxpr(functools.partial(loss, True))(*inputs))
    assert "remat" not in str(jax.make_jaxpr(functools.partial(loss, False))(*inputs))


def test_level_checkpoint_changes_nothing_but_what_is_saved(monkeypatch):
    """gated_delta.LEVEL_CHECKPOINT (each level above the chunk rematerialised on its own, under recompute): the same
    outputs and gradients, at a length with several levels above chunks of 16, starting mid-grid from a state."""
    from ramjax.ops.loglinear import gated_delta as module

    inputs = random_inputs(16, 2, 150, 2, 5, 7, base="gated_delta")
    state = loglinear_init(2, 2, inputs[-1].shape[-1], 5, 7)._replace(position=jnp.int32(37))

    def loss(flag, *inputs):  # (flag only makes each setting its own function: JAX caches traces per function)
        o, final = loglinear_gated_delta(*inputs, impl="chunked", chunk_size=16, initial_state=state,
                                         return_final_state=True)
        return jnp.sum(jnp.sin(o)) + jnp.sum(jnp.cos(final.levels))

    results = {}
    for flag in (False, True):
        monkeypatch.setattr(module, "LEVEL_CHECKPOINT", flag)
        loss_now = functools.partial(loss, flag)
        run = jax.jit(jax.value_and_grad(loss_now, argnums=tuple(range(len(inputs)))))
        results[flag] = run(*inputs)
        remats = str(jax.make_jaxpr(loss_now)(*inputs)).count("remat")
        assert remats >= 3 if flag else remats == 1, (flag, remats)
    assert abs(float(results[True][0]) - float(results[False][0])) < 1e-5 * abs(float(results[False][0]))
    for got, want in zip(results[True][1], results[False][1], strict=True):
        assert rel_rms(got, want) < 1e-6


@pytest.mark.parametrize("impl", ["dense", "recurrent", "chunked", "pallas"])
def test_one_shared_qk_head_equals_per_head_copies(impl):
    """The Mamba-2 base with one q and k head for all heads (C and B) gives the outputs, final state and gradients
    of the same q and k copied per head (the shared head's gradient: the sum of the copies')."""
    batch, seq_len, heads, d_k, d_v = 2, 37, 3, 5, 7
    q, k, v, g, level_weights = random_inputs(7, batch, seq_len, heads, d_k, d_v)
    q, k = q[:, :, :1], k[:, :, :1]
    rng = np.random.default_rng(8)
    cotangent = jnp.asarray(rng.normal(size=v.shape), jnp.float32)

    def run(q, k, v, g, level_weights, copies):
        if copies:
            q, k = (jnp.broadcast_to(a, (batch, seq_len, heads, d_k)) for a in (q, k))
        o, state = loglinear_attention(q, k, v, g, level_weights, impl=impl, chunk_size=16, return_final_state=True)
        return jnp.sum(o * cotangent) + jnp.sum(jnp.sin(state.levels)), (o, state.levels)

    # (Compared as relative RMS errors: the Pallas kernels read the one head without copies, so the two runs round
    # differently, and the scalar loss sums terms of either sign.)
    got, want = (jax.jit(jax.value_and_grad(functools.partial(run, copies=c), argnums=(0, 1, 2, 3, 4),
                                            has_aux=True))(q, k, v, g, level_weights) for c in (False, True))
    for name, a, b in zip(("o", "final state"), got[0][1], want[0][1]):
        assert rel_rms(a, b) < 1e-6, name
    for name, a, b in zip("q k v g level_weights".split(), got[1], want[1]):
        assert a.shape == b.shape and rel_rms(a, b) < 1e-5, name


def test_one_shared_qk_head_is_what_the_backward_pass_keeps():
    """With recompute, the chunked form keeps the one q / k head for its backward pass, not the per-head copies."""
    batch, seq_len, heads, d_k, d_v = 1, 64, 4, 5, 6  # d_k unlike d_v and the 8 levels: no other array has that shape
    q, k, v, g, level_weights = random_inputs(9, batch, seq_len, heads, d_k, d_v)
    q, k = q[:, :, :1], k[:, :, :1]

    def loss(q, k):
        return jnp.sum(loglinear_attention(q, k, v, g, level_weights, impl="chunked", chunk_size=64))

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        jax.ad_checkpoint.print_saved_residuals(loss, q, k)
    saved = printed.getvalue()
    assert f"[{batch},{seq_len},1,{d_k}]" in saved, saved  # the one head is kept
    assert f"[{batch},{seq_len},{heads},{d_k}]" not in saved, saved  # its copies are not


@pytest.mark.parametrize("base", ["mamba2", "gated_delta"])
def test_bf16_inputs_are_kept_in_bf16_for_the_backward_pass(base):
    """With recompute, the chunked forms keep 16-bit q, k, v as residuals, not float32 copies (the log-linear Gated
    DeltaNet widened them before its checkpoint: 2 d_k + d_v float32 values per token and head, per layer)."""
    batch, seq_len, heads, d_k, d_v = 1, 64, 2, 5, 7  # no other array has these last two dimensions
    inputs = random_inputs(15, batch, seq_len, heads, d_k, d_v, base=base)
    q, k, v = (a.astype(jnp.bfloat16) for a in inputs[:3])

    def loss(q, k, v):
        return jnp.sum(OPS[base](q, k, v, *inputs[3:], impl="chunked", chunk_size=16).astype(jnp.float32))

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        jax.ad_checkpoint.print_saved_residuals(loss, q, k, v)
    saved = printed.getvalue()
    for width in (d_k, d_v):
        assert f"bf16[{batch},{seq_len},{heads},{width}]" in saved, saved
        assert f"f32[{batch},{seq_len},{heads},{width}]" not in saved, saved
