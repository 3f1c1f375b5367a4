"""FenwickDecay: shapes, the promises each mode makes, and the spec's initialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ramjax.layers import FenwickDecay

D_MODEL, HEADS, LEVELS, HIDDEN = 24, 3, 6, 64


def make(mode, seed=0):
    return FenwickDecay(D_MODEL, HEADS, LEVELS, mode, hidden=HIDDEN, rngs=nnx.Rngs(seed))


def inputs(seed=1):
    return 3 * jax.random.normal(jax.random.key(seed), (2, 11, D_MODEL))


@pytest.mark.parametrize("mode", ["fixed", "linear", "mlp_softplus", "mlp_softmax"])
def test_shapes_and_positivity(mode):
    weights = make(mode)(inputs())
    assert weights.shape == (2, 11, HEADS, LEVELS)
    assert bool(jnp.all(weights > 0)), "every mode gives positive level weights"
    if mode == "fixed":
        np.testing.assert_array_equal(weights, 1.0)
    if mode == "mlp_softmax":
        np.testing.assert_allclose(jnp.sum(weights, -1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("mode", ["linear", "mlp_softplus", "mlp_softmax"])
def test_bf16_computes_the_mlp_in_bf16_and_returns_float32_lambda(mode):
    from numerics import matmul_dtypes

    def build(dtype):
        decay = FenwickDecay(D_MODEL, HEADS, LEVELS, mode, hidden=HIDDEN, init="as_run", dtype=dtype,
                             rngs=nnx.Rngs(0))  # as_run: W2 != 0, so the MLP's output depends on x
        return nnx.split(decay)

    x = inputs().astype(jnp.bfloat16)
    graphdef, params = build(jnp.bfloat16)
    run = lambda x, params: nnx.merge(graphdef, params)(x)  # noqa: E731
    weights = run(x, params)
    assert weights.dtype == jnp.float32
    dots = matmul_dtypes(run, x, params)
    assert dots and all(operands == ("bfloat16", "bfloat16") for operands, _ in dots), dots
    graphdef32, params32 = build(jnp.float32)
    want = nnx.merge(graphdef32, params32)(x.astype(jnp.float32))
    assert float(jnp.max(jnp.abs(weights - want) / want)) < 2e-2


def test_mlp_softplus_starts_at_one_and_is_initialised_as_the_spec_says():
    decay = make("mlp_softplus")
    np.testing.assert_allclose(decay(inputs()), np.log1p(np.exp(0.54)), rtol=1e-6)
    assert abs(float(np.log1p(np.exp(0.54))) - 1) < 1e-3
    np.testing.assert_array_equal(decay.mlp_out.kernel[...], 0.0)
    np.testing.assert_allclose(decay.mlp_out.bias[...], 0.54)
    np.testing.assert_array_equal(decay.mlp_in.bias[...], 0.0)
    # Xavier (Glorot) uniform: bounded by sqrt(6 / (fan_in + fan_out)), variance 2 / (fan_in + fan_out).
    w1 = np.asarray(decay.mlp_in.kernel[...])
    assert w1.shape == (LEVELS, HIDDEN), "one MLP over levels, shared across heads"
    limit = np.sqrt(6 / (LEVELS + HIDDEN))
    assert np.abs(w1).max() <= limit and np.abs(w1).max() > 0.8 * limit
    assert abs(w1.var() / (2 / (LEVELS + HIDDEN)) - 1) < 0.25


def test_mlp_softmax_starts_uniform_and_linear_scale_starts_at_one():
    np.testing.assert_allclose(make("mlp_softmax")(inputs()), 1 / LEVELS, rtol=1e-6)
    np.testing.assert_array_equal(make("mlp_softmax").mlp_out.bias[...], 0.0)
    linear = make("linear")
    np.testing.assert_array_equal(linear.level_scale[...], 1.0)
    dl = linear.level_proj(inputs()).reshape(2, 11, HEADS, LEVELS)
    np.testing.assert_allclose(linear(inputs()), jax.nn.softplus(dl), rtol=1e-6)


def test_weights_depend_on_the_input_and_train():
    decay = make("mlp_softplus")
    x = inputs()

    def loss(decay):
        return jnp.sum(decay(x) ** 2 * jnp.arange(LEVELS))

    grads = nnx.grad(loss)(decay)
    assert float(jnp.abs(grads.mlp_out.kernel[...]).sum()) > 0, "W2 = 0 must still receive gradient"
    nnx.update(decay, jax.tree.map(lambda p, g: p - 0.1 * g, nnx.state(decay, nnx.Param), grads))
    weights = decay(x)
    assert float(jnp.std(weights)) > 0, "after a step, lambda varies with the token"


def test_parameters_carry_logical_axis_names():
    for mode in ("linear", "mlp_softplus"):
        specs = nnx.get_partition_spec(nnx.state(make(mode), nnx.Param))
        for path, spec in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, nnx.Variable)):
            names = tuple(spec.get_value())
            assert names and all(isinstance(n, str) for n in names), (mode, path, names)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode: must be one of"):
        FenwickDecay(8, 2, 4, "softplus", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_levels: must be a positive integer"):
        FenwickDecay(8, 2, 0, "linear", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("mode", ["linear", "mlp_softplus", "mlp_softmax"])
def test_levels_above_the_tie_take_its_weight_and_the_rest_are_untouched(mode):
    """model.loglinear.tie_levels_above: the levels a training length never filled take the top trained level's
    lambda (experiments/results/loglinear_unseen_levels.md); 0 leaves the papers' model."""
    x = inputs()
    plain = np.asarray(make(mode)(x))
    tied = np.asarray(FenwickDecay(D_MODEL, HEADS, LEVELS, mode, hidden=HIDDEN, tie_above=3, rngs=nnx.Rngs(0))(x))
    np.testing.assert_array_equal(tied[..., :4], plain[..., :4])
    np.testing.assert_array_equal(tied[..., 4:], np.repeat(plain[..., 3:4], LEVELS - 4, axis=-1))
    for bad in (-1, LEVELS, 1.5):
        with pytest.raises(ValueError, match="model.loglinear.tie_levels_above: must be an integer in"):
            FenwickDecay(D_MODEL, HEADS, LEVELS, mode, tie_above=bad, rngs=nnx.Rngs(0))
