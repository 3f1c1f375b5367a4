"""The adaptive-decay fork's protocol as options (issue 21, docs/loglinear.md section 6): the as-run
initialisation, the fork's block against a plain numpy reference of its structure, its MQAR and selective-copying
layouts, the fixed training pool, constant Adam, and every variant of configs/adaptive_decay.py training."""

import importlib.util
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from tiny import ROOT

from ramjax.data.mqar import fork_mqar_batch
from ramjax.data.selective_copy import FORK_BLANK, FORK_SEPARATOR, fork_selective_copy_batch
from ramjax.data.tasks import SyntheticTask
from ramjax.errors import ConfigError
from ramjax.layers import FenwickDecay
from ramjax.models import LanguageModel, config_check
from ramjax.train.optim import learning_rate_schedule, make_optimizer
from ramjax.train.trainer import train

spec = importlib.util.spec_from_file_location("configs_adaptive_decay", ROOT / "configs" / "adaptive_decay.py")
ADAPTIVE = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ADAPTIVE)


# --- initialisation -------------------------------------------------------------------------------------------

def test_as_run_initialisation_is_normal_002_with_zero_biases_and_lambda_near_softplus_0():
    d_model, heads, levels, hidden = 256, 2, 8, 64
    decay = FenwickDecay(d_model, heads, levels, "mlp_softplus", hidden, init="as_run", rngs=nnx.Rngs(0))
    for linear in (decay.level_proj, decay.mlp_in, decay.mlp_out):
        w = np.asarray(linear.kernel[...])
        assert abs(w.std() / 0.02 - 1) < 0.1 and abs(w.mean()) < 0.003, w.std()
    np.testing.assert_array_equal(decay.mlp_in.bias[...], 0.0)
    np.testing.assert_array_equal(decay.mlp_out.bias[...], 0.0)
    # On unit-scale inputs dl has std 0.02 * sqrt(d_model) = 0.32: lambda stays close to softplus(0) = 0.693.
    x = jax.random.normal(jax.random.key(1), (4, 32, d_model))
    lam = np.asarray(decay(x))
    assert abs(lam.mean() - math.log(2)) < 0.01 and lam.min() > 0.65 and lam.max() < 0.74
    softmax = FenwickDecay(d_model, heads, levels, "mlp_softmax", hidden, init="as_run", rngs=nnx.Rngs(0))
    np.testing.assert_allclose(softmax(x), 1 / levels, atol=0.01)
    # The described initialisation is unchanged: lambda = softplus(0.54) exactly.
    described = FenwickDecay(d_model, heads, levels, "mlp_softplus", hidden, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(described(x), np.log1p(np.exp(0.54)), rtol=1e-6)


def test_exact_gelu_is_the_erf_form():
    decay = FenwickDecay(16, 1, 4, "mlp_softplus", 8, init="as_run", exact_gelu=True, rngs=nnx.Rngs(0))
    x = 5 * jax.random.normal(jax.random.key(2), (1, 3, 16))
    dl = decay.level_proj(x).reshape(1, 3, 1, 4)
    h = decay.mlp_in(dl)
    exact = 0.5 * h * (1 + jax.scipy.special.erf(h / np.sqrt(2)))
    np.testing.assert_allclose(decay(x), jax.nn.softplus(decay.mlp_out(exact)), rtol=1e-6)


def test_bad_option_values_name_the_field():
    with pytest.raises(ValueError, match="model.loglinear.lambda_init: must be one of .*got 'as_said'"):
        FenwickDecay(8, 1, 4, "mlp_softplus", init="as_said", rngs=nnx.Rngs(0))
    config = ADAPTIVE.get_config("mqar")
    for field, value, message in (("loglinear.lambda_init", "zero", "model.loglinear.lambda_init: must be one of"),
                                  ("loglinear.exact_gelu", "yes", "model.loglinear.exact_gelu: must be True or False"),
                                  ("block", "sandwich", "model.block: must be one of"),
                                  ("norm", "batch", "model.norm: must be one of"),
                                  ("weight_init", "xavier", "model.weight_init: must be one of"),
                                  ("mamba2.a_init", "ones", "model.mamba2.a_init: must be one of"),
                                  ("mamba2.conv_width", -1, "model.mamba2.conv_width: must be an integer >= 0"),
                                  ("loglinear.tie_levels_above", -1,
                                   "model.loglinear.tie_levels_above: must be an integer >= 0"),
                                  ("loglinear.tie_levels_above", 99,
                                   "model.loglinear.tie_levels_above: must be below num_levels")):
        # Not type-safe: a config read back from a run's config.json has no types to hold a value to.
        m = ml_collections.ConfigDict(ADAPTIVE.get_config("mqar").model.to_dict(), type_safe=False)
        node, leaf = (m[field.split(".")[0]], field.split(".")[1]) if "." in field else (m, field)
        node[leaf] = value
        with pytest.raises(ConfigError, match=message):
            config_check.check_model(m, 128)
    config_check.check_model(config.model, 128)


# --- the fork's block -----------------------------------------------------------------------------------------

def small_fork_model_config(seq_len=37):
    m = ADAPTIVE.get_config("mqar").model
    m.d_model = m.mamba2.head_dim = m.mamba2.d_state = 16
    m.vocab_size = 32
    m.loglinear.num_levels = ADAPTIVE.fenwick_levels(seq_len)
    m.loglinear.decay_hidden = 8
    m.mamba2.chunk_size = 8
    return m


def layer_norm(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * scale + bias


def softplus(x):
    return np.logaddexp(0.0, x)


def fork_reference(params, tokens, eps):
    """The fork's MQARModel (mqar_minimal.py) written out in numpy float64 for one head, from our parameters:
    per layer q, k, v, dl, dt projections, A = -exp(A_log), g = A softplus(dt + dt_bias), lambda from the MLP with
    exact GELU, o_t = sum_s lambda_t[level(t, s)] exp(G_t - G_s) (q_t . k_s) v_s, x = LayerNorm(x + W_out o)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = p["embed"]["embedding"][tokens]  # [batch, time, d]
    seq_len = tokens.shape[1]
    t, s = np.arange(seq_len)[:, None], np.arange(seq_len)[None, :]
    level = np.where(t == s, 0, np.floor(np.log2(np.maximum(t ^ s, 1))) + 1).astype(int)
    level[t < s] = 0
    for i in range(p["groups"]["blocks"][0]["mixer_norm"]["scale"].shape[0]):
        block = jax.tree.map(lambda a: a[i], p["groups"]["blocks"][0])
        mx = block["mixer"]["base"]
        q, k, v = x @ mx["c_proj"]["kernel"], x @ mx["b_proj"]["kernel"], x @ mx["x_proj"]["kernel"]
        dl = x @ mx["decay"]["level_proj"]["kernel"]
        dt = softplus(x @ mx["dt_proj"]["kernel"] + mx["dt_bias"])[..., 0]
        g = -np.exp(mx["a_log"][0]) * dt  # [batch, time]
        h = dl @ mx["decay"]["mlp_in"]["kernel"] + mx["decay"]["mlp_in"]["bias"]
        h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
        lam = softplus(h @ mx["decay"]["mlp_out"]["kernel"] + mx["decay"]["mlp_out"]["bias"])  # [b, t, L]
        cum = np.cumsum(g, axis=1)
        weight = np.take_along_axis(lam, np.broadcast_to(level, (x.shape[0], seq_len, seq_len)), axis=2)
        decay = np.exp(np.where(t >= s, cum[:, :, None] - cum[:, None, :], -np.inf))
        scores = np.einsum("btd,bsd->bts", q, k) * weight * decay
        y = np.einsum("bts,bsd->btd", scores, v) @ mx["out_proj"]["kernel"]
        x = layer_norm(x + y, block["mixer_norm"]["scale"], block["mixer_norm"]["bias"], eps)
    x = layer_norm(x, p["final_norm"]["scale"], p["final_norm"]["bias"], eps)
    return x @ p["lm_head"]["kernel"]


@pytest.fixture(scope="module")
def fork_model():
    """(model config, model) of the fork's structure at d_model 16, built once for the tests below."""
    m = small_fork_model_config()
    return m, LanguageModel(m, rngs=nnx.Rngs(3))


def test_fork_block_matches_a_numpy_reference_of_its_structure(fork_model):
    m, model = fork_model
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # Train-like parameters rather than the initial ones (W2 and the norms' biases would hide mistakes).
    keys = iter(jax.random.split(jax.random.key(4), 64))
    params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(next(keys), a.shape), params)
    tokens = np.asarray(jax.random.randint(jax.random.key(5), (2, 37), 0, m.vocab_size))
    expected = fork_reference(nnx.to_pure_dict(params), tokens, m.norm_eps)
    got = np.asarray(jax.jit(lambda p, x: nnx.merge(graphdef, p, rest)(x))(params, jnp.asarray(tokens)))
    assert np.sqrt(np.mean((got - expected) ** 2) / np.mean(expected**2)) < 1e-5


def test_fork_model_has_only_the_fork_parameters_and_trains(fork_model):
    m, model = fork_model
    names = {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(
        nnx.to_pure_dict(nnx.state(model, nnx.Param)))}
    mixer = {n.split("['base']")[1] for n in names if "['base']" in n}
    assert mixer == {"['a_log']", "['dt_bias']", "['b_proj']['kernel']", "['c_proj']['kernel']",
                     "['x_proj']['kernel']", "['dt_proj']['kernel']", "['out_proj']['kernel']",
                     "['decay']['level_proj']['kernel']", "['decay']['mlp_in']['kernel']", "['decay']['mlp_in']['bias']",
                     "['decay']['mlp_out']['kernel']", "['decay']['mlp_out']['bias']"}, "no conv, gate, D, norm"
    assert not any("mlp_norm" in n or "['mlp']" in n for n in names), "no feed-forward block"
    np.testing.assert_allclose(-np.exp(np.asarray(model.groups.blocks[0].mixer.base.a_log[...])), -1.0)
    out_proj = np.asarray(model.groups.blocks[0].mixer.base.out_proj.kernel[...])
    assert abs(out_proj.std() / 0.01 - 1) < 0.15, "0.02 / sqrt(2 * 2 layers)"

    tokens = jax.random.randint(jax.random.key(1), (2, 37), 0, m.vocab_size)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def logits_and_grads(params):
        def loss(params):
            logits = nnx.merge(graphdef, params, rest)(tokens)
            return jnp.mean(logits**2), logits
        return jax.grad(loss, has_aux=True)(params)[::-1]

    logits, grads = logits_and_grads(params)
    assert logits.shape == (2, 37, m.vocab_size)
    for path, g in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads)):
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, jax.tree_util.keystr(path)


