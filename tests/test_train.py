"""The training loop end to end on tiny configs: every model variant trains and writes its outputs, the loss
falls, an interrupted run resumes to the same parameters, a changed model is refused, the CLI needs --workdir,
and a step on an 8-device (data, fsdp, tensor) mesh equals the step on one device."""

import itertools
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from event_files import read_scalars
from numerics import rel_rms
from tiny import MQAR, tiny_config

from ramjax.data.tasks import SyntheticTask
from ramjax.errors import ConfigError
from ramjax.train.checkpoint import Checkpoints
from ramjax.train.metrics import read_metrics
from ramjax.train.trainer import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
SLICES = ("kv2_len32", "kv4_len32")


def config_for(variant, steps, **train_fields):
    config = tiny_config(variant, steps=steps)
    # Evaluation slices of one length: one compilation of the evaluation step.
    config.data.eval_settings = "2:32,4:32"
    for name, value in train_fields.items():
        config.train[name] = value
    return config


def restore_final(workdir):
    """(params as a nested dict of numpy arrays, meta) of the newest checkpoint in `workdir`."""
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), keep=2, every=1)
    step = checkpoints.latest_step()
    state, meta = checkpoints.restore(step, None)
    checkpoints.close()
    return state, meta


def interrupt_batch_at(monkeypatch, step: int) -> None:
    """Ctrl-C while the trainer makes the batch of `step` (SyntheticTask.train_batch raises KeyboardInterrupt)."""
    make_batch = SyntheticTask.train_batch

    def interrupted(self, asked):
        if asked == step:
            raise KeyboardInterrupt
        return make_batch(self, asked)

    monkeypatch.setattr(SyntheticTask, "train_batch", interrupted)


