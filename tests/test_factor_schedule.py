"""RAM-Net's factor schedule (a memory that grows one address factor at a time): the active factors of each step,
the addresses of a layer with held factors, evaluation with every factor, exact resumption."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ramjax import ops
from ramjax.errors import ConfigError
from ramjax.layers.ramnet import RAMNetMixer
from ramjax.models import LanguageModel
from ramjax.train import factor_schedule
from ramjax.train.evaluation import evaluate
from ramjax.train.setup import make_task, restore_state
from ramjax.train.step import make_eval_step
from ramjax.train.trainer import train
from test_top_k_schedule import _Put
from test_train import assert_interrupted_run_resumes_exactly
from tiny import tiny_config


def test_factors_grow_by_one_in_equal_phases_to_the_models_u():
    counts = [factor_schedule.factors_at(step, 5, 8, 900) for step in range(1000)]
    assert counts[:300] == [5] * 300 and counts[300:600] == [6] * 300 and counts[600:900] == [7] * 300
    assert counts[900:] == [8] * 100
    assert [factor_schedule.factors_at(s, 0, 8, 900) for s in (0, 500)] == [8, 8]  # no schedule
    assert factor_schedule.factors_at(0, 8, 8, 900) == 8 and factor_schedule.factors_at(0, 9, 8, 900) == 8
    assert factor_schedule.factors_at(0, 3, 8, 0) == 8  # no steps to grow over: all factors


def _mixer(num_factors=4, factor_size=3, top_k=5):
    return RAMNetMixer(24, num_heads=2, num_factors=num_factors, factor_size=factor_size, top_k=top_k, d_v=8,
                       decoder_impl="xla", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("active", [1, 2, 3])
def test_held_factors_address_the_first_slots_as_a_smaller_memory_would(active):
    """With A of U factors active, a layer's codes are those of the last A factors alone (the held ones are digit
    0, the most significant), with values equal up to the held softmaxes' ~1e-13, and no gradient reaches the
    held logits."""
    mixer = _mixer()
    u, d_p, k = mixer.num_factors, 3, mixer.active_top_k
    mixer.active_factors = active
    q = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 2, u * d_p)) * 2.0
    key = jax.random.normal(jax.random.PRNGKey(2), (2, 7, 2, u * d_p)) * 2.0
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    (read_idx, read_val), (write_idx, write_val) = mixer._codes(q, key, positions)
    kept = min(k, d_p**active)  # slots beyond d_p^A carry values of ~1e-13
    for x, idx, val in ((q, read_idx, read_val), (key, write_idx, write_val)):
        small_idx, small_val = ops.product_topk(x[..., (u - active) * d_p:], num_factors=active, top_k=kept,
                                                impl="xla")
        np.testing.assert_array_equal(np.asarray(idx[..., :kept]), np.asarray(small_idx))
        np.testing.assert_allclose(np.asarray(val[..., :kept]), np.asarray(small_val), rtol=1e-6)
        assert np.all(np.asarray(val[..., kept:]) < 1e-10)
    grad = jax.grad(lambda q: mixer._codes(q, key, positions)[0][1].sum())(q)
    held = np.asarray(grad).reshape(*q.shape[:-1], u, d_p)[..., :u - active, :]
    assert np.all(held == 0) and np.any(np.asarray(grad) != 0)


def test_all_factors_active_is_the_plain_layer():
    mixer = _mixer()
    q = jax.random.normal(jax.random.PRNGKey(3), (1, 5, 2, 12))
    positions = jnp.arange(5)[None]
    plain = mixer._codes(q, q, positions)
    mixer.active_factors = mixer.num_factors
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(mixer._codes(q, q, positions))))


def schedule_config(steps=8):
    config = tiny_config("ramnet", steps=steps)  # U 2, d_p 4 (M 16), model K 2
    config.data.eval_settings = "2:32,4:32"
    config.train.checkpoint_every, config.train.log_every, config.train.eval_every = min(4, steps), 4, steps
    config.train.ramnet_factors_start, config.train.ramnet_factors_grow_steps = 1, 6  # 1 factor, then 2 from step 6
    return config


def test_start_factors_and_the_fields_checks(tmp_path):
    config = schedule_config(steps=2)
    assert factor_schedule.start_factors(config) == 1
    config.train.ramnet_factors_start = config.model.ramnet.num_factors
    assert factor_schedule.start_factors(config) == 0, "all factors from the start: no schedule"
    other = tiny_config("gla")
    other.train.ramnet_factors_start = 1
    assert factor_schedule.start_factors(other) == 0, "no schedule (and one compiled step) without RAM-Net layers"
    config = schedule_config(steps=2)
    config.train.ramnet_factors_grow_steps = -3
    with pytest.raises(ConfigError, match=r"train.ramnet_factors_grow_steps: must be an integer >= 0 .*got -3"):
        train(config, str(tmp_path))
    config.train.ramnet_factors_grow_steps = 0  # a start with nothing to grow over: said, not ignored
    with pytest.raises(ConfigError,
                       match=r"ramnet_factors_grow_steps: must be > 0 when train.ramnet_factors_start = 1"):
        factor_schedule.check(config)


def test_a_growth_longer_than_the_run_is_warned_about():
    config = schedule_config(steps=4)  # ends inside the one-factor phase (growth over 6 steps)
    with pytest.warns(UserWarning, match=r"ramnet_factors_grow_steps = 6 >= train.num_steps = 4: training ends with 1 "
                                         r"of model.ramnet.num_factors = 2 factors active"):
        factor_schedule.check(config)
    config.train.num_steps = 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        factor_schedule.check(config)  # the last step has every factor: nothing to say


# slow: ~40 s on 2 cores (a compiled step per phase, a plain run, and an interrupted one); the schedule itself and
# the layer's held factors are the fast tests above.
@pytest.mark.slow
def test_scheduled_run_evaluates_with_every_factor_and_resumes_exactly(tmp_path, monkeypatch):
    short = schedule_config(steps=2)  # ends inside the one-factor phase
    summary = train(short, str(tmp_path / "short"))
    plain = schedule_config(steps=2)
    plain.train.ramnet_factors_start = 0
    assert summary["train"]["loss"] != train(plain, str(tmp_path / "plain"))["train"]["loss"], "factors change training"
    state, _ = restore_state(short, str(tmp_path / "short"))
    graphdef, _, rest = nnx.split(LanguageModel(short.model, rngs=nnx.Rngs(0)), nnx.Param, ...)
    again = evaluate(make_eval_step(graphdef), state["params"], rest, make_task(short), _Put())
    for name, value in again.items():  # the logged evaluation is the whole model's on the trained parameters
        assert value == pytest.approx(summary["eval"][name], rel=1e-5), name
    # interrupted at step 4 (one factor), resumed across the growth to two at step 6
    assert_interrupted_run_resumes_exactly(schedule_config, tmp_path / "resume", monkeypatch, at=4)
