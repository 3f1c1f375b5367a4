"""Plain gated recurrences: dense == recurrent == chunked (outputs, final states, gradients) against float64,
state hand-over, the step functions, strong decays, bf16, argument checks, and the log-linear ops at lambda = 1."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import matmul_dtypes, rel_rms

from ramjax.compile_options import fast_compile_options
from ramjax.ops import (
    gated_delta_rule,
    gated_delta_rule_step,
    gated_linear_attention,
    gated_linear_attention_step,
    loglinear_attention,
    loglinear_gated_delta,
    num_levels,
)

OPS = {"gla": gated_linear_attention, "delta": gated_delta_rule}
STEPS = {"gla": gated_linear_attention_step, "delta": gated_delta_rule_step}
# (op, gate shape): the scalar gate per head (Mamba-2 / SSD), the per-key-dimension gate (GLA), Gated DeltaNet.
CASES = [("gla", "scalar"), ("gla", "per_dim"), ("delta", "scalar")]
CASE_IDS = ["gla-scalar", "gla-per_dim", "delta"]
REFERENCE = {"gla": "dense", "delta": "recurrent"}


# Every test draws from these shapes, so the few executables it needs are compiled once for the whole file:
# with sizes this small, XLA's compile time, not the arithmetic, is what the tests cost.
BATCH, HEADS, D_K, D_V = 2, 3, 5, 7
CHUNK = {1: 16, 37: 16, 130: 32}  # sizes that do not divide the lengths: 1 -> 16, 37 = 2 * 16 + 5, 130 = 4 * 32 + 2


def random_inputs(seed, seq_len, *, op="gla", gate="scalar", decay=(0.0, 0.5)):
    """(inputs, initial_state): inputs (q, k, v, log_decay) and, for the delta rule, beta with unit-norm keys."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    q, k = normal(BATCH, seq_len, HEADS, D_K), normal(BATCH, seq_len, HEADS, D_K)
    v = normal(BATCH, seq_len, HEADS, D_V)
    gate_shape = (BATCH, seq_len, HEADS) + ((D_K,) if gate == "per_dim" else ())
    log_decay = -jnp.asarray(rng.uniform(*decay, size=gate_shape), jnp.float32)
    state = normal(BATCH, HEADS, D_K, D_V)
    if op == "gla":
        return (q, k, v, log_decay), state
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    beta = jnp.asarray(rng.uniform(0.0, 1.0, size=(BATCH, seq_len, HEADS)), jnp.float32)
    return (q, k, v, log_decay, beta), state


def names(op):
    return ("q", "k", "v", "log_decay") + (("beta",) if op == "delta" else ()) + ("initial_state",)


# And compiled like this, XLA CPU spends about a quarter of its default compile time on them.
quick_jit = functools.partial(jax.jit, compiler_options=fast_compile_options())


@functools.partial(quick_jit, static_argnames=("op", "impl", "chunk_size"))
def _outputs_state_grads(inputs, initial_state, cotangents, *, op, impl, chunk_size):
    def fn(*args):
        *inputs, state = args
        return OPS[op](*inputs, impl=impl, chunk_size=chunk_size, initial_state=state, return_final_state=True)

    out, pullback = jax.vjp(fn, *inputs, initial_state)
    return out, pullback(cotangents)


def run(inputs, initial_state, cotangents=None, *, op, impl, chunk_size=16):
    """((o, final_state), gradients of <cotangents, (o, final_state)> for inputs + (initial_state,))."""
    inputs = tuple(inputs)  # a list would be another pytree, so another compile
    if cotangents is None:
        q, v = inputs[0], inputs[2]
        state_dtype = jnp.result_type(jnp.float32, *(a.dtype for a in inputs))
        cotangents = (jnp.zeros_like(v), jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), state_dtype))
    return _outputs_state_grads(inputs, initial_state, cotangents, op=op, impl=impl, chunk_size=chunk_size)


def forward(inputs, initial_state, **kwargs):
    """(o, final_state) through the same executables as `run`."""
    return run(inputs, initial_state, **kwargs)[0]