def assert_trees_equal(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [path for path, _ in leaves_a] == [path for path, _ in leaves_b]
    for (path, x), (_, y) in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def assert_interrupted_run_resumes_exactly(make_config, tmp_path, monkeypatch, at: int) -> None:
    """A run of make_config() interrupted while the batch of step `at` is made, then resumed, ends with the
    uninterrupted run's final checkpoint, bit for bit."""
    train(make_config(), str(tmp_path / "a"))
    interrupt_batch_at(monkeypatch, at)
    with pytest.raises(SystemExit):
        train(make_config(), str(tmp_path / "b"))
    monkeypatch.undo()
    train(make_config(), str(tmp_path / "b"))
    state_a, meta_a = restore_final(str(tmp_path / "a"))
    state_b, meta_b = restore_final(str(tmp_path / "b"))
    assert meta_a == meta_b and meta_a["step"] == make_config().train.num_steps
    assert_trees_equal(state_a, state_b)


# The lambda modes other than the default are layer-tested (FenwickDecay); their full training runs are `slow`.
# hybrid (~30 s on 2 cores, 4 layers) is `slow` too: each of its mixers trains here on its own, and the hybrid
# model is checked by tests/test_layers.py (causal, scanned == unscanned) and tests/test_decode.py (generate).
SLOW_VARIANTS = ("hybrid", "loglinear_gated_deltanet")  # the latter ~14 s: its op is tests/test_fenwick.py's
VARIANTS_IN_CI = [pytest.param(v, marks=pytest.mark.slow) if v in SLOW_VARIANTS else v for v in MQAR.MODEL_VARIANTS] + [
    pytest.param(f"loglinear_mamba2,{mode}", marks=pytest.mark.slow) for mode in ("fixed", "linear", "mlp_softmax")]


@pytest.mark.parametrize("variant", VARIANTS_IN_CI)
def test_every_model_variant_trains_and_writes_its_outputs(variant, tmp_path):
    summary = train(config_for(variant, steps=2), str(tmp_path))
    assert summary["status"] == "finished" and summary["steps"] == 2 and summary["resumed_from"] == 0
    assert np.isfinite(summary["train"]["loss"]) and summary["train"]["loss"] > 0
    assert np.isfinite(summary["train"]["grad_norm"]) and summary["train"]["grad_norm"] > 0
    with open(tmp_path / "summary.json") as f:
        written = json.load(f)
    assert written["train"]["loss"] == summary["train"]["loss"]
    expected_eval = {f"eval/{m}/{s}" for m in ("accuracy", "loss") for s in SLICES} | {"eval/accuracy/mean"}
    assert set(written["eval"]) == expected_eval
    for name, value in written["eval"].items():
        assert np.isfinite(value) and (0 <= value <= 1 or "/loss/" in name), name
    assert written["eval"]["eval/accuracy/mean"] == pytest.approx(
        np.mean([written["eval"][f"eval/accuracy/{s}"] for s in SLICES]))

    lines = read_metrics(str(tmp_path))
    assert [line["step"] for line in lines if "train/loss" in line] == [1, 2]
    assert [line["step"] for line in lines if "eval/accuracy/mean" in line] == [2]
    scalars = read_scalars(tmp_path / "tensorboard")
    assert [step for step, _ in scalars["train/loss"]] == [1, 2]
    assert scalars["train/loss"][-1][1] == pytest.approx(summary["train"]["loss"], rel=1e-6)
    for s in SLICES:
        assert scalars[f"eval/accuracy/{s}"] == [(2, pytest.approx(written["eval"][f"eval/accuracy/{s}"]))]
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["model"]["pattern"] == summary["model"]
    state, meta = restore_final(str(tmp_path))
    assert meta["step"] == 2 and int(state["step"]) == 2


def test_loss_falls(tmp_path):
    config = config_for("transformer", steps=50, eval_every=50)
    config.optim.learning_rate = 1e-2
    train(config, str(tmp_path))
    losses = [line["train/loss"] for line in read_metrics(str(tmp_path)) if "train/loss" in line]
    assert len(losses) == 50
    first, last = losses[0], float(np.mean(losses[-5:]))
    # From ~4.7 at the start to ~3.6: learning that answers are value tokens alone gives ln(32) = 3.47 (a model
    # this small and short does not get further; measured: 4.69 -> 3.60).
    assert first - last > 0.8, (first, last)


def resume_config():
    config = config_for("transformer", steps=12, checkpoint_every=4, log_every=4, eval_every=12)
    config.data.mixture = "cycle"  # the setting depends on the step: a resumed run must pick up the rotation
    return config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Run A: 12 steps in one go."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    return workdir, train(resume_config(), workdir)


def test_interrupted_run_resumes_to_the_same_parameters(uninterrupted, tmp_path, monkeypatch, capsys):
    workdir_a, summary_a = uninterrupted
    workdir_b = str(tmp_path)
    # Run B: the same run (num_steps 12: the learning-rate schedule depends on it), interrupted as by Ctrl-C
    # while the batch of step 8 is made, just after the checkpoint of step 8.
    interrupt_batch_at(monkeypatch, 8)
    with pytest.raises(SystemExit) as exit_info:
        train(resume_config(), workdir_b)
    assert exit_info.value.code == 130
    assert "interrupted; saved step 8" in capsys.readouterr().out
    state, meta = restore_final(workdir_b)
    assert meta["step"] == meta["data_step"] == 8 and int(state["step"]) == 8
    monkeypatch.undo()

    summary_b = train(resume_config(), workdir_b)
    assert summary_b["resumed_from"] == 8 and "resuming" in capsys.readouterr().out
    assert summary_b["train"]["loss"] == summary_a["train"]["loss"]
    assert summary_b["eval"] == summary_a["eval"]
    state_a, meta_a = restore_final(workdir_a)
    state_b, meta_b = restore_final(workdir_b)
    assert meta_a == meta_b and meta_a["step"] == 12
    assert_trees_equal(state_a, state_b)  # params, Adam's moments and step, bit for bit

    # A finished run rerun: nothing to train; its summary is returned as recorded, not rewritten.
    summary_file = os.path.join(workdir_b, "summary.json")
    recorded = open(summary_file).read()
    again = train(resume_config(), workdir_b)
    assert "already finished" in capsys.readouterr().out
    assert again["resumed_from"] == 8 and again["eval"] == summary_a["eval"]
    assert open(summary_file).read() == recorded


def test_an_evaluation_out_of_memory_keeps_the_step_and_names_the_field(uninterrupted, tmp_path, monkeypatch):
    """An evaluation that runs out of device memory (as one did on an H200 at d_v 256) ends the run with an error
    naming data.eval_batch_size, after the step's checkpoint is saved; the rerun resumes at that step and evaluates
    it first, so metrics.jsonl has every evaluation, and ends where the uninterrupted run ends."""
    from ramjax.train import trainer

    evaluate, calls = trainer._evaluate, []

    def out_of_memory_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # step 8
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 16.59GiB")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer, "_evaluate", out_of_memory_once)
    config = resume_config()
    config.train.eval_every = 4
    with pytest.raises(ConfigError, match=r"data.eval_batch_size = \d+: the evaluation at step 8 ran out of "
                                          r"device memory.*newest checkpoint is of step 8"):
        train(config, str(tmp_path))
    assert [row["step"] for row in read_metrics(str(tmp_path)) if "eval/accuracy/mean" in row] == [4]
    summary = train(config, str(tmp_path))
    assert summary["resumed_from"] == 8
    assert [row["step"] for row in read_metrics(str(tmp_path)) if "eval/accuracy/mean" in row] == [4, 8, 12]
    assert summary["eval"] == uninterrupted[1]["eval"]  # the same step-12 evaluation as the run in one go
    assert_trees_equal(restore_final(str(tmp_path))[0], restore_final(uninterrupted[0])[0])


@pytest.mark.parametrize("field,value", [("d_model", 32), ("pattern", "ramnet"), ("num_layers", 4)])
def test_resuming_with_a_different_model_is_refused(uninterrupted, field, value):
    workdir, _ = uninterrupted
    config = resume_config()
    config.model[field] = value
    with pytest.raises(ConfigError, match=f"model.{field}: recorded"):
        train(config, workdir)


def test_config_errors_are_config_errors(tmp_path):
    config = config_for("transformer", steps=2)
    config.data.train_settings = "9:32"
    with pytest.raises(ConfigError, match="data.train_settings"):
        train(config, str(tmp_path))
    config = config_for("transformer", steps=2)
    config.model.pattern = "attention,lstm"
    with pytest.raises(ConfigError, match="model.pattern"):
        train(config, str(tmp_path))
    config = config_for("transformer", steps=2)
    config.data.batch_size = 7
    config.data.mixture = "cycle"
    config.mesh.data = 2
    with pytest.raises(ConfigError, match="mesh"):  # 2 devices asked, 1 here
        train(config, str(tmp_path))


def test_cli_train_needs_a_workdir():
    result = subprocess.run([sys.executable, "-m", "ramjax.cli", "train", "--config", "configs/mqar.py:cpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--workdir" in result.stderr and "Traceback" not in result.stderr


SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys, tempfile
    import jax, numpy as np
    sys.path.insert(0, "tests")
    from tiny import tiny_config
    from ramjax.train.trainer import train
    from test_train import restore_final

    assert jax.device_count() == 8
    results = {}
    for variant in sys.argv[1:]:
        runs = {}
        for name, (data, fsdp, tensor), devices, micro in (("one", (1, 1, 1), jax.devices()[:1], 1),
                                                           ("eight", (2, 2, 2), None, 1),
                                                           ("eight_micro", (2, 2, 2), None, 2)):
            if micro > 1 and variant != "transformer":
                continue  # train.microbatches on a sharded batch: one model is enough (the slicing is the model's)
            config = tiny_config(variant, d_model=16, steps=2)
            config.train.microbatches = micro
            config.data.eval_settings = "2:32,4:32"
            config.model.ramnet.impl = "dense"  # half the compile time of "scan" (which the variant test covers)
            config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
            summary = train(config, tempfile.mkdtemp(), devices=devices)
            state, _ = restore_final(summary["workdir"])
            sharded = [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(state["params"])
                       if not x.sharding.is_fully_replicated]
            runs[name] = dict(loss=summary["train"]["loss"], eval=summary["eval"], sharded=sharded,
                              devices=sorted({len(x.sharding.device_set) for x in jax.tree.leaves(state["params"])}),
                              params=[np.asarray(x).tolist() for x in jax.tree.leaves(state["params"])])
        results[variant] = runs
    print("RESULTS" + json.dumps(results))
""")


# ~40 s on 2 cores (a subprocess training two models on 1 and 8 devices, and the transformer on 8 with
# train.microbatches 2),
# kept in the default run: the one
# multi-device training check there (tests/test_multihost.py's multi-device runs are all slow).
def test_eight_device_mesh_step_equals_one_device_step():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, "ramnet", "transformer"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "keeps it replicated" not in result.stderr  # every dimension divides its mesh axes: all of it is sharded
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULTS"))
    results = json.loads(line[len("RESULTS"):])
    for (variant, runs), eight_name in itertools.product(results.items(), ("eight", "eight_micro")):
        if eight_name not in runs:
            continue
        one, eight = runs["one"], runs[eight_name]
        variant = f"{variant} {eight_name}"
        assert one["devices"] == [1] and eight["devices"] == [8], variant
        assert not one["sharded"]
        # Sharding really happened: the embedding and the projection kernels are split over fsdp and tensor.
        assert any("embed" in path for path in eight["sharded"]), (variant, eight["sharded"])
        assert any("q_proj" in path for path in eight["sharded"]), (variant, eight["sharded"])
        # Step 2's loss depends on step 1's update; the parameters are those after both steps.
        assert eight["loss"] == pytest.approx(one["loss"], rel=1e-5), variant
        for a, b in zip(one["params"], eight["params"], strict=True):
            assert rel_rms(b, a) < 1e-5, variant
        for name, value in one["eval"].items():
            assert eight["eval"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (variant, name)


def test_checkpoints_from_before_a_new_off_by_default_field_still_resume(tmp_path):
    """A run written before model.ramnet.qk_bias and decoder_impl existed resumes: a field missing from the
    checkpoint's config at its "off" default (and any implementation choice) is the same model."""
    config = config_for("ramnet", steps=2)
    train(config, str(tmp_path))
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    del saved["model"]["ramnet"]["qk_bias"], saved["model"]["ramnet"]["decoder_impl"]
    with open(tmp_path / "config.json", "w") as f:
        json.dump(saved, f)
    (tmp_path / "summary.json").unlink()  # not finished: the resume evaluates and writes its summary
    assert train(config_for("ramnet", steps=2), str(tmp_path))["resumed_from"] == 2
    config = config_for("ramnet", steps=2)
    config.model.ramnet.qk_bias = True  # on, it is another model
    with pytest.raises(ConfigError, match="model.ramnet.qk_bias: recorded .*, now True"):
        train(config, str(tmp_path))


def test_ramjax_eval_of_a_synthetic_run_on_its_own_and_on_new_settings(tmp_path):
    """`ramjax eval` on an MQAR run: its own settings give the run's final evaluation exactly; longer unseen
    settings are evaluated too; a bad setting is a ConfigError naming --settings."""
    from ramjax.evaluate import evaluate_synthetic_run

    config = tiny_config("transformer", steps=3)  # the evaluation is the model's business only through its call
    summary = train(config, str(tmp_path))
    own = evaluate_synthetic_run(str(tmp_path))
    assert own["eval/accuracy/mean"] == pytest.approx(summary["eval"]["eval/accuracy/mean"], abs=1e-6)
    longer = evaluate_synthetic_run(str(tmp_path), settings="4:32,8:48", examples=10)
    assert set(k for k in longer if k.startswith("eval/accuracy/")) == {
        "eval/accuracy/kv4_len32", "eval/accuracy/kv8_len48", "eval/accuracy/mean"}
    assert (tmp_path / "eval_mqar_4x32_8x48.json").exists()
    with pytest.raises(ConfigError, match="--settings"):
        evaluate_synthetic_run(str(tmp_path), settings="99:16")


def test_ramjax_eval_ties_the_levels_training_never_filled(tmp_path):
    """`ramjax eval --tie-unseen-levels`: at the training lengths (every level trained) nothing changes; the
    result records the tie and goes to its own file; a model without log-linear layers is a ConfigError."""
    from ramjax.evaluate import evaluate_synthetic_run

    config = tiny_config("loglinear_mamba2", steps=2)  # trained on lengths 16 and 32: levels 0-5
    train(config, str(tmp_path / "ll"))
    plain = evaluate_synthetic_run(str(tmp_path / "ll"))
    tied = evaluate_synthetic_run(str(tmp_path / "ll"), tie_levels=True)
    assert tied["tie_levels_above"] == 5 and "tie_levels_above" not in plain
    assert tied["eval/accuracy/mean"] == plain["eval/accuracy/mean"]
    for setting in ("kv2_len16", "kv4_len32"):  # the loss: the accuracy of 2 steps' training is 0 either way
        assert tied[f"eval/loss/{setting}"] == pytest.approx(plain[f"eval/loss/{setting}"], rel=1e-6)
    assert (tmp_path / "ll" / "eval_mqar_2x16_4x32_tied.json").exists()
    evaluate_synthetic_run(str(tmp_path / "ll"), settings="4:48", examples=8, tie_levels=True)  # level 6 tied
    transformer = tiny_config("transformer", steps=1)
    train(transformer, str(tmp_path / "tf"))
    with pytest.raises(ConfigError, match="--tie-unseen-levels: model.pattern 'attention' has no log-linear"):
        evaluate_synthetic_run(str(tmp_path / "tf"), tie_levels=True)


@pytest.mark.slow  # ~12 s on 2 cores; the only check of train.profile_steps
def test_profile_steps_writes_a_trace_of_the_window(tmp_path):
    config = tiny_config("gla", steps=3)
    config.train.profile_steps = (1, 2)
    train(config, str(tmp_path))
    traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files if f.endswith(".xplane.pb")]
    assert traces, "no jax.profiler trace in WORKDIR/profile"
    # the Perfetto trace beside it, which experiments/profile_train_step.py --trace summarises (a subprocess: the
    # script's absl flags would clash with bench_models' in this process)
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                          "profile_train_step.py")
    done = subprocess.run([sys.executable, script, "--trace", str(tmp_path / "profile"), "--steps", "1", "--top", "5",
                           "--results", str(tmp_path / "trace.md")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = (tmp_path / "trace.md").read_text()
    assert "Top 5 host events" in summary and summary.count("\n| ") >= 3, summary
    config.train.profile_steps = (2, 1)
    with pytest.raises(ConfigError, match=r"train.profile_steps: \(start, stop\) with 0 <= start <= stop"):
        train(config, str(tmp_path / "bad"))


def test_the_host_runs_at_most_two_steps_ahead_of_the_device(tmp_path, monkeypatch):
    """Each step waits for the step two before it (ramjax.train.trainer.MAX_STEPS_IN_FLIGHT): a SIGTERM then has at
    most two queued steps to finish before its save, not a whole log interval's."""
    from ramjax.train import trainer

    waited = []
    real = jax.block_until_ready

    def spy(x):
        if isinstance(x, dict) and "loss" in x:  # a train step's metrics
            waited.append(float(x["loss"]))
        return real(x)

    monkeypatch.setattr(trainer.jax, "block_until_ready", spy)
    config = config_for("gla", steps=6, log_every=6)
    train(config, str(tmp_path))
    assert trainer.MAX_STEPS_IN_FLIGHT == 2 and len(waited) == 6 - 2
