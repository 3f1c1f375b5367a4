"""model.remat and model.remat_policy change what the backward pass recomputes, never the result: one train step
from the same initialisation gives the same parameters with and without them; a bad policy names the field."""

import jax
import numpy as np
import pytest
from numerics import rel_rms
from tiny import tiny_config

from ramjax.data.tasks import SyntheticTask
from ramjax.train.setup import train_setup


def one_step(variant, remat, policy):
    config = tiny_config(variant)
    config.model.remat, config.model.remat_policy = remat, policy
    setup = train_setup(config)
    batch = SyntheticTask(config.task, config.data).train_batch(0)
    placed = {k: jax.device_put(np.asarray(v), setup.batch_sharding) for k, v in batch._asdict().items()}
    state, metrics = setup.train_step(setup.init_state(), setup.init_rest(), placed)
    return jax.device_get(state["params"]), float(metrics["loss"])


# slow: ~8-10 s a policy on 2 cores; a rematerialised model trains by default in tests/test_run_record.py (which
# does not compare it with the plain step).
@pytest.mark.slow
@pytest.mark.parametrize("policy", ["nothing", "dots"])
def test_rematerialised_step_equals_the_plain_one(policy):
    plain, loss = one_step("gla", False, "nothing")
    again, loss_again = one_step("gla", True, policy)
    assert loss_again == pytest.approx(loss, rel=1e-6)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(again)):
        assert rel_rms(b, a) < 1e-5


def test_a_bad_remat_policy_names_the_field():
    with pytest.raises(ValueError, match="model.remat_policy"):
        one_step("gla", True, "everything")
