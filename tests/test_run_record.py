"""A run's record: config.json written once, result-changing differences refused or recorded as amendments,
finished summaries kept, torn files tolerated, unusable workdirs refused in one line."""

import json
import os

import pytest
from test_train import config_for

from ramjax.errors import ConfigError
from ramjax.train import run_record
from ramjax.train.metrics import MetricsLog, read_metrics
from ramjax.train.trainer import train


def small(steps=4):
    return config_for("transformer", steps=steps, checkpoint_every=2, log_every=2, eval_every=steps)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("finished"))
    return workdir, train(small(), workdir)


def test_differences_ignore_how_and_flag_what():
    recorded = {"model": {"d_model": 64, "ramnet": {"impl": "scan"}}, "optim": {"learning_rate": 1e-3},
                "train": {"log_every": 10, "num_steps": 100}, "mesh": {"data": 1}}
    current = {"model": {"d_model": 64, "ramnet": {"impl": "pallas", "qk_bias": False}},
               "optim": {"learning_rate": 3e-3}, "train": {"log_every": 5, "num_steps": 200}, "mesh": {"data": 8}}
    assert run_record.differences(recorded, current) == {"optim.learning_rate": (1e-3, 3e-3),
                                                         "train.num_steps": (100, 200)}


def test_a_ramnet_schedule_added_since_is_inert_for_a_model_without_ramnet_layers():
    """Runs recorded before the factor and top-K schedules existed resume with configs that now set them, when
    the model has no RAM-Net layer (the schedules then change nothing); a RAM-Net model's record is refused."""
    from ramjax.train import factor_schedule, top_k_schedule

    for pattern, refused in (("loglinear_mamba2", False), ("ramnet", True)):
        config = config_for(pattern, steps=4)
        config.train.ramnet_factors_start, config.train.ramnet_factors_grow_steps = 1, 2
        config.train.ramnet_top_k_start, config.train.ramnet_top_k_anneal_steps = 64, 2
        current = json.loads(config.to_json_best_effort())
        recorded = json.loads(json.dumps(current))
        for name in ("ramnet_factors_start", "ramnet_factors_grow_steps", "ramnet_top_k_start",
                     "ramnet_top_k_anneal_steps"):
            del recorded["train"][name]
        inert = factor_schedule.inert_fields(config) + top_k_schedule.inert_fields(config)
        diffs = run_record.differences(recorded, current, inert)
        assert bool(diffs) == refused, (pattern, diffs)


def test_a_changed_result_field_is_refused_then_amended_and_recorded(finished, tmp_path, capsys):
    workdir = str(tmp_path)
    train(small(steps=2), workdir)
    config_json = open(os.path.join(workdir, "config.json")).read()
    changed = small(steps=4)
    changed.optim.learning_rate = 3e-3
    with pytest.raises(ConfigError, match=r"optim.learning_rate: recorded 0.01, now 0.003.*train.num_steps: "
                                          r"recorded 2, now 4.*--amend"):
        train(changed, workdir)
    summary = train(changed, workdir, amend=True)
    assert "amended" in capsys.readouterr().out and summary["resumed_from"] == 2
    (amendment,) = run_record.read_amendments(workdir)
    assert amendment["step"] == 2
    assert amendment["changes"] == {"optim.learning_rate": [0.01, 0.003], "train.num_steps": [2, 4]}
    assert open(os.path.join(workdir, "config.json")).read() == config_json  # written once
    # The first run's summary stays on record beside the new one.
    kept = [n for n in os.listdir(workdir) if n.startswith("summary.json.steps2-")]
    assert len(kept) == 1 and json.load(open(os.path.join(workdir, kept[0])))["steps"] == 2
    # The amended config is now the run's config: the same command resumes without --amend.
    assert train(changed, workdir)["steps"] == 4


def test_a_changed_model_size_is_refused_even_with_amend_and_the_run_stays_whole(tmp_path):
    """A size that changes the parameters' shapes cannot resume: refused before anything is recorded or moved, so
    the run still resumes with its own config (restoring would fail on every checkpoint, which would then be
    moved aside as corrupt)."""
    workdir = str(tmp_path)
    train(small(steps=2), workdir)
    checkpoints = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    wider = small(steps=4)
    wider.model.d_model = 2 * wider.model.d_model
    with pytest.raises(ConfigError, match=r"checkpoint at step 2 holds a state of other shapes.*params/.*stored "
                                          r"\(.*now \(.*not even with --amend"):
        train(wider, workdir, amend=True)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == checkpoints
    assert run_record.read_amendments(workdir) == []
    assert train(small(steps=4), workdir, amend=True)["resumed_from"] == 2


def test_fields_that_do_not_change_the_result_may_change(finished, capsys):
    workdir, summary = finished
    config = small()
    config.train.log_every, config.train.progress, config.model.remat = 1, False, True
    assert train(config, workdir) == summary  # finished: returned as recorded
    out = capsys.readouterr().out  # ... and the user told that the new values did nothing
    assert "not applied to the finished run: model.remat False -> True; train.log_every 2 -> 1" in out


def test_a_torn_metrics_line_and_a_truncated_config_are_tolerated(tmp_path, capsys):
    workdir = str(tmp_path)
    train(small(steps=2), workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "train/lo')  # killed mid-line
    with open(os.path.join(workdir, "config.json"), "r+") as f:
        f.truncate(40)
    assert [r["step"] for r in read_metrics(workdir)][-1] == 2
    os.unlink(os.path.join(workdir, "summary.json"))
    train(small(steps=2), workdir)
    assert "unreadable" in capsys.readouterr().out
    assert json.load(open(os.path.join(workdir, "config.json")))["train"]["num_steps"] == 2
    assert all(json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")))


def test_damage_before_the_last_metrics_line_names_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl, line 2"):
        read_metrics(str(tmp_path))
    with pytest.raises(ValueError, match="line 2"):
        MetricsLog(str(tmp_path), resumed_from=1)


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "afile"
    path.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        train(small(), str(path))
