"""The token embedding's gradient (model.embedding_grad): the one-hot matrix product equals XLA's scatter-add and a
float64 sum, on odd sizes, cut into vocabulary blocks or not, with repeated and out-of-range tokens; the model
trains to the same parameters either way; a bad value names the field."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import rel_rms
from tiny import tiny_config

from ramjax.data.tasks import SyntheticTask
from ramjax.ops.shared.embedding import embedding_lookup, one_hot_table_grad, resolve_grad
from ramjax.train.setup import train_setup


def reference_table_grad(tokens, d_out, vocab):
    """float64 sum of d_out[p] into row tokens[p], in numpy (tokens outside [0, vocab) add nothing)."""
    tokens, d_out = np.asarray(tokens).reshape(-1), np.asarray(d_out, np.float64).reshape(tokens.size, -1)
    grad = np.zeros((vocab, d_out.shape[-1]))
    keep = (tokens >= 0) & (tokens < vocab)
    np.add.at(grad, tokens[keep], d_out[keep])
    return grad


def skewed_tokens(rng, shape, vocab):
    """Text-like ids: a third of them one token (as ' ' is in bytes), the rest Zipf-distributed."""
    ranks = np.minimum(rng.zipf(1.3, size=shape) - 1, vocab - 1)
    return np.where(rng.random(shape) < 1 / 3, 5 % vocab, ranks).astype(np.int32)


@pytest.mark.parametrize("block_bytes", [1 << 26, 200])  # one block; blocks of a few rows (and a ragged last one)
def test_one_hot_gradient_equals_the_scatter_and_a_float64_sum(block_bytes):
    rng = np.random.default_rng(0)
    vocab, d = 37, 13
    tokens = skewed_tokens(rng, (3, 29), vocab)
    table = jnp.asarray(rng.normal(size=(vocab, d)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(3, 29, d)), jnp.float32)
    reference = reference_table_grad(tokens, weights, vocab)

    def loss(table, grad):
        return (embedding_lookup(table, tokens, grad=grad, block_bytes=block_bytes) * weights).sum()

    one_hot, scatter = jax.grad(loss)(table, "one_hot"), jax.grad(loss)(table, "scatter")
    assert one_hot.dtype == jnp.float32 and one_hot.shape == (vocab, d)
    assert rel_rms(one_hot, reference) < 1e-6 and rel_rms(scatter, reference) < 1e-6
    assert jnp.array_equal(embedding_lookup(table, tokens, grad="one_hot"), table[tokens])  # the forward is the lookup


def test_bf16_lookup_sums_its_gradient_in_fp32():
    """bf16 compute: the forward is the bf16 table's rows; the gradient of the fp32 table is summed in fp32, so
    ~10k updates of one row lose nothing to bf16 accumulation (the scatter path sums in bf16)."""
    rng = np.random.default_rng(1)
    vocab, d, n = 11, 8, 10000
    tokens = np.zeros(n, np.int32)
    tokens[::7] = rng.integers(1, vocab, size=tokens[::7].shape)
    table = jnp.asarray(rng.normal(size=(vocab, d)), jnp.float32)
    d_out = jnp.asarray(rng.normal(size=(n, d)), jnp.bfloat16)
    out, vjp = jax.vjp(lambda t: embedding_lookup(t, tokens, dtype=jnp.bfloat16, grad="one_hot"), table)
    assert out.dtype == jnp.bfloat16 and jnp.array_equal(out, table.astype(jnp.bfloat16)[tokens])
    (grad,) = vjp(d_out)
    assert grad.dtype == jnp.float32
    assert rel_rms(grad, reference_table_grad(tokens, d_out.astype(jnp.float32), vocab)) < 1e-6


def test_out_of_range_tokens_add_nothing_and_the_gradient_vmaps():
    vocab, d = 6, 3
    tokens = jnp.asarray([[0, 5, 6, -1, 2, 2]], jnp.int32)
    d_out = jnp.ones((1, 6, d), jnp.float32)
    grad = one_hot_table_grad(tokens, d_out, vocab, block_bytes=8)
    assert np.array_equal(grad, reference_table_grad(tokens, d_out, vocab))
    # several seeds' tables in one program (train.num_seeds vmaps the step)
    tables = jnp.stack([jnp.zeros((vocab, d)), jnp.ones((vocab, d))])
    grads = jax.vmap(jax.grad(lambda t: embedding_lookup(t, tokens[:, :2], grad="one_hot").sum()))(tables)
    assert grads.shape == (2, vocab, d) and float(grads[:, 0].sum()) == 2 * d and float(grads[:, 5].sum()) == 2 * d


def test_auto_is_scatter_on_cpus_and_a_bad_value_names_the_field():
    assert resolve_grad("auto") == ("scatter" if jax.default_backend() == "cpu" else "one_hot")
    with pytest.raises(ValueError, match="model.embedding_grad.*'onehot'"):
        resolve_grad("onehot")


def one_step(embedding_grad):
    config = tiny_config("transformer")
    config.model.embedding_grad = embedding_grad
    setup = train_setup(config)
    batch = SyntheticTask(config.task, config.data).train_batch(0)
    placed = {k: jax.device_put(np.asarray(v), setup.batch_sharding) for k, v in batch._asdict().items()}
    state, metrics = setup.train_step(setup.init_state(), setup.init_rest(), placed)
    return jax.device_get(state["params"]), float(metrics["loss"])


def test_a_train_step_is_the_same_with_either_gradient():
    (scatter, loss), (one_hot, loss_one_hot) = one_step("scatter"), one_step("one_hot")
    assert loss_one_hot == pytest.approx(loss, rel=1e-6)
    assert jax.tree.structure(one_hot) == jax.tree.structure(scatter)  # same parameters: checkpoints carry over
    for a, b in zip(jax.tree.leaves(scatter), jax.tree.leaves(one_hot)):
        assert rel_rms(b, a) < 1e-5
    with pytest.raises(ValueError, match="model.embedding_grad"):
        one_step("atomic")


def test_runs_recorded_before_the_field_resume_with_any_value():
    """model.embedding_grad chooses how the same gradient is summed: a run recorded without it, or with another
    value, resumes (ramjax/train/run_record.py)."""
    from ramjax.train.run_record import differences

    assert differences({"model": {"d_model": 8}}, {"model": {"d_model": 8, "embedding_grad": "auto"}}) == {}
    assert differences({"model": {"embedding_grad": "scatter"}}, {"model": {"embedding_grad": "one_hot"}}) == {}
