"""train.microbatches: the batch's gradient summed over slices of it in one step is the whole batch's gradient
(one optimizer update; the same loss, accuracy and parameters up to rounding), also when rows count different
numbers of positions; bad values are refused with the field named. The sharded case (8 devices, microbatches 2)
is in tests/test_train.py's eight-device test."""

import jax
import numpy as np
import pytest
from numerics import rel_rms
from tiny import tiny_config

from ramjax.data.tasks import SyntheticTask
from ramjax.errors import ConfigError
from ramjax.train.setup import microbatches, train_setup
from ramjax.train.step import microbatch_split


def two_steps(variant, n):
    """Parameters and metrics after two train steps of the tiny model with train.microbatches = n, on MQAR batches
    whose rows count different numbers of positions (some rows' query positions masked out)."""
    config = tiny_config(variant)
    config.train.microbatches = n
    setup = train_setup(config)
    task = SyntheticTask(config.task, config.data)
    state, rest = setup.init_state(), setup.init_rest()
    rng = np.random.default_rng(0)
    metrics = []
    for step in range(2):
        batch = {k: np.asarray(v) for k, v in task.train_batch(step)._asdict().items()}
        batch["loss_mask"] = batch["loss_mask"] & (rng.uniform(size=batch["loss_mask"].shape) < 0.6)
        placed = {k: jax.device_put(v, setup.batch_sharding) for k, v in batch.items()}
        state, m = setup.train_step(state, rest, placed)
        metrics.append({k: float(v) for k, v in m.items()})
    return jax.device_get(state["params"]), metrics


@pytest.mark.parametrize("variant", ["transformer"])
def test_a_microbatched_step_is_the_whole_batch_step(variant):
    whole, whole_metrics = two_steps(variant, 1)
    sliced, sliced_metrics = two_steps(variant, 4)  # slices of 2 rows: the rows' counts differ, the weighting matters
    for a, b in zip(whole_metrics, sliced_metrics):
        for name in ("loss", "accuracy", "grad_norm"):
            assert b[name] == pytest.approx(a[name], rel=1e-5), name
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(sliced), strict=True):
        assert rel_rms(b, a) < 1e-5


# slow: ~15 s on 2 cores; RAM-Net's step is the one whose memory microbatches exist for.
@pytest.mark.slow
def test_a_microbatched_ramnet_step_is_the_whole_batch_step():
    test_a_microbatched_step_is_the_whole_batch_step("ramnet")


def test_microbatches_are_strided_slices_of_the_batch():
    batch = {"inputs": np.arange(12).reshape(6, 2)}
    split = microbatch_split(batch, 3)["inputs"]
    assert split.shape == (3, 2, 2)
    np.testing.assert_array_equal(split[1], [[2, 3], [8, 9]])  # rows 1 and 4


@pytest.mark.parametrize("value, needle", [(0, "positive integer"), (True, "positive integer"),
                                           (2.0, "positive integer"), (3, "multiple of 6")])
def test_bad_microbatches_name_the_field(value, needle):
    config = tiny_config("transformer")  # batch 8
    del config.train["microbatches"]  # any type
    config.train.microbatches = value
    with pytest.raises(ConfigError, match="train.microbatches") as error:
        microbatches(config, batch_shards=2)
    assert needle in str(error.value)