def test_default_model_is_unchanged_by_the_new_fields():
    """The fields at their defaults build the same parameters as a config that does not have them."""
    full = ADAPTIVE.mqar.get_config("loglinear_mamba2,cpu").model
    old = ADAPTIVE.mqar.get_config("loglinear_mamba2,cpu").model
    for field in ("block", "norm", "feed_forward", "weight_init", "init_std"):
        del old[field]
    for field in ("gate", "output_norm", "d_skip", "dt_scales_v", "a_init"):
        del old.mamba2[field]
    del old.loglinear.lambda_init, old.loglinear.exact_gelu, old.loglinear.tie_levels_above
    a = nnx.to_pure_dict(nnx.state(LanguageModel(full, rngs=nnx.Rngs(0)), nnx.Param))
    b = nnx.to_pure_dict(nnx.state(LanguageModel(old, rngs=nnx.Rngs(0)), nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, a, b)


# --- data -----------------------------------------------------------------------------------------------------

def test_fork_mqar_layout():
    kv, seq_len = 8, 64
    batch = fork_mqar_batch(np.random.default_rng(0), batch_size=32, seq_len=seq_len, num_kv_pairs=kv,
                            vocab_size=128)
    inputs, targets, mask = batch
    keys, values = inputs[:, 0:2 * kv:2], inputs[:, 1:2 * kv:2]
    assert keys.min() >= 1 and keys.max() <= 63 and values.min() >= 64 and values.max() <= 127
    assert all(len(set(row)) == kv for row in keys) and all(len(set(row)) == kv for row in values)
    query_at = seq_len - 2 * kv + 2 * np.arange(kv)
    assert mask.sum(1).tolist() == [kv] * 32 and mask[:, query_at].all(), "loss only at the packed queries"
    for row in range(32):
        pairs = dict(zip(keys[row], values[row]))
        asked = inputs[row, query_at]
        assert sorted(asked) == sorted(keys[row]), "every key asked once, at the end"
        assert [pairs[k] for k in asked] == targets[row, query_at].tolist()
    assert inputs.min() >= 1 and inputs.max() <= 127, "fillers from [1, V)"
    assert not np.array_equal(inputs[:, query_at], keys), "queries in a random order"


def test_fork_selective_copy_layout():
    n, seq_len = 16, 256
    inputs, targets, mask = fork_selective_copy_batch(np.random.default_rng(1), batch_size=8, seq_len=seq_len,
                                                      num_tokens=n, vocab_size=128)
    sep = seq_len - n - 1
    assert (inputs[:, sep] == FORK_SEPARATOR).all() and (inputs[:, sep + 1:] == FORK_BLANK).all()
    context = inputs[:, :sep]
    is_data = context < 66
    assert (is_data.sum(1) == n).all() and (context[~is_data] >= 67).all() and (context[is_data] >= 3).all()
    assert mask.sum(1).tolist() == [n] * 8 and mask[:, sep:seq_len - 1].all()
    for row in range(8):
        assert targets[row, sep:seq_len - 1].tolist() == context[row][is_data[row]].tolist(), "in order"


def fork_task(pool_size, batch_size=8):
    d = ADAPTIVE.get_config("mqar,kv4").data
    d.train_settings, d.batch_size, d.train_pool_size = "4:32", batch_size, pool_size
    return SyntheticTask("mqar", d)


def test_train_pool_repeats_exactly_the_same_examples():
    task = fork_task(pool_size=20)
    pool = {tuple(row) for row in task.train_pool(0).inputs}
    assert len(pool) == 20
    seen = [tuple(row) for step in range(40) for row in task.train_batch(step).inputs]
    assert set(seen) == pool, "every batch row is a pool example, and 40 steps of 8 see all 20"
    first = task.train_batch(3)
    assert all(len(set(map(tuple, task.train_batch(s).inputs))) == 8 for s in range(5)), "distinct within a batch"
    again = fork_task(pool_size=20).train_batch(3)  # a restarted run: the same pool and the same draw
    np.testing.assert_array_equal(first.inputs, again.inputs)
    np.testing.assert_array_equal(first.targets, again.targets)
    fresh = fork_task(pool_size=0)
    assert len({tuple(row) for step in range(40) for row in fresh.train_batch(step).inputs}) == 320


def test_bad_data_options_name_the_field():
    with pytest.raises(ValueError, match="data.train_pool_size: .* >= data.batch_size \\(8\\), got 4"):
        fork_task(pool_size=4)
    d = ADAPTIVE.get_config("mqar").data
    d.layout = "zoology"
    with pytest.raises(ValueError, match="data.layout: must be one of \\('standard', 'fork'\\), got 'zoology'"):
        SyntheticTask("mqar", d)
    d = ADAPTIVE.get_config("mqar").data
    d.train_settings = "40:128"
    with pytest.raises(ValueError, match="data.train_settings: setting 40:128 is invalid: num_kv_pairs: 4 \\* kv"):
        SyntheticTask("mqar", d)


# --- optimiser ------------------------------------------------------------------------------------------------

def test_constant_adam_keeps_its_learning_rate():
    o = ADAPTIVE.get_config("mqar").optim
    schedule = learning_rate_schedule(o, 20000)
    assert [float(schedule(s)) for s in (0, 1, 100, 19999, 50000)] == [pytest.approx(3e-4)] * 5
    # Adam without weight decay: the first update of a parameter is -lr * sign(gradient) (bias-corrected).
    tx = make_optimizer(o, 20000)
    params = {"kernel": jnp.ones((3,))}
    grads = {"kernel": jnp.asarray([0.1, -0.2, 0.0])}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], [-3e-4, 3e-4, 0.0], rtol=1e-4)
    o.warmup_steps = 10
    with pytest.raises(ValueError, match="optim.warmup_steps: schedule 'constant' has no warm-up"):
        learning_rate_schedule(o, 100)
    o.warmup_steps, o.schedule = 0, "linear"
    with pytest.raises(ValueError, match="optim.schedule: must be one of .*got 'linear'"):
        learning_rate_schedule(o, 100)
    default = ADAPTIVE.mqar.get_config("ramnet").optim  # unchanged: warm-up from 0
    assert float(learning_rate_schedule(default, 1000)(0)) == 0.0