@functools.partial(quick_jit, static_argnames=("op", "impl", "chunk_size"))
def forward_only(inputs, initial_state, *, op, impl, chunk_size=16):
    """(o, final_state) alone, for shapes or dtypes no other test uses: a forward pass compiles faster than a vjp."""
    return OPS[op](*inputs, impl=impl, chunk_size=chunk_size, initial_state=initial_state, return_final_state=True)


def float64(fn, *args, **kwargs):
    """fn on float64 copies of the array arguments, with 64-bit JAX switched on; returns NumPy arrays."""
    with jax.enable_x64(True):
        args = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), args)
        return jax.tree.map(np.asarray, fn(*args, **kwargs))


@pytest.mark.parametrize("op,gate", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("seq_len", [1, 37, 130])
def test_impls_agree_with_float64_reference(op, gate, seq_len):
    inputs, state = random_inputs(seq_len, seq_len, op=op, gate=gate)
    rng = np.random.default_rng(seq_len + 1)
    cotangents = (
        jnp.asarray(rng.normal(size=(BATCH, seq_len, HEADS, D_V)), jnp.float32),
        jnp.asarray(rng.normal(size=(BATCH, HEADS, D_K, D_V)), jnp.float32),
    )
    (want_o, want_state), want_grads = float64(run, inputs, state, cotangents, op=op, impl=REFERENCE[op])
    assert want_o.dtype == np.float64
    # (float32 dense, itself a reference, is checked against a NumPy loop and in the continuation test.)
    for impl in ("recurrent", "chunked"):
        (o, final), grads = run(inputs, state, cotangents, op=op, impl=impl, chunk_size=CHUNK[seq_len])
        assert o.dtype == jnp.float32 and final.dtype == jnp.float32
        assert final.shape == (BATCH, HEADS, D_K, D_V)
        assert rel_rms(o, want_o) < 1e-4, impl
        assert rel_rms(final, want_state) < 1e-4, impl
        for name, got, want in zip(names(op), grads, want_grads, strict=True):
            assert got.shape == want.shape, (impl, name)
            assert rel_rms(got, want) < 1e-4, (impl, name)


@pytest.mark.parametrize("gate", ["per_dim", pytest.param("scalar", marks=pytest.mark.slow)])
def test_pallas_gla_agrees_with_float64_reference(gate):
    """impl="pallas" (kernels.gla_chunk, interpret mode here): outputs, final state and all five gradients."""
    seq_len = 37
    inputs, state = random_inputs(7, seq_len, op="gla", gate=gate, decay=(0.0, 1.0))
    rng = np.random.default_rng(8)
    cotangents = (jnp.asarray(rng.normal(size=(BATCH, seq_len, HEADS, D_V)), jnp.float32),
                  jnp.asarray(rng.normal(size=(BATCH, HEADS, D_K, D_V)), jnp.float32))
    (want_o, want_state), want_grads = float64(run, inputs, state, cotangents, op="gla", impl="dense")
    (o, final), grads = run(inputs, state, cotangents, op="gla", impl="pallas", chunk_size=16)
    assert o.dtype == jnp.float32 and final.dtype == jnp.float32
    assert rel_rms(o, want_o) < 1e-4 and rel_rms(final, want_state) < 1e-4
    for name, got, want in zip(names("gla"), grads, want_grads, strict=True):
        assert rel_rms(got, want) < 1e-4, name


def test_pallas_delta_rule_agrees_with_float64_reference():
    """impl="pallas" (kernels.gated_delta_chunk, interpret mode here): outputs, final state, six gradients."""
    seq_len = 37
    inputs, state = random_inputs(9, seq_len, op="delta")
    rng = np.random.default_rng(10)
    cotangents = (jnp.asarray(rng.normal(size=(BATCH, seq_len, HEADS, D_V)), jnp.float32),
                  jnp.asarray(rng.normal(size=(BATCH, HEADS, D_K, D_V)), jnp.float32))
    (want_o, want_state), want_grads = float64(run, inputs, state, cotangents, op="delta", impl="recurrent")
    (o, final), grads = run(inputs, state, cotangents, op="delta", impl="pallas", chunk_size=16)
    assert rel_rms(o, want_o) < 1e-4 and rel_rms(final, want_state) < 1e-4
    for name, got, want in zip(names("delta"), grads, want_grads, strict=True):
        assert rel_rms(got, want) < 1e-4, name


def test_pallas_gla_refuses_what_its_kernel_cannot_take():
    inputs, _ = random_inputs(0, 5)
    with pytest.raises(ValueError, match="chunk_size: impl='pallas' needs a power of 2 >= 16, got 24"):
        gated_linear_attention(*inputs, impl="pallas", chunk_size=24)


@pytest.mark.parametrize("op,gate", CASES, ids=CASE_IDS)
def test_references_equal_float64_loop(op, gate):
    """The float64 references themselves (GLA dense, delta recurrent) against the recurrence in NumPy."""
    inputs, state = random_inputs(3, 37, op=op, gate=gate)
    q, k, v, a, *beta = (np.asarray(x, np.float64) for x in inputs)
    s = np.asarray(state, np.float64)
    want = np.zeros_like(v)
    for t in range(37):
        decay = np.exp(a[:, t])[..., None] if gate == "per_dim" else np.exp(a[:, t])[..., None, None]
        if op == "gla":
            s = decay * s + k[:, t, :, :, None] * v[:, t, :, None, :]
        else:
            b = beta[0][:, t, :, None, None]
            s = decay * (s - b * k[:, t, :, :, None] * np.einsum("bhk,bhkv->bhv", k[:, t], s)[:, :, None, :])
            s = s + b * k[:, t, :, :, None] * v[:, t, :, None, :]
        want[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], s)
    o, final = float64(forward, inputs, state, op=op, impl=REFERENCE[op])
    assert rel_rms(o, want) < 1e-12 and rel_rms(final, s) < 1e-12


