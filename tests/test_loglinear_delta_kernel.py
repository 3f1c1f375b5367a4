"""`loglinear_gated_delta(impl="pallas")`: the levels above the chunk by kernels.loglinear_delta_levels (interpret
mode here) against the float64 dense form, outputs and every gradient; the kernels' outputs NaN-poisoned; what the
impl refuses; and a model config that selects it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.chunk_common import ChunkConfig
from kernels.loglinear_delta_levels import level_flags, level_walk, level_walk_grads
from numerics import equations, rel_rms
from ramjax.ops.loglinear import loglinear_gated_delta, num_levels

FP32_TOLERANCE = 1e-4  # relative RMS error against the float64 reference
BF16_TOLERANCE = 2e-2  # relative RMS error of bf16 inputs against fp32 on the same (rounded) inputs
NAMES = ("o", "dq", "dk", "dv", "dg", "dbeta", "d level_weights")


def random_problem(seed, batch, seq_len, heads, d_k, d_v, extra_levels=1):
    """float64 numpy inputs of the op (unit-norm keys, beta in [0, 1], g <= 0) and the output's cotangent."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, seq_len, heads, d_k))
    k = rng.normal(size=(batch, seq_len, heads, d_k))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(batch, seq_len, heads, d_v))
    g = -rng.uniform(0.0, 0.5, size=(batch, seq_len, heads))
    beta = rng.uniform(0.0, 1.0, size=(batch, seq_len, heads))
    level_weights = rng.uniform(0.2, 2.0, size=(batch, seq_len, heads, num_levels(seq_len) + extra_levels))
    d_out = rng.normal(size=(batch, seq_len, heads, d_v))
    return (q, k, v, g, beta, level_weights), d_out


def outputs_and_grads(inputs, d_out, dtype, **options):
    def run(*args):
        return loglinear_gated_delta(*args, **options)

    @jax.jit
    def both(inputs, d_out):
        o, vjp = jax.vjp(run, *inputs)
        return (o, *vjp(d_out))

    return both(tuple(jnp.asarray(x, dtype) for x in inputs), jnp.asarray(d_out, dtype))


def float64_reference(inputs, d_out):
    with jax.enable_x64(True):
        return [np.asarray(x) for x in outputs_and_grads(inputs, d_out, jnp.float64, impl="dense")]


# Odd sizes: a partial last chunk, d_k != d_v (neither a power of 2), several levels above the chunk. One case by
# default (interpret mode compiles slowly); the others with -m slow.
@pytest.mark.parametrize("seq_len,chunk_size,d_k,d_v", [
    (100, 16, 5, 7),
    pytest.param(150, 16, 12, 6, marks=pytest.mark.slow),
    pytest.param(200, 32, 20, 36, marks=pytest.mark.slow),
    pytest.param(260, 64, 10, 6, marks=pytest.mark.slow),
    pytest.param(16, 16, 4, 4, marks=pytest.mark.slow),  # one chunk: no level above it
])
def test_pallas_matches_float64_dense(seq_len, chunk_size, d_k, d_v):
    inputs, d_out = random_problem(seq_len, 2, seq_len, 2, d_k, d_v)
    want = float64_reference(inputs, d_out)
    got = outputs_and_grads(inputs, d_out, jnp.float32, impl="pallas", chunk_size=chunk_size)
    for name, g, w in zip(NAMES, got, want):
        assert rel_rms(g, w) < FP32_TOLERANCE, name


def test_pallas_is_the_kernels():
    inputs, _ = random_problem(1, 1, 40, 1, 4, 4)
    args = [jnp.asarray(x, jnp.float32) for x in inputs]
    for impl in ("pallas", "chunked"):
        loss = functools.partial(lambda impl, *a: loglinear_gated_delta(*a, impl=impl, chunk_size=16).sum(), impl)
        program = str(jax.make_jaxpr(jax.grad(loss, argnums=tuple(range(6))))(*args))
        assert ("loglinear_delta_walk_grads" in program) == (impl == "pallas"), impl


def test_walk_kernels_write_every_output():
    """NaN-poisoned output buffers: the same states, reads and state gradients as unpoisoned, all finite."""
    rng = np.random.default_rng(3)
    sequences, chunk, chunks, dk, dv = 2, 16, 5, 16, 32
    levels = (chunks - 1).bit_length()

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape) * 0.3, jnp.float32)

    ke, w, q = (normal(sequences, chunks * chunk, dk) for _ in range(3))
    u, do = normal(sequences, chunks * chunk, dv), normal(sequences, chunks * chunk, dv)
    gamma = jnp.asarray(rng.uniform(0.3, 1.0, size=(sequences, chunks, 1)), jnp.float32)
    lam = jnp.asarray(rng.uniform(0.2, 2.0, size=(sequences, levels, chunks * chunk, 1)), jnp.float32)
    results = []
    for poison in (False, True):
        cfg = ChunkConfig(chunk, 4, True, poison)
        results.append((*level_walk(ke, w, u, q, gamma, lam, cfg), level_walk_grads(ke, w, q, gamma, lam, do, cfg),
                        *level_walk(ke, w, u, q, gamma, lam, cfg, store_states=False),
                        *level_walk(ke, w, u, q, gamma, lam, cfg, store_reads=False)))
    for plain, poisoned in zip(*results):
        assert bool(jnp.all(jnp.isfinite(poisoned)))
        np.testing.assert_array_equal(np.asarray(plain), np.asarray(poisoned))
    states, reads, _, reads_alone, states_alone = results[0]  # each output alone is the same as both together
    np.testing.assert_array_equal(np.asarray(reads), np.asarray(reads_alone))
    np.testing.assert_array_equal(np.asarray(states), np.asarray(states_alone))