# --- configs/adaptive_decay.py --------------------------------------------------------------------------------

def test_variants_spell_the_protocol():
    c = ADAPTIVE.get_config("mqar")
    assert (c.task, c.data.train_settings, c.data.eval_settings, c.model.loglinear.num_levels) == \
        ("mqar", "32:128", "32:128", 8)
    c = ADAPTIVE.get_config("mqar_length,kv8,linear")
    assert (c.data.train_settings, c.data.eval_settings, c.model.loglinear.num_levels, c.model.loglinear.mode) == \
        ("8:128", "8:256", 9, "linear")
    c = ADAPTIVE.get_config("selective_copy,len512")
    assert (c.task, c.data.train_settings, c.model.loglinear.num_levels, c.optim.learning_rate) == \
        ("selective_copy", "16:512", 10, 1e-3)
    assert c.train.num_steps == 30000 and ADAPTIVE.get_config("mqar").train.num_steps == 20000
    ours = ADAPTIVE.get_config("mqar,ours").model
    assert (ours.block, ours.feed_forward, ours.loglinear.lambda_init, ours.mamba2.conv_width) == \
        ("pre_norm", True, "as_described", 4)
    for bad in ("mqar,len512", "selective_copy,kv8", "mqar,selective_copy", "mqar,kv3"):
        with pytest.raises(ValueError, match="configs/adaptive_decay.py"):
            ADAPTIVE.get_config(bad)