@pytest.mark.parametrize("op,gate", CASES, ids=CASE_IDS)
def test_continuing_from_a_state_equals_one_pass(op, gate):
    """37 tokens with return_final_state, then 37 more from that state, == 74 at once (in float64)."""
    inputs, state = random_inputs(10, 74, op=op, gate=gate)
    want_o, want_state = float64(forward_only, tuple(inputs), state, op=op, impl=REFERENCE[op])
    o1, mid = forward([a[:, :37] for a in inputs], state, op=op, impl="chunked")
    for impl in ("recurrent", "chunked"):
        o2, final = forward([a[:, 37:] for a in inputs], mid, op=op, impl=impl)
        assert rel_rms(jnp.concatenate([o1, o2], axis=1), want_o) < 1e-5, impl
        assert rel_rms(final, want_state) < 1e-5, impl


@pytest.mark.parametrize("op,gate", CASES, ids=CASE_IDS)
def test_steps_equal_recurrent(op, gate):
    inputs, state = random_inputs(11, 37, op=op, gate=gate)
    want_o, want_state = forward(inputs, state, op=op, impl="recurrent")
    step = jax.jit(STEPS[op])
    outputs = []
    for t in range(37):
        o_t, state = step(state, *(a[:, t] for a in inputs))
        outputs.append(o_t)
    assert rel_rms(jnp.stack(outputs, axis=1), want_o) < 1e-6
    assert rel_rms(state, want_state) < 1e-6