def test_level_flags():
    keep, read = level_flags(6)  # chunks 0..5, levels 1..3 above the chunk
    np.testing.assert_array_equal(np.asarray(keep[..., 0]), [[0, 1, 0, 1, 0, 1], [0, 1, 1, 1, 0, 1],
                                                             [0, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(read[..., 0]), [[0, 1, 0, 1, 0, 1], [0, 0, 1, 1, 0, 0],
                                                             [0, 0, 0, 0, 1, 1]])


def test_pallas_refuses_states_and_bad_chunks_by_name():
    inputs, _ = random_problem(2, 1, 20, 1, 4, 4)
    args = [jnp.asarray(x, jnp.float32) for x in inputs]
    with pytest.raises(ValueError, match="impl: loglinear_gated_delta's 'pallas'.*no final state"):
        loglinear_gated_delta(*args, impl="pallas", chunk_size=16, return_final_state=True)
    with pytest.raises(ValueError, match="chunk_size: impl='pallas' takes a power of 2 >= 16, got 8"):
        loglinear_gated_delta(*args, impl="pallas", chunk_size=8)


def test_model_config_takes_pallas_for_the_gated_deltanet_base():
    from ramjax.configs import load_config
    from ramjax.errors import ConfigError
    from ramjax.models.config_check import check_model

    config = load_config("configs/lm.py:loglinear_gated_deltanet,cpu")
    config.model.loglinear.impl = "pallas"
    check_model(config.model)
    config.model.loglinear.impl = "nope"
    with pytest.raises(ConfigError, match="model.loglinear.impl"):
        check_model(config.model)


def test_bf16_inputs_take_bf16_operands_within_tolerance_of_fp32():
    """bf16 q, k, v: the kernels' operands (Q~, W, U, K~) are rounded to bf16; outputs and gradients stay within
    BF16_TOLERANCE of the fp32 chunked form on the same (rounded) inputs."""
    inputs, d_out = random_problem(4, 1, 70, 2, 8, 8)
    rounded = [np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)) for x in inputs]
    want = outputs_and_grads(rounded, d_out, jnp.float32, impl="chunked", chunk_size=16)

    def run(q, k, v, *rest):
        return loglinear_gated_delta(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), *rest,
                                     impl="pallas", chunk_size=16).astype(jnp.float32)

    args = [jnp.asarray(x, jnp.float32) for x in rounded]
    o, vjp = jax.vjp(run, *args)
    got = (o, *vjp(jnp.asarray(d_out, jnp.float32)))
    for name, g, w in zip(NAMES, got, want):
        assert rel_rms(g, w) < BF16_TOLERANCE, name
    walks = [e for e in equations(jax.make_jaxpr(run)(*args).jaxpr)
             if e.primitive.name == "pallas_call" and "loglinear_delta_walk" in str(e.params.get("name", e.params.get("name_and_src_info")))]
    assert walks and all(x.aval.dtype == jnp.bfloat16 for x in walks[0].invars[:4])  # ke, w, u, q



def test_chunk_gradients_by_kernel_or_by_xla_agree(monkeypatch):
    """delta_levels.CHUNK_GRADS_KERNEL picks how the backward pass forms the per-chunk gradients; both give the
    same gradients (to fp32 rounding), the kernel's outputs NaN-poisoned."""
    from ramjax.ops.loglinear import delta_levels

    inputs, d_out = random_problem(5, 1, 90, 2, 6, 10)
    results = {}
    for kernel in (True, False):
        monkeypatch.setattr(delta_levels, "CHUNK_GRADS_KERNEL", kernel)
        monkeypatch.setattr(delta_levels, "ChunkConfig",
                            lambda *args: ChunkConfig(*args[:3], True))  # poison_output on
        results[kernel] = outputs_and_grads(inputs, d_out, jnp.float32, impl="pallas", chunk_size=16)
    for name, a, b in zip(NAMES, results[True], results[False]):
        assert bool(jnp.all(jnp.isfinite(a))), name
        assert rel_rms(a, b) < 1e-6, name