VARIANTS = ["mqar"] + [pytest.param(v, marks=pytest.mark.slow)
                       for v in ("mqar_length", "selective_copy", "selective_copy,len512", "mqar,linear",
                                 "mqar,mlp_softmax", "mqar,ours")]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_two_steps(variant, tmp_path):
    config = ADAPTIVE.get_config(variant)
    d, t = config.data, config.train
    d.batch_size, d.train_pool_size, d.eval_examples, d.eval_batch_size = 8, 16, 8, 8
    t.num_steps, t.log_every, t.eval_every, t.checkpoint_every, t.progress = 2, 1, 2, 2, False
    summary = train(config, str(tmp_path))
    assert summary["status"] == "finished" and summary["steps"] == 2
    assert np.isfinite(summary["train"]["loss"]) and summary["train"]["grad_norm"] > 0
    assert summary["train"]["learning_rate"] == pytest.approx(config.optim.learning_rate)
    assert all(np.isfinite(v) for v in summary["eval"].values())


def test_fork_model_decodes_as_it_runs(fork_model):
    """Prefill then continue from the decoding state (post-norm block, no convs) = the full forward pass."""
    m, model = fork_model
    tokens = jax.random.randint(jax.random.key(6), (2, 37), 0, m.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(37, dtype=jnp.int32), tokens.shape)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):
        model = nnx.merge(graphdef, state)
        head, cache = model.extend(tokens[:, :20], positions[:, :20], model.init_cache(2, 37), fresh=True)
        tail, _ = model.extend(tokens[:, 20:], positions[:, 20:], cache)
        return model(tokens), jnp.concatenate([head, tail], axis=1)

    full, pieces = run(state)
    assert np.sqrt(np.mean((pieces - full) ** 2) / np.mean(full**2)) < 1e-5
