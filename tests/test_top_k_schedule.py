"""The RAM-Net top-K training schedule: the K of each step, evaluation at the model's K, exact resumption."""

import numpy as np
import pytest
from flax import nnx

from ramjax.errors import ConfigError
from ramjax.models import LanguageModel
from ramjax.train import top_k_schedule
from ramjax.train.step import make_eval_step
from ramjax.train.setup import make_task, restore_state
from ramjax.train.evaluation import evaluate
from ramjax.train.trainer import train
from test_train import assert_interrupted_run_resumes_exactly
from tiny import tiny_config


def test_k_halves_in_equal_phases_down_to_the_models_k():
    assert top_k_schedule.phases(32, 8) == [32, 16, 8]
    assert top_k_schedule.phases(12, 2) == [12, 6, 3, 2]
    ks = [top_k_schedule.top_k_at(step, 32, 8, 90) for step in range(100)]
    assert ks[:45] == [32] * 45 and ks[45:90] == [16] * 45 and ks[90:] == [8] * 10
    assert [top_k_schedule.top_k_at(s, 0, 8, 90) for s in (0, 50)] == [8, 8]  # no schedule
    assert top_k_schedule.top_k_at(0, 8, 8, 90) == 8 and top_k_schedule.top_k_at(0, 4, 8, 90) == 8


def schedule_config(steps=8):
    config = tiny_config("ramnet", steps=steps)  # model K 2, M 16
    config.data.eval_settings = "2:32,4:32"
    config.train.checkpoint_every, config.train.log_every, config.train.eval_every = min(4, steps), 4, steps
    config.train.ramnet_top_k_start, config.train.ramnet_top_k_anneal_steps = 8, 6  # K 8, 4, then 2 from step 6
    return config


class _Put:
    @staticmethod
    def put(batch):
        return {name: np.asarray(value) for name, value in batch._asdict().items()}


# slow: ~36 s on 2 cores (a compiled step per K, and a second, plain run); the schedule itself (phases, top_k_at,
# start_k) is checked by the fast tests here.
@pytest.mark.slow
def test_schedule_trains_with_larger_k_and_evaluates_with_the_models(tmp_path):
    config = schedule_config(steps=2)  # ends inside the K = 8 phase
    summary = train(config, str(tmp_path / "scheduled"))
    plain = train(_without_schedule(), str(tmp_path / "plain"))
    assert summary["train"]["loss"] != plain["train"]["loss"], "K changes training"
    # The logged evaluation is the model's own (K 2) on the trained parameters.
    state, _ = restore_state(config, str(tmp_path / "scheduled"))
    graphdef, _, rest = nnx.split(LanguageModel(config.model, rngs=nnx.Rngs(0)), nnx.Param, ...)
    again = evaluate(make_eval_step(graphdef), state["params"], rest, make_task(config), _Put())
    for name, value in again.items():
        assert value == pytest.approx(summary["eval"][name], rel=1e-5), name


def _without_schedule():
    config = schedule_config(steps=2)
    config.train.ramnet_top_k_start = 0
    return config


# slow: ~55 s on 2 cores (three 8-step runs); K is a function of the step alone (test_k_halves... above), and
# an interrupted run resuming bit for bit is tests/test_train.py's fast check.
@pytest.mark.slow
def test_interrupted_scheduled_run_resumes_to_the_same_parameters(tmp_path, monkeypatch):
    """Interrupted at step 4 (inside the K = 4 phase), resumed across the change to K = 2 at step 6."""
    assert_interrupted_run_resumes_exactly(schedule_config, tmp_path, monkeypatch, at=4)


def test_start_above_the_memory_size_means_every_slot():
    config = schedule_config(steps=2)
    config.train.ramnet_top_k_start = 32  # M = 4 ** 2 = 16
    assert top_k_schedule.start_k(config) == 16
    config.train.ramnet_top_k_start = 0
    assert top_k_schedule.start_k(config) == 0
    other = tiny_config("gla")
    other.train.ramnet_top_k_start = 32
    assert top_k_schedule.start_k(other) == 0, "no schedule (and one compiled step) without RAM-Net layers"


def test_schedule_fields_are_checked(tmp_path):
    config = schedule_config(steps=2)
    config.train.ramnet_top_k_start, config.train.ramnet_top_k_anneal_steps = 4, -1
    with pytest.raises(ConfigError, match="ramnet_top_k_anneal_steps: must be an integer >= 0"):
        train(config, str(tmp_path))