@pytest.mark.parametrize("op,gate", CASES, ids=CASE_IDS)
def test_padding_tokens_change_nothing(op, gate):
    """Tokens with q = k = v = 0 and log decay 0 (what impl='chunked' pads with) leave outputs and state alone."""
    inputs, state = random_inputs(12, 37, op=op, gate=gate)
    padded = [jnp.concatenate([a, jnp.zeros((BATCH, 93, *a.shape[2:]), a.dtype)], axis=1) for a in inputs]
    o, final = forward(inputs, state, op=op, impl="chunked", chunk_size=CHUNK[37])
    o_padded, final_padded = forward(padded, state, op=op, impl="chunked", chunk_size=CHUNK[130])
    np.testing.assert_allclose(o_padded[:, :37], o, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(final_padded, final, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op,gate", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("mixed", [False, True], ids=["strong", "mixed"])
def test_strong_decays_stay_finite(op, gate, mixed):
    """Log decays of -15 to -25 per token (summing to about -2600), alone or mixed with weak ones: no inf or nan,
    and the float64 reference's outputs, state and gradients.

    One allowance, for the delta rule: where every decay is strong, the log-decay gradient is itself tiny (about
    exp(-20) times the others), and the WY pieces it shares with `loglinear_gated_delta` take the in-chunk log
    decays as differences of cumulative sums, diagonal included, so that this gradient holds order-one terms
    that cancel and its error is float32 rounding on the scale of the other gradients; it is compared on their
    scale. (Gated linear attention keeps the s = t terms constant and needs no allowance.)
    """
    inputs, state = random_inputs(13, 130, op=op, gate=gate, decay=(15.0, 25.0))
    if mixed:
        weak = jnp.asarray(np.random.default_rng(14).random(inputs[3].shape) < 0.3)
        inputs = (*inputs[:3], jnp.where(weak, inputs[3] * 1e-3, inputs[3]), *inputs[4:])
    cotangents = (jnp.ones((BATCH, 130, HEADS, D_V)), jnp.ones((BATCH, HEADS, D_K, D_V)))
    (want_o, want_state), want_grads = float64(run, inputs, state, cotangents, op=op, impl=REFERENCE[op])
    (o, final), grads = run(inputs, state, cotangents, op=op, impl="chunked", chunk_size=CHUNK[130])
    scale = np.sqrt(np.mean(want_grads[0] ** 2))  # of the q gradient
    for name, got, want in zip(("o", "final_state") + names(op), (o, final, *grads), (want_o, want_state, *want_grads)):
        assert bool(jnp.all(jnp.isfinite(got))), name
        if name == "log_decay" and op == "delta" and not mixed:
            assert np.sqrt(np.mean((np.asarray(got) - want) ** 2)) < 1e-6 * scale
        else:
            assert rel_rms(got, want) < 1e-4, name


@pytest.mark.parametrize("op,gate", CASES, ids=CASE_IDS)
def test_bf16_inputs_give_bf16_outputs(op, gate):
    inputs, state = random_inputs(15, 37, op=op, gate=gate)
    low = tuple(a.astype(jnp.bfloat16) for a in inputs)
    want_o, want_state = forward([a.astype(jnp.float32) for a in low], state, op=op, impl="recurrent")
    o, final = forward_only(low, state, op=op, impl="chunked")
    assert o.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    # The chunked forms multiply bf16 operands (float32 accumulation; the delta rule's inverse stays float32), so
    # their states carry bf16 rounding too: the stated tolerance is 1e-2 relative RMS for both.
    assert rel_rms(o, want_o) < 1e-2 and rel_rms(final, want_state) < 1e-2
    o_t, state_t = jax.eval_shape(STEPS[op], state, *(a[:, 0] for a in low))
    assert o_t.dtype == jnp.bfloat16 and state_t.dtype == jnp.float32


def test_chunked_gla_gradient_at_many_chunks():
    """Sub-chunked per-dimension GLA over 5 chunks of 32 (batch 1, d_k = d_v = 5, no initial state): the shape at
    which the gradient's program once crashed XLA CPU (a segfault; see ramjax/ops/gla/chunked.py)."""
    rng = np.random.default_rng(23)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 130, 3, 5)), jnp.float32) for _ in range(3))
    log_decay = -jnp.asarray(rng.uniform(0.0, 0.1, size=(1, 130, 3, 5)), jnp.float32)

    def loss(impl, *inputs):
        return jnp.sum(gated_linear_attention(*inputs, impl=impl, chunk_size=32) ** 2)

    grads = quick_jit(jax.grad(functools.partial(loss, "chunked"), argnums=(0, 1, 2, 3)))(q, k, v, log_decay)
    want = float64(jax.grad(functools.partial(loss, "dense"), argnums=(0, 1, 2, 3)), q, k, v, log_decay)
    for got, expected in zip(grads, want, strict=True):
        assert rel_rms(got, expected) < 1e-4


