"""train.num_seeds: N seeds trained in one vmapped step. Seed i of a vmapped run is the single run with
train.init_seed + i and data.seed + i; an interrupted vmapped run resumes to the uninterrupted one; bad values of
num_seeds, and language modelling with many seeds, are refused with the field named."""

import json
import os

import jax
import numpy as np
import pytest
from numerics import rel_rms
from test_train import interrupt_batch_at
from tiny import tiny_config

from ramjax.errors import ConfigError
from ramjax.train.checkpoint import Checkpoints
from ramjax.train.metrics import read_metrics
from ramjax.train.trainer import train


def config_for(variant="transformer", steps=3, num_seeds=1, init_seed=0, data_seed=0, **train_fields):
    config = tiny_config(variant, steps=steps)
    config.data.eval_settings = "2:32,4:32"  # one length: one compilation of the evaluation step
    config.data.mixture = "cycle"
    del config.train["num_seeds"]  # any type, for the test of bad values
    config.train.num_seeds = num_seeds
    config.train.init_seed = init_seed
    config.data.seed = data_seed
    for name, value in train_fields.items():
        config.train[name] = value
    return config


def restore_final(workdir):
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), keep=2, every=1)
    state, meta = checkpoints.restore(checkpoints.latest_step(), None)
    checkpoints.close()
    return state, meta


# slow: ~23 s on 2 cores for the transformer (four runs), ~30 s for RAM-Net. A vmapped run trains, checkpoints and
# evaluates per seed in test_ramjax_eval_of_a_vmapped_run_... below, which runs by default.
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["transformer", "ramnet"])
def test_seed_i_of_a_vmapped_run_is_the_single_run_with_that_seed(variant, tmp_path):
    n, init_seed, data_seed = 3, 5, 7
    summary = train(config_for(variant, num_seeds=n, init_seed=init_seed, data_seed=data_seed),
                    str(tmp_path / "vmapped"))
    assert summary["num_seeds"] == n and summary["init_seeds"] == [5, 6, 7] and summary["data_seeds"] == [7, 8, 9]
    stacked, _ = restore_final(str(tmp_path / "vmapped"))
    assert int(stacked["step"]) == 3
    accuracies = []
    for i in range(n):
        single = train(config_for(variant, init_seed=init_seed + i, data_seed=data_seed + i),
                       str(tmp_path / f"seed{i}"))
        params, _ = restore_final(str(tmp_path / f"seed{i}"))
        leaves = jax.tree_util.tree_leaves_with_path(params["params"])
        stacked_leaves = jax.tree.leaves(stacked["params"])
        assert len(leaves) == len(stacked_leaves)
        for (path, x), y in zip(leaves, stacked_leaves):
            assert y.shape == (n, *x.shape)
            assert rel_rms(np.asarray(y[i]), np.asarray(x)) < 1e-5, jax.tree_util.keystr(path)
        assert summary["train"][f"loss/seed_{i}"] == pytest.approx(single["train"]["loss"], rel=1e-5)
        assert summary["eval"][f"eval/accuracy/mean/seed_{i}"] == pytest.approx(single["eval"]["eval/accuracy/mean"],
                                                                               abs=1e-6)
        accuracies.append(single["eval"]["eval/accuracy/mean"])
        # The seeds differ: different initialisations and data.
        if i:
            assert rel_rms(np.asarray(stacked_leaves[0][i]), np.asarray(stacked_leaves[0][0])) > 1e-2
    assert summary["eval"]["eval/accuracy/mean"] == pytest.approx(np.mean(accuracies), abs=1e-6)
    assert summary["eval"]["eval/accuracy/mean/std"] == pytest.approx(np.std(accuracies), abs=1e-6)
    assert summary["train"]["loss"] == pytest.approx(np.mean([summary["train"][f"loss/seed_{i}"] for i in range(n)]))
    assert summary["best_accuracy_mean"] == pytest.approx(np.mean(accuracies), abs=1e-6)
    logged = read_metrics(str(tmp_path / "vmapped"))
    names = set().union(*logged)
    assert {"train/loss", "train/loss/std", "train/loss/seed_2", "eval/accuracy/kv2_len32/seed_1",
            "eval/accuracy/kv2_len32/std"} <= names
    if variant == "ramnet":  # RAM-Net's address metrics, per seed
        assert any(name.startswith("addressing/") and name.endswith("/seed_2") for name in names)


