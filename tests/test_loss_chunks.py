"""train.loss_chunk_tokens: the LM head and loss over chunks of the time axis (never the whole batch's logits)
give the same totals and gradients as the plain computation, at odd sizes, through the real train and eval steps
(single run and two seeds in one program), and bad values are refused with the field named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import rel_rms
from tiny import tiny_config

from ramjax.data.tasks import SyntheticTask
from ramjax.errors import ConfigError
from ramjax.train.setup import abstract_model, loss_chunk_tokens, train_setup
from ramjax.train.step import chunked_masked_totals, make_eval_step, masked_totals


@pytest.mark.parametrize("chunk_tokens", [1, 5, 12, 40, 110, 111, 1000])
def test_chunked_totals_and_gradients_equal_the_plain_ones(chunk_tokens):
    """batch 3 x time 37 (111 positions): chunks of 1 position per row up to the whole batch, with padding."""
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    features = jax.random.normal(keys[0], (3, 37, 8))
    weight = jax.random.normal(keys[1], (8, 11))
    targets = jax.random.randint(keys[2], (3, 37), 0, 11)
    mask = jax.random.bernoulli(keys[3], 0.5, (3, 37))

    def totals(w, f, chunks):
        return chunked_masked_totals(lambda h: h @ w, f, targets, mask, chunks)

    plain = masked_totals(features @ weight, targets, mask)
    chunked = totals(weight, features, chunk_tokens)
    for a, b in zip(plain, chunked, strict=True):
        assert float(b) == pytest.approx(float(a), rel=1e-6)
    grads = jax.grad(lambda w, f: totals(w, f, 0)[0], argnums=(0, 1))(weight, features)
    chunked_grads = jax.grad(lambda w, f: totals(w, f, chunk_tokens)[0], argnums=(0, 1))(weight, features)
    for a, b in zip(grads, chunked_grads, strict=True):
        assert rel_rms(b, a) < 1e-6


def run_steps(variant, chunk_tokens):
    """Parameters and metrics after two train steps of the tiny model, and what the eval step needs."""
    config = tiny_config(variant)
    config.train.loss_chunk_tokens = chunk_tokens
    setup = train_setup(config)
    task = SyntheticTask(config.task, config.data)
    state, rest = setup.init_state(), setup.init_rest()
    metrics = []
    for step in range(2):
        batch = {k: jax.device_put(np.asarray(v), setup.batch_sharding)
                 for k, v in task.train_batch(step)._asdict().items()}
        state, m = setup.train_step(state, rest, batch)
        metrics.append({k: float(v) for k, v in m.items()})
    return state["params"], metrics, config, rest


def test_a_train_step_with_loss_chunks_is_the_plain_step():
    """The tiny transformer's batch (8 x 64 = 512 positions at its longest setting) in chunks of 40 positions: 5
    per row, the last chunk padded; the same loss, accuracy, gradient norm and parameters; the eval step's totals
    too."""
    plain, plain_metrics, config, rest = run_steps("transformer", 0)
    chunked, chunked_metrics, *_ = run_steps("transformer", 40)
    for a, b in zip(plain_metrics, chunked_metrics, strict=True):
        for name in ("loss", "accuracy", "grad_norm"):
            assert b[name] == pytest.approx(a[name], rel=1e-5), name
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(chunked), strict=True):
        assert rel_rms(np.asarray(b), np.asarray(a)) < 1e-5
    graphdef = abstract_model(config).graphdef
    batch = {k: jnp.asarray(v) for k, v in SyntheticTask(config.task, config.data).train_batch(5)._asdict().items()}
    whole = jax.jit(make_eval_step(graphdef))(plain, rest, batch)
    cut = jax.jit(make_eval_step(graphdef, loss_chunk_tokens=40))(plain, rest, batch)
    for name in ("loss_sum", "correct", "count"):
        assert float(cut[name]) == pytest.approx(float(whole[name]), rel=1e-5), name


def test_chunked_totals_under_vmap_over_seeds():
    """train.num_seeds vmaps the step: the chunked loss (a lax.map under jax.checkpoint) inside it."""
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    features = jax.random.normal(keys[0], (2, 4, 19, 8))  # [seeds, batch, time, d]
    weights = jax.random.normal(keys[1], (2, 8, 13))
    targets = jax.random.randint(keys[2], (2, 4, 19), 0, 13)
    mask = jax.random.bernoulli(keys[3], 0.7, (2, 4, 19))

    def loss(w, f, t, m, chunks):
        return chunked_masked_totals(lambda h: h @ w, f, t, m, chunks)[0]

    for chunks in (0, 9):
        values = jax.vmap(lambda *a: loss(*a, chunks))(weights, features, targets, mask)
        grads = jax.vmap(jax.grad(lambda *a: loss(*a, chunks)))(weights, features, targets, mask)
        if chunks == 0:
            plain_values, plain_grads = values, grads
    assert rel_rms(values, plain_values) < 1e-6 and rel_rms(grads, plain_grads) < 1e-6


@pytest.mark.parametrize("value", [-1, True, 2.5, "32768"])
def test_bad_loss_chunk_tokens_name_the_field(value):
    config = tiny_config("transformer")
    del config.train["loss_chunk_tokens"]  # any type
    config.train.loss_chunk_tokens = value
    with pytest.raises(ConfigError, match="train.loss_chunk_tokens") as error:
        loss_chunk_tokens(config)
    assert "integer >= 0" in str(error.value)
