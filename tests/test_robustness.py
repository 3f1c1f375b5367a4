"""Nothing lost: non-finite steps are skipped or stop the run without a poisoned checkpoint, SIGTERM saves and
exits 0, a corrupt newest checkpoint falls back to the previous one, and a run killed with SIGKILL and rerun
ends bit for bit where an uninterrupted run ends."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from test_train import assert_trees_equal, resume_config, restore_final

from ramjax.data.tasks import SyntheticTask
from ramjax.errors import ConfigError
from ramjax.train.metrics import read_metrics
from ramjax.train.trainer import train

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    return workdir, train(resume_config(), workdir)


def all_finite(tree) -> bool:
    return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))


def test_nonfinite_step_is_skipped_and_logged(tmp_path, capsys):
    config = resume_config()
    config.train.inject_nan_at_step = 5
    summary = train(config, str(tmp_path))
    assert summary["nonfinite_steps"] == [5]
    out = capsys.readouterr().out
    assert "step 5:" in out and "not finite, the update was skipped" in out and "data.seed 0, step 5" in out
    saved = np.load(tmp_path / "nonfinite" / "step_5.npz")
    np.testing.assert_array_equal(saved["inputs"], SyntheticTask(config.task, config.data).train_batch(5).inputs)
    assert any(line.get("train/nonfinite_step") == 5 for line in read_metrics(str(tmp_path)))
    state, meta = restore_final(str(tmp_path))
    assert meta["step"] == 12 and all_finite(state)


def test_nonfinite_step_stops_the_run_with_the_last_good_checkpoint(tmp_path, capsys, uninterrupted):
    config = resume_config()  # checkpoints every 4 steps
    config.train.inject_nan_at_step = 6
    config.train.on_nonfinite = "stop"
    with pytest.raises(SystemExit) as exit_info:
        train(config, str(tmp_path))
    assert exit_info.value.code == 3
    assert "stopped at step 6" in capsys.readouterr().out
    state, meta = restore_final(str(tmp_path))
    assert meta["step"] == 4 and all_finite(state)  # no checkpoint after the bad step


def test_bad_on_nonfinite_value_is_a_config_error(tmp_path):
    from ramjax.errors import ConfigError

    config = resume_config()
    config.train.on_nonfinite = "ignore"
    with pytest.raises(ConfigError, match="train.on_nonfinite"):
        train(config, str(tmp_path))


def test_sigterm_saves_and_exits_zero_then_resumes_exactly(tmp_path, monkeypatch, capsys, uninterrupted):
    from ramjax.train import trainer

    # The signal arrives as the loop takes step 5's batch (batches themselves are made ahead, in threads).
    put_batch = trainer._TrainData.put

    def preempt_at_step_5(self, step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return put_batch(self, step)

    monkeypatch.setattr(trainer._TrainData, "put", preempt_at_step_5)
    with pytest.raises(SystemExit) as exit_info:
        train(resume_config(), str(tmp_path))
    assert exit_info.value.code == 0
    assert "SIGTERM received; saved step 6" in capsys.readouterr().out
    assert restore_final(str(tmp_path))[1]["step"] == 6  # between the periodic checkpoints of 4 and 8
    monkeypatch.undo()
    summary = train(resume_config(), str(tmp_path))
    assert summary["resumed_from"] == 6
    assert_trees_equal(restore_final(uninterrupted[0])[0], restore_final(str(tmp_path))[0])


def test_a_failure_after_sigterm_still_saves_the_last_step(tmp_path, monkeypatch, capsys):
    """A sweep's SIGTERM also kills a compiler child (ptxas in an evaluation's first compile, seen on the GPU): the
    failure it causes must not lose the steps since the last checkpoint."""
    from ramjax.train import trainer

    def sigterm_then_fail(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise RuntimeError("INTERNAL: ptxas exited with non-zero error code 15")

    monkeypatch.setattr(trainer, "_evaluate_and_log", sigterm_then_fail)
    config = resume_config()
    config.train.eval_every = 6  # between the checkpoints of 4 and 8
    with pytest.raises(SystemExit) as exit_info:
        train(config, str(tmp_path))
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "SIGTERM received, then the run failed after step 6 (RuntimeError: INTERNAL: ptxas" in out
    assert "saved step 6" in out
    assert restore_final(str(tmp_path))[1]["step"] == 6


def test_a_failure_without_sigterm_is_raised(tmp_path, monkeypatch):
    from ramjax.train import trainer

    def fail(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(trainer, "_evaluate_and_log", fail)
    config = resume_config()
    config.train.eval_every = 6
    with pytest.raises(RuntimeError, match="evaluation broke"):
        train(config, str(tmp_path))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, uninterrupted):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], workdir)
    for name in ("summary.json",):
        (workdir / name).unlink()
    # Checkpoints 8 and 12 are kept; truncate every file of step 12's state.
    for path in (workdir / "checkpoints" / "12" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")
    summary = train(resume_config(), str(workdir))
    out = capsys.readouterr().out
    assert "checkpoint step 12" in out and "does not restore" in out and "trying the previous one" in out
    assert summary["resumed_from"] == 8
    assert any(p.name.startswith("corrupt-12-") for p in (workdir / "checkpoints").iterdir())
    assert_trees_equal(restore_final(uninterrupted[0])[0], restore_final(str(workdir))[0])


def test_when_no_checkpoint_restores_the_run_is_refused_unless_restart(tmp_path, capsys, uninterrupted):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], workdir)
    (workdir / "summary.json").unlink()
    for step in ("8", "12"):
        for path in (workdir / "checkpoints" / step / "state").rglob("*"):
            if path.is_file():
                path.write_bytes(b"")
    with pytest.raises(ConfigError, match="no checkpoint .* restores.*--restart"):
        train(resume_config(), str(workdir))
    summary = train(resume_config(), str(workdir), restart=True)
    assert summary["resumed_from"] == 0 and "--restart" in capsys.readouterr().out
    assert any(p.name.startswith("metrics.jsonl.before-restart-") for p in workdir.iterdir())
    steps = [r["step"] for r in read_metrics(str(workdir)) if "train/loss" in r]
    assert steps == sorted(set(steps))  # one history, not two
    assert_trees_equal(restore_final(uninterrupted[0])[0], restore_final(str(workdir))[0])


KILL_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, "tests")
    from test_train import resume_config
    from ramjax.train.trainer import train

    config = resume_config()
    config.train.checkpoint_every = 1
    config.train.progress = True  # the bar on stderr tells the parent how far it got
    train(config, sys.argv[1])
""")