# slow: ~18 s on 2 cores; resuming bit for bit is tests/test_train.py's fast check (one seed).
@pytest.mark.slow
def test_an_interrupted_vmapped_run_resumes_to_the_uninterrupted_one(tmp_path, monkeypatch, capsys):
    def config():
        return config_for(steps=6, num_seeds=2, checkpoint_every=2, log_every=2, eval_every=3)

    summary_a = train(config(), str(tmp_path / "a"))
    interrupt_batch_at(monkeypatch, 4)
    with pytest.raises(SystemExit) as exit_info:
        train(config(), str(tmp_path / "b"))
    assert exit_info.value.code == 130
    assert "interrupted; saved step 4" in capsys.readouterr().out
    monkeypatch.undo()
    summary_b = train(config(), str(tmp_path / "b"))
    assert summary_b["resumed_from"] == 4
    measured = ("tokens_per_s", "steps_per_s")  # timings
    assert ({k: v for k, v in summary_b["train"].items() if k not in measured} ==
            {k: v for k, v in summary_a["train"].items() if k not in measured})
    assert summary_b["eval"] == summary_a["eval"]
    assert summary_b["best_eval_per_seed"] == summary_a["best_eval_per_seed"]
    (state_a, meta_a), (state_b, meta_b) = restore_final(str(tmp_path / "a")), restore_final(str(tmp_path / "b"))
    assert meta_a == meta_b
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with open(tmp_path / "b" / "summary.json") as f:
        assert json.load(f)["num_seeds"] == 2


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_bad_num_seeds_is_refused_naming_the_field(value, tmp_path):
    with pytest.raises(ConfigError, match="train.num_seeds"):
        train(config_for(num_seeds=value), str(tmp_path))


def test_language_modelling_with_many_seeds_is_refused(tmp_path):
    config = config_for(num_seeds=2)
    config.task = "lm"
    with pytest.raises(ConfigError, match="train.num_seeds = 2.*synthetic task"):
        train(config, str(tmp_path))


def test_ramjax_eval_of_a_vmapped_run_and_load_model_of_one_seed(tmp_path):
    from ramjax.evaluate import evaluate_synthetic_run
    from ramjax.train.setup import load_model

    workdir = str(tmp_path)
    summary = train(config_for(steps=2, num_seeds=2), workdir)
    result = evaluate_synthetic_run(workdir)
    for i in range(2):
        expected = summary["eval"][f"eval/accuracy/mean/seed_{i}"]
        assert result[f"eval/accuracy/mean/seed_{i}"] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ConfigError, match="num_seeds"):
        load_model(workdir)
    assert load_model(workdir, seed=1) is not None


@pytest.mark.slow
def test_ramnet_top_k_schedule_with_many_seeds_runs(tmp_path):
    config = config_for("ramnet", steps=2, num_seeds=2, ramnet_top_k_start=4, ramnet_top_k_anneal_steps=2)
    summary = train(config, str(tmp_path))
    assert summary["steps"] == 2 and np.isfinite(summary["train"]["loss/seed_1"])


# slow: ~17 s on 2 cores (two vmapped runs of 2 seeds, whole batch against train.microbatches 2); the default run
# compares microbatches with the whole batch in tests/test_microbatches.py and on 8 devices in tests/test_train.py.
@pytest.mark.slow
def test_microbatches_inside_a_vmapped_step_give_the_same_run(tmp_path):
    def trained(name, microbatches):
        summary = train(config_for(steps=2, num_seeds=2, microbatches=microbatches), str(tmp_path / name))
        state, _ = restore_final(str(tmp_path / name))
        return summary, jax.tree.leaves(state["params"])

    whole, whole_params = trained("whole", 1)
    sliced, sliced_params = trained("sliced", 2)
    assert sliced["train"]["loss/seed_1"] == pytest.approx(whole["train"]["loss/seed_1"], rel=1e-5)
    for a, b in zip(whole_params, sliced_params, strict=True):
        assert rel_rms(np.asarray(b), np.asarray(a)) < 1e-5