@pytest.mark.parametrize("gate,chunk_size", [("scalar", 16), ("vector", 16), ("vector", 32)])
def test_chunked_gla_multiplies_bf16_operands_with_float32_accumulation(gate, chunk_size):
    """(Chunk 32 with the vector gate takes the sub-chunk path: its products between sub-chunks too.)"""
    inputs, state = random_inputs(17, 37, op="gla", gate=gate)
    low = tuple(a.astype(jnp.bfloat16) for a in inputs)
    dots = matmul_dtypes(lambda *a: OPS["gla"](*a, impl="chunked", chunk_size=chunk_size, initial_state=state),
                         *low)
    bf16 = [d for d in dots if d[0] == ("bfloat16", "bfloat16")]
    assert all(out == "float32" for _, out in bf16)
    # scores x v, each chunk's k^T v and q x state, and q k^T (for the vector gate an elementwise product)
    assert len(bf16) >= 3


@pytest.mark.parametrize("op", ["gla", "delta"])
@pytest.mark.parametrize("seq_len", [1, 37])
def test_auto_picks_recurrent_for_one_token_else_chunked(seq_len, op):
    inputs, state = random_inputs(16, seq_len, op=op)

    def trace(impl):
        fn = functools.partial(OPS[op], impl=impl, chunk_size=16, initial_state=state, return_final_state=True)
        return str(jax.make_jaxpr(fn)(*inputs))

    assert trace("auto") == trace("recurrent" if seq_len == 1 else "chunked")


@pytest.mark.parametrize("chunk_size,dtype,want", [(16, jnp.float32, "pallas"), (16, jnp.bfloat16, "pallas"),
                                                    (24, jnp.float32, "chunked")])
def test_auto_takes_the_gla_kernel_on_a_gpu_where_it_fits(monkeypatch, chunk_size, dtype, want):
    """On a GPU (faked: only traced here), "auto" is the Pallas kernel when it takes the inputs (float32 / bfloat16,
    chunk size a power of 2 >= 16), else the chunked form; the delta rule's kernel too, up to chunks of 32."""
    inputs, state = random_inputs(18, 37, op="gla", gate="per_dim")
    inputs = tuple(x.astype(dtype) for x in inputs[:3]) + inputs[3:]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")

    def trace(impl, op="gla", args=inputs):
        fn = functools.partial(OPS[op], impl=impl, chunk_size=chunk_size, initial_state=state, return_final_state=True)
        return str(jax.make_jaxpr(fn)(*args))

    assert trace("auto") == trace(want)
    delta_inputs, _ = random_inputs(18, 37, op="delta")
    delta_inputs = tuple(x.astype(dtype) for x in delta_inputs[:3]) + delta_inputs[3:]
    assert trace("auto", "delta", delta_inputs) == trace(want, "delta", delta_inputs)


def test_auto_keeps_the_delta_rule_chunked_on_a_gpu_above_chunk_32(monkeypatch):
    """The gated-delta kernels were measured slower than the chunked form at chunk 64 (register spills)."""
    inputs, state = random_inputs(18, 37, op="delta")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")

    def trace(impl):
        fn = functools.partial(OPS["delta"], impl=impl, chunk_size=64, initial_state=state, return_final_state=True)
        return str(jax.make_jaxpr(fn)(*inputs))

    assert trace("auto") == trace("chunked")