def kill_mid_run_then_rerun(command: list[str], env: dict, steps: int = 12) -> None:
    """Runs `command` (a training run of `steps` steps with its progress bar on stderr), SIGKILLs it once the bar
    shows a random step in 3..steps-2, then reruns it to the end; asserts both behaved."""
    kill_after = int(np.random.default_rng(int(time.time())).integers(3, steps - 1))
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    seen = ""
    deadline = time.time() + 600
    while time.time() < deadline:
        seen += process.stderr.read(1) or ""
        if f"{kill_after}/{steps}" in seen or process.poll() is not None:
            break
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode in (-signal.SIGKILL, 0), seen[-2000:]
    result = subprocess.run(command, cwd=ROOT, env=env, timeout=600, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


# ~32 s on 2 cores (three subprocess runs), kept in the default run: surviving kill -9 is a promise of the trainer.
def test_sigkill_at_a_random_step_then_rerun_is_bit_identical(tmp_path):
    """SIGKILL lands somewhere in steps 3-10 (wherever the run is when it comes: inside a step, between steps
    or during an asynchronous save); rerunning the same command finishes the run bit for bit as run A."""
    reference = str(tmp_path / "reference")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, reference], cwd=ROOT, env=env, check=True, timeout=600,
                   capture_output=True)
    workdir = str(tmp_path / "killed")
    kill_mid_run_then_rerun([sys.executable, "-c", KILL_SCRIPT, workdir], env)
    state_ref, meta_ref = restore_final(reference)
    state, meta = restore_final(workdir)
    assert meta == meta_ref and meta["step"] == 12
    assert_trees_equal(state_ref, state)
    # The metrics log has each step once, with the values of the uninterrupted run.
    logged = [(line["step"], line["train/loss"]) for line in read_metrics(workdir) if "train/loss" in line]
    assert logged == [(line["step"], line["train/loss"]) for line in read_metrics(reference) if "train/loss" in line]


def test_metrics_log_drops_the_steps_a_resumed_run_redoes(tmp_path):
    from ramjax.train.metrics import MetricsLog

    log = MetricsLog(str(tmp_path))
    for step in (4, 8, 9, 10):
        log.write(step, {"train/loss": float(step)})
    log.close()
    MetricsLog(str(tmp_path), resumed_from=8).close()  # the checkpoint was step 8: steps 9 and 10 run again
    assert [line["step"] for line in read_metrics(str(tmp_path))] == [4, 8]


INTERRUPT_BEFORE_FIRST_STEP = """
import sys
sys.path.insert(0, "tests")
from tiny import tiny_config
from ramjax.data.tasks import SyntheticTask
from ramjax.train.trainer import train

def interrupt(self, step):
    raise KeyboardInterrupt

SyntheticTask.train_batch = interrupt
train(tiny_config("ramnet", steps=4), sys.argv[1])
"""


def test_ctrl_c_before_the_first_step_exits_130_at_once(tmp_path):
    """Ctrl-C while the first step is being built: exit 130 with one line, nothing saved, no crash."""
    result = subprocess.run([sys.executable, "-c", INTERRUPT_BEFORE_FIRST_STEP, str(tmp_path / "run")],
                            cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 130, result.stderr[-2000:]
    assert "interrupted before step 1 finished; nothing new to save" in result.stdout
    assert "Traceback" not in result.stderr
