"""train.early_stop_accuracy and the summary's best evaluation: a run ends as finished at the first evaluation
that reaches the threshold, a rerun leaves it as it is, and best_eval is the highest mean accuracy of the run."""

import json
import os

import pytest
from tiny import tiny_config

from ramjax.errors import ConfigError
from ramjax.train import trainer


def scripted_accuracies(monkeypatch, accuracies):
    """Evaluations report these mean accuracies in turn (the model itself is trained for real)."""
    calls = []

    def fake_evaluate(eval_step, params, rest, task, batches):
        value = accuracies[min(len(calls), len(accuracies) - 1)]
        calls.append(value)
        return {"eval/accuracy/kv2_len16": value, "eval/loss/kv2_len16": 1.0 - value, "eval/accuracy/mean": value}

    monkeypatch.setattr(trainer, "evaluate", fake_evaluate)
    return calls


def config_for(steps, early_stop=0.0):
    config = tiny_config("transformer", steps=steps)
    config.train.eval_every = 1
    config.train.checkpoint_every = 100
    config.train.early_stop_accuracy = early_stop
    return config


def test_early_stop_ends_at_the_first_evaluation_over_the_threshold_and_a_rerun_keeps_it(tmp_path, monkeypatch):
    calls = scripted_accuracies(monkeypatch, [0.2, 0.5, 0.95, 0.3])
    workdir = str(tmp_path / "run")
    summary = trainer.train(config_for(6, early_stop=0.9), workdir)
    assert len(calls) == 3
    assert summary["steps"] == 3 and summary["stopped_early"]
    assert summary["best_eval"]["step"] == 3 and summary["best_eval"]["eval/accuracy/mean"] == 0.95
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "3"
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["stopped_early"]
    again = trainer.train(config_for(6, early_stop=0.9), workdir)  # finished: nothing trains or evaluates
    assert len(calls) == 3 and again["steps"] == 3


def test_without_early_stop_the_run_goes_on_and_the_summary_keeps_its_best_evaluation(tmp_path, monkeypatch):
    scripted_accuracies(monkeypatch, [0.2, 0.95, 0.4, 0.3])
    summary = trainer.train(config_for(4), str(tmp_path / "run"))
    assert summary["steps"] == 4 and not summary["stopped_early"]
    assert summary["best_eval"]["step"] == 2 and summary["best_eval"]["eval/accuracy/mean"] == 0.95
    assert summary["eval"]["eval/accuracy/mean"] == 0.3


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_a_bad_threshold_names_the_field(tmp_path, value):
    with pytest.raises(ConfigError, match="train.early_stop_accuracy"):
        trainer.train(config_for(2, early_stop=value), str(tmp_path / "run"))