def test_scalar_gate_is_loglinear_attention_with_unit_level_weights():
    (q, k, v, a), _ = random_inputs(17, 37)
    weights = jnp.ones((BATCH, 37, HEADS, num_levels(37)))
    loglinear = quick_jit(functools.partial(loglinear_attention, impl="chunked", chunk_size=16, return_final_state=True))
    want_o, want_state = loglinear(q, k, v, a, weights)
    o, final = forward((q, k, v, a), jnp.zeros((BATCH, HEADS, D_K, D_V)), op="gla", impl="chunked")
    assert rel_rms(o, want_o) < 1e-5
    assert rel_rms(final, jnp.sum(want_state.levels, axis=2)) < 1e-5  # lambda = 1: the levels add up


def test_gated_delta_rule_is_loglinear_gated_delta_with_unit_level_weights():
    inputs, _ = random_inputs(18, 37, op="delta")
    weights = jnp.ones((BATCH, 37, HEADS, num_levels(37)))
    loglinear = quick_jit(functools.partial(loglinear_gated_delta, impl="chunked", chunk_size=16, return_final_state=True))
    want_o, want_state = loglinear(*inputs, weights)
    o, final = forward(inputs, jnp.zeros((BATCH, HEADS, D_K, D_V)), op="delta", impl="chunked")
    assert rel_rms(o, want_o) < 1e-5
    assert rel_rms(final, jnp.sum(want_state.levels, axis=2)) < 1e-5


@pytest.mark.parametrize("op", ["gla", "delta"])
@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
def test_no_initial_state_is_a_zero_state(op, impl):
    inputs, _ = random_inputs(19, 37, op=op)
    want_o, want_state = forward(inputs, jnp.zeros((BATCH, HEADS, D_K, D_V)), op=op, impl=impl)
    o, final = forward_only(inputs, None, op=op, impl=impl)
    np.testing.assert_array_equal(o, want_o)
    np.testing.assert_array_equal(final, want_state)


def _gla_args():
    (q, k, v, a), _ = random_inputs(0, 8)  # q, k [2, 8, 3, 5], v [2, 8, 3, 7], log_decay [2, 8, 3]
    return {"q": q, "k": k, "v": v, "log_decay": a}


