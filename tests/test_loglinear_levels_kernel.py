"""kernels.loglinear_levels (the Fenwick levels above the chunk) against a float64 NumPy reference of its formula,
outputs and every gradient, in interpret mode with NaN-poisoned outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import loglinear_levels
from numerics import rel_rms


def reference(q, g_cum, weights, states, chunk, first_chunk):
    """o_t = exp(Gc_t) sum over the levels chunk(t) reads at of w[t, i] q_t . S[entry], in float64."""
    q, g_cum, weights, states = (np.asarray(a, np.float64) for a in (q, g_cum, weights, states))
    batch, seq_len, heads = g_cum.shape
    o = np.zeros((batch, seq_len, heads, states.shape[-1]))
    for i, level in enumerate(loglinear_levels.level_groups(first_chunk, seq_len // chunk)):
        for t in range(seq_len):
            n = t // chunk
            a = first_chunk + n
            if (a >> (level.level - 1)) % 2 == 0:
                continue
            entry = level.offset + (level.front + n) // 2**level.level
            q_t = np.broadcast_to(q[:, t], (batch, heads, q.shape[-1]))
            o[:, t] += np.exp(g_cum[:, t])[..., None] * weights[:, t, :, i, None] * np.einsum(
                "bhk,bhkv->bhv", q_t, states[:, entry])
    return o


def random_inputs(seed, batch, seq_len, heads, d_k, d_v, chunk, first_chunk, dtype=jnp.float32, q_heads=None):
    num_chunks = seq_len // chunk
    levels = loglinear_levels.level_groups(first_chunk, num_chunks)
    entries = sum(level.groups for level in levels)
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (batch, seq_len, q_heads or heads, d_k)).astype(dtype)
    g = -jax.nn.softplus(jax.random.normal(keys[1], (batch, seq_len, heads)))
    g_cum = jnp.cumsum(g.reshape(batch, num_chunks, chunk, heads), axis=2).reshape(g.shape)
    weights = jax.random.uniform(keys[2], (batch, seq_len, heads, len(levels)))
    states = jax.random.normal(keys[3], (batch, entries, heads, d_k, d_v)) / d_k**0.5
    return q, g_cum, weights, states


@pytest.mark.parametrize("first_chunk,num_chunks,d_k,d_v,q_heads", [
    pytest.param(0, 5, 24, 40, None, marks=pytest.mark.slow), (3, 6, 16, 80, 1)])
def test_levels_read_and_gradients_match_float64(first_chunk, num_chunks, d_k, d_v, q_heads):
    """Odd sizes: chunks not a power of 2, a sequence that starts mid-grid (first chunk 3: padding fronts at every
    level), d_k != d_v, d_v past one 64-wide block; every level's reads and every gradient. q_heads 1: one q head
    that all three heads read (Mamba-2's C), its gradient the sum over them."""
    chunk = 16
    inputs = random_inputs(0, 2, num_chunks * chunk, 3, d_k, d_v, chunk, first_chunk, q_heads=q_heads)
    run = lambda *x: loglinear_levels.loglinear_levels_read(  # noqa: E731
        *x, chunk_size=chunk, first_chunk=first_chunk, interpret=True, poison_output=True)
    o = run(*inputs)
    assert o.dtype == jnp.float32 and not jnp.isnan(o).any()
    assert rel_rms(o, reference(*inputs, chunk, first_chunk)) < 1e-5

    cotangent = jax.random.normal(jax.random.PRNGKey(7), o.shape)
    grads = jax.jit(jax.grad(lambda *x: jnp.sum(run(*x) * cotangent), argnums=(0, 1, 2, 3)))(*inputs)
    with jax.enable_x64(True):
        wide = [jnp.asarray(np.asarray(a, np.float64)) for a in inputs]

        def ref(*x):
            return jnp.sum(_reference_jnp(*x, chunk, first_chunk) * jnp.asarray(np.asarray(cotangent, np.float64)))

        expected = jax.jit(jax.grad(ref, argnums=(0, 1, 2, 3)))(*wide)
        for name, got, want in zip(("q", "g_cum", "weights", "block_states"), grads, expected):
            assert not np.isnan(np.asarray(got)).any(), name
            assert rel_rms(got, want) < 1e-5, name


def _reference_jnp(q, g_cum, weights, states, chunk, first_chunk):
    """`reference` in jax.numpy (differentiable): per level, each reading chunk's one state."""
    seq_len = q.shape[1]
    num_chunks = seq_len // chunk
    q = jnp.broadcast_to(q, (*q.shape[:2], states.shape[2], q.shape[3]))
    o = 0.0
    for i, level in enumerate(loglinear_levels.level_groups(first_chunk, num_chunks)):
        n = np.arange(num_chunks)
        reads = ((first_chunk + n) >> (level.level - 1)) % 2 == 1
        entry = level.offset + (level.front + n) // 2**level.level
        per_token = np.repeat(entry, chunk)
        mask = np.repeat(reads, chunk)[None, :, None]
        read = jnp.einsum("bthk,bthkv->bthv", q, states[:, per_token])
        o = o + jnp.where(mask, weights[..., i], 0.0)[..., None] * read
    return jnp.exp(g_cum)[..., None] * o


def test_bf16_q_within_bf16_rounding():
    chunk, first_chunk = 16, 1
    q, g_cum, weights, states = random_inputs(1, 1, 4 * chunk, 2, 32, 32, chunk, first_chunk, jnp.bfloat16)
    o = loglinear_levels.loglinear_levels_read(q, g_cum, weights, states, chunk_size=chunk, first_chunk=first_chunk,
                                               interpret=True)
    assert rel_rms(o, reference(q, g_cum, weights, states, chunk, first_chunk)) < 2e-2


def test_arguments_are_checked_with_their_names():
    q, g_cum, weights, states = random_inputs(0, 1, 48, 1, 16, 16, 16, 0)
    with pytest.raises(ValueError, match="weights: expected"):
        loglinear_levels.loglinear_levels_read(q, g_cum, weights[..., :1], states, chunk_size=16, interpret=True)
    with pytest.raises(ValueError, match="whole number of chunks"):
        loglinear_levels.loglinear_levels_read(q[:, :40], g_cum[:, :40], weights[:, :40], states, chunk_size=16,
                                               interpret=True)
    with pytest.raises(ValueError, match="block_states: expected"):
        loglinear_levels.loglinear_levels_read(q, g_cum, weights, states[:, :1], chunk_size=16, interpret=True)


def test_gradient_lowers_for_cuda_through_triton():
    """The read and both gradient kernels lower to Triton custom calls for CUDA (jax.export; no GPU needed): the
    dynamic state index, the column loads and the state kernel's loop with bounds from the program id."""
    from jax import export

    chunk, first_chunk, num_chunks = 64, 5, 11
    levels = loglinear_levels.level_groups(first_chunk, num_chunks)
    entries = sum(level.groups for level in levels)
    b, h, d_k, d_v = 2, 3, 80, 136
    shapes = [jax.ShapeDtypeStruct((b, num_chunks * chunk, 1, d_k), jnp.bfloat16),  # one q head for all (Mamba-2)
              jax.ShapeDtypeStruct((b, num_chunks * chunk, h), jnp.float32),
              jax.ShapeDtypeStruct((b, num_chunks * chunk, h, len(levels)), jnp.float32),
              jax.ShapeDtypeStruct((b, entries, h, d_k, d_v), jnp.float32)]

    def loss(*x):
        return jnp.sum(loglinear_levels.loglinear_levels_read(*x, chunk_size=chunk, first_chunk=first_chunk) ** 2)

    exported = export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*shapes)
    module = exported.mlir_module()
    for name in ("loglinear_levels_read", "loglinear_levels_token_grads", "loglinear_levels_state_grads"):
        assert name in module, name