@pytest.mark.parametrize(
    "change,kwargs,needle",
    [
        ({"q": jnp.zeros((2, 8, 5))}, {}, r"q: expected shape \[batch, time, heads, d_k\]"),
        ({"q": jnp.zeros((2, 8, 3, 5), jnp.int32)}, {}, "q: expected a floating dtype"),
        ({"k": jnp.zeros((2, 8, 3, 4))}, {}, "k: expected shape"),
        ({"v": jnp.zeros((2, 7, 3, 7))}, {}, "v: expected shape"),
        ({"log_decay": jnp.zeros((2, 8, 2))}, {}, r"log_decay: expected shape .* or \[batch, time, heads, d_k\]"),
        ({"log_decay": jnp.zeros((2, 8, 3, 4))}, {}, "log_decay: expected shape"),
        ({"log_decay": jnp.full((2, 8, 3), 0.1)}, {}, "log_decay: log decays must be <= 0"),
        ({"log_decay": jnp.zeros((2, 8, 3), jnp.int32)}, {}, "log_decay: expected a floating dtype"),
        (
            {"q": jnp.zeros((2, 0, 3, 5)), "k": jnp.zeros((2, 0, 3, 5)), "v": jnp.zeros((2, 0, 3, 7)),
             "log_decay": jnp.zeros((2, 0, 3))},
            {},
            "q: the time dimension is empty",
        ),
        ({}, {"impl": "fast"}, "impl: must be one of"),
        ({}, {"chunk_size": 0}, "chunk_size: must be a positive integer"),
        ({}, {"chunk_size": 16.0}, "chunk_size: must be a positive integer"),
        ({}, {"chunk_size": True}, "chunk_size: must be a positive integer"),
        ({}, {"initial_state": jnp.zeros((2, 3, 4, 7))}, r"initial_state: expected shape \[batch, heads, d_k, d_v\]"),
        ({}, {"initial_state": jnp.zeros((2, 3, 5, 7), jnp.int32)}, "initial_state: expected a floating dtype"),
    ],
)
def test_gla_rejects_bad_arguments(change, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        gated_linear_attention(**{**_gla_args(), **change}, **kwargs)


def test_delta_rejects_bad_arguments():
    (q, k, v, a, beta), _ = random_inputs(0, 8, op="delta")
    with pytest.raises(ValueError, match="impl: must be one of"):
        gated_delta_rule(q, k, v, a, beta, impl="dense")
    with pytest.raises(ValueError, match="beta: expected shape"):
        gated_delta_rule(q, k, v, a, beta[..., :1])
    with pytest.raises(ValueError, match=r"log_decay: expected shape \[batch, time, heads\] = \(2, 8, 3\), got"):
        gated_delta_rule(q, k, v, jnp.zeros((2, 8, 3, 5)), beta)
    with pytest.raises(ValueError, match="log_decay: log decays must be <= 0"):
        gated_delta_rule(q, k, v, -a + 0.1, beta)


def test_steps_reject_bad_arguments():
    (q, k, v, a, beta), state = random_inputs(0, 8, op="delta")
    q, k, v, a, beta = (x[:, 0] for x in (q, k, v, a, beta))
    with pytest.raises(ValueError, match="state: expected shape"):
        gated_linear_attention_step(state[..., :2], q, k, v, a)
    with pytest.raises(ValueError, match="log_decay: expected shape"):
        gated_linear_attention_step(state, q, k, v, a[..., None])
    with pytest.raises(ValueError, match="beta: expected shape"):
        gated_delta_rule_step(state, q, k, v, a, beta[:, :1])
    with pytest.raises(ValueError, match=r"q: expected shape \[batch, heads, d_k\]"):
        gated_delta_rule_step(state, q[None], k, v, a, beta)


@pytest.mark.parametrize("chunk_size", [64, 48])
def test_delta_rule_chunked_is_stable_with_aligned_keys(chunk_size):
    # Nearly equal unit keys with beta ~ 1 and almost no decay: the in-chunk matrix (I + beta K K^T) has every
    # strictly-lower entry ~1. A Neumann-product inverse loses everything to cancellation here (its powers reach
    # ~1e17); the chunked form must still match the recurrence, with finite gradients.
    rng = np.random.default_rng(0)
    batch, time, heads, dim = 1, 130, 2, 16
    k = rng.normal(size=(dim,)) + 0.05 * rng.normal(size=(batch, time, heads, dim))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    q, v = rng.normal(size=(2, batch, time, heads, dim))
    log_decay, beta = np.full((batch, time, heads), -1e-3), np.full((batch, time, heads), 0.99)
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v, log_decay, beta)]
    reference = float64(jax.jit(functools.partial(gated_delta_rule, impl="recurrent")), q, k, v, log_decay, beta)
    chunked = jax.jit(functools.partial(gated_delta_rule, impl="chunked", chunk_size=chunk_size))(*args)
    assert rel_rms(chunked, reference) < 1e-4

    def loss(k, impl):
        return jnp.sum(gated_delta_rule(args[0], k, *args[2:], impl=impl, chunk_size=chunk_size) * args[2])

    grad = jax.jit(jax.grad(loss), static_argnums=1)(args[1], "chunked")
    assert bool(jnp.isfinite(grad).all())
    assert rel_rms(grad, jax.jit(jax.grad(loss), static_argnums=1)(args[1], "recurrent")) < 1e-3


@pytest.mark.parametrize("method,lowered", [("doubling_tf32x3", "lhs_precision_type = tf32"),
                                            ("triangular_solve", "stablehlo.triangular_solve")])
def test_delta_chunk_inverse_methods_lower_for_cuda_and_keep_doubling_elsewhere(monkeypatch, method, lowered):
    """chunked.INVERSE_METHOD: the CUDA lowering carries the method (forward and gradient; jax.export, no GPU
    needed) and this CPU keeps block doubling in IEEE fp32 (the same numbers as "doubling"); an unknown value is
    refused naming the switch."""
    from jax import export

    from ramjax.ops.gated_delta import chunked

    (q, k, v, a, beta), _ = random_inputs(3, 40, op="delta")

    def loss(k):
        return jnp.sum(gated_delta_rule(q, k, v, a, beta, impl="chunked", chunk_size=16) ** 2)

    monkeypatch.setattr(chunked, "INVERSE_METHOD", "doubling")
    want = jax.jit(jax.value_and_grad(loss))(k)
    monkeypatch.setattr(chunked, "INVERSE_METHOD", method)
    got = jax.jit(jax.value_and_grad(loss))(k)
    if jax.default_backend() != "gpu":  # (on a GPU the method does change the numbers)
        assert float(got[0]) == float(want[0]) and bool(jnp.all(got[1] == want[1]))
    module = export.export(jax.jit(jax.grad(loss)), platforms=["cuda"])(k).mlir_module()
    assert lowered in module
    monkeypatch.setattr(chunked, "INVERSE_METHOD", "tf32")
    with pytest.raises(ValueError, match="INVERSE_METHOD: 'tf32' is not one of"):
        loss(k)


def test_delta_chunk_inverse_by_triangular_solve_matches_doubling():
    """The triangular-solve inverse (INVERSE_METHOD "triangular_solve" on CUDA) equals block doubling here, value
    and gradient with respect to the strictly lower part."""
    from ramjax.ops.gated_delta import chunked

    rng = np.random.default_rng(0)
    a = jnp.asarray(np.tril(rng.normal(size=(2, 32, 32)) * 0.3, -1), jnp.float32)
    doubled, solved = chunked._doubling_inverse(a, "highest"), chunked._solved_inverse(a)
    assert rel_rms(solved, doubled) < 1e-6
    grads = [jax.grad(lambda a, f=f: jnp.sum(jnp.sin(f(a))))(a) for f in
             (lambda a: chunked._doubling_inverse(a, "highest"), chunked._solved_inverse)]
    assert rel_rms(jnp.tril(grads[1], -1), jnp.tril(grads[0], -1)) < 1e-6


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the methods differ on CUDA only")
@pytest.mark.parametrize("method", ["doubling", "doubling_tf32x3", "triangular_solve"])
def test_delta_chunk_inverse_methods_keep_fp32_accuracy_on_a_gpu(monkeypatch, method):
    """chunked.INVERSE_METHOD on a GPU: with aligned keys (the inverse's hard case) at chunk 64 the chunked form
    stays within fp32's tolerance of the float64 recurrence, its gradient finite and close. The chunked form's
    other products run at full fp32 here: at XLA's default GPU precision (TF32) every method, "doubling" too, is
    ~5e-3 off on this case (H200, 2026-12-04), which says nothing about the inverse."""
    from ramjax.ops.gated_delta import chunked

    monkeypatch.setattr(chunked, "INVERSE_METHOD", method)
    with jax.default_matmul_precision("highest"):
        test_delta_rule_chunked_is_stable_with_aligned_keys(64)


def test_inverse_method_accuracy_script_prints_every_method_and_restores_the_switch(capsys):
    """experiments/inverse_method_accuracy.py: one row per INVERSE_METHOD and precision, errors within the GPU
    test's tolerances on this CPU (all methods are IEEE doubling here), and the module switch left as it was."""
    import importlib.util
    import pathlib

    from ramjax.ops.gated_delta import chunked

    path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "inverse_method_accuracy.py"
    spec = importlib.util.spec_from_file_location("inverse_method_accuracy", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    before = chunked.INVERSE_METHOD
    script.main()
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    rows = [[cell.strip() for cell in row] for row in rows[1:]]  # past the header
    want = [(method, precision) for precision in ("default", "highest") for method in chunked.INVERSE_METHODS]
    assert [(row[0], row[1]) for row in rows] == want
    assert all(float(row[2]) < 1e-4 and float(row[3]) < 1e-3 for row in rows)
    assert chunked.INVERSE_METHOD == before
