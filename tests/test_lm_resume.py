"""The LM input pipeline in the trainer (issue 22): each process reads its own rows from LMTask.train_iterator,
every checkpoint holds each process's iterator state, and a resumed run (Ctrl-C, or SIGKILL in the slow test)
ends bit for bit where an uninterrupted run ends; a checkpoint without the state is caught up by replay; two
processes read disjoint rows, and their checkpoint resumes on one process through restart_document."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from test_lm import corpus, lm_config  # noqa: F401 (corpus: the fixture)
from test_robustness import kill_mid_run_then_rerun
from test_train import assert_trees_equal, restore_final

from ramjax.data import lm, lm_pipeline
from ramjax.train.trainer import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6


def resume_config(corpus, data_dir, **train_fields):
    config = lm_config(corpus, data_dir)
    config.train.num_steps, config.train.checkpoint_every, config.train.eval_every = STEPS, 2, STEPS
    for name, value in train_fields.items():
        config.train[name] = value
    return config


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):  # noqa: F811
    data_dir = tmp_path_factory.mktemp("data")
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    return data_dir, workdir, train(resume_config(corpus, data_dir), workdir)


def test_checkpoints_hold_the_iterator_state_and_a_resume_is_bit_identical(corpus, uninterrupted, tmp_path,  # noqa: F811
                                                                           monkeypatch, capsys):
    data_dir, reference, summary_a = uninterrupted
    saved = json.loads((pathlib.Path(reference) / "checkpoints" / str(STEPS) / "data" /
                        "process_0-of-1.json").read_text())
    assert saved["layout"]["process_count"] == 1 and saved["layout"]["start"] == 0
    # The state saved at step 6 is the state after 6 batches of one process's stream.
    task = lm.LMTask(resume_config(corpus, data_dir).data)
    stream = task.train_iterator()
    for _ in range(STEPS):
        next(stream)
    assert saved == json.loads(json.dumps(stream.get_state()))
    stream.close()

    # Ctrl-C while the batch of step 3 is read: the run saves step 3 (between the checkpoints of 2 and 4), with
    # the iterator's state before that batch.
    workdir = tmp_path / "run"
    read = lm_pipeline.TrainIterator.__next__
    calls = []

    def interrupt_at_step_3(self):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return read(self)

    monkeypatch.setattr(lm_pipeline.TrainIterator, "__next__", interrupt_at_step_3)
    with pytest.raises(SystemExit) as exit_info:
        train(resume_config(corpus, data_dir), str(workdir))
    assert exit_info.value.code == 130 and "interrupted; saved step 3" in capsys.readouterr().out
    monkeypatch.undo()
    assert (workdir / "checkpoints" / "3" / "data" / "process_0-of-1.json").exists()
    old = tmp_path / "old"
    shutil.copytree(workdir, old)

    summary_b = train(resume_config(corpus, data_dir), str(workdir))
    assert summary_b["resumed_from"] == 3
    assert summary_b["train"]["loss"] == summary_a["train"]["loss"] and summary_b["eval"] == summary_a["eval"]
    assert_trees_equal(restore_final(reference)[0], restore_final(str(workdir))[0])

    # A checkpoint from before the trainer kept the iterator state: the stream is replayed up to its step.
    for step in (2, 3):
        shutil.rmtree(old / "checkpoints" / str(step) / "data")
    summary_c = train(resume_config(corpus, data_dir), str(old))
    assert "holds no data-iterator state" in capsys.readouterr().out and summary_c["resumed_from"] == 3
    assert_trees_equal(restore_final(reference)[0], restore_final(str(old))[0])


# slow: ~7 s on 2 cores; the trainer saving a non-finite step's batch is tests/test_robustness.py's fast check.
@pytest.mark.slow
def test_a_nonfinite_lm_step_saves_its_batch(corpus, tmp_path):  # noqa: F811
    config = resume_config(corpus, tmp_path / "data", num_steps=4, inject_nan_at_step=2)
    summary = train(config, str(tmp_path / "run"))
    assert summary["nonfinite_steps"] == [2]
    stream = lm.LMTask(config.data).train_iterator()
    batches = [next(stream) for _ in range(3)]
    stream.close()
    saved = np.load(tmp_path / "run" / "nonfinite" / "step_2.npz")
    for field, value in batches[2]._asdict().items():
        np.testing.assert_array_equal(saved[field], value)


KILL_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, "tests")
    from test_lm import lm_config
    from ramjax.train.trainer import train

    config = lm_config(sys.argv[2], sys.argv[3])
    config.train.num_steps, config.train.checkpoint_every, config.train.eval_every = 12, 1, 12
    config.train.progress = True  # the bar on stderr tells the parent how far it got
    train(config, sys.argv[1])
""")


@pytest.mark.slow
def test_sigkill_mid_lm_run_then_rerun_is_bit_identical(corpus, tmp_path):  # noqa: F811
    """SIGKILL somewhere in steps 3-10 of a 12-step LM run that checkpoints every step; the rerun ends with the
    parameters of an uninterrupted run, bit for bit (the fast sibling: the Ctrl-C test above)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    data_dir = str(tmp_path / "data")
    reference = str(tmp_path / "reference")
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, reference, str(corpus), data_dir], cwd=ROOT, env=env,
                   check=True, timeout=600, capture_output=True)
    workdir = str(tmp_path / "killed")
    kill_mid_run_then_rerun([sys.executable, "-c", KILL_SCRIPT, workdir, str(corpus), data_dir], env)
    state_ref, meta_ref = restore_final(reference)
    state, meta = restore_final(workdir)
    assert meta == meta_ref and meta["step"] == 12
    assert_trees_equal(state_ref, state)


TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, "tests")
    from ramjax.train import distributed
    if len(sys.argv) > 4:
        distributed.initialize(sys.argv[4], 2, int(sys.argv[5]))
    import jax
    import numpy as np
    from test_lm import lm_config
    from ramjax.train import evaluation
    from ramjax.train.trainer import train

    rows = []
    put_local = evaluation.Batches.put_local
    def recording(self, batch):
        rows.append(batch.inputs)
        return put_local(self, batch)
    evaluation.Batches.put_local = recording

    config = lm_config(sys.argv[2], sys.argv[3])
    config.train.num_steps, config.train.checkpoint_every, config.train.eval_every = 4, 2, 4
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = jax.process_count(), 1, 1
    if jax.process_count() == 1:
        config.train.num_steps = 6  # goes on from the two processes' checkpoint
    train(config, sys.argv[1], amend=jax.process_count() == 1)
    np.save(f"{sys.argv[1]}/rows_{jax.process_index()}_of_{jax.process_count()}.npy", np.stack(rows))
""")


# slow: ~35 s on 2 cores (three subprocesses); per-process streams and their states are tests/test_lm.py's task test,
# restart_document tests/test_lm_pipeline.py's.
@pytest.mark.slow
def test_two_processes_read_disjoint_rows_and_resume_on_one(corpus, tmp_path):  # noqa: F811
    """2 processes x 1 CPU device (jax.distributed on localhost), started on an unprepared data_dir (process 0
    prepares it while the other waits): each feeds the rows of its own stream (train_iterator(p, 2)), none
    shared; the checkpoint holds both states, and one process resumes from them at restart_document."""
    from test_multihost import cpu_env, free_port

    data_dir, workdir = str(tmp_path / "data"), tmp_path / "run"
    address = f"localhost:{free_port()}"
    script = [sys.executable, "-c", TWO_PROCESS_SCRIPT, str(workdir), str(corpus), data_dir, address]
    processes = [subprocess.Popen(script + [str(i)], cwd=ROOT, env=cpu_env(1), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=300) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
    fed = [np.load(workdir / f"rows_{p}_of_2.npy") for p in range(2)]
    task = lm.LMTask(lm_config(corpus, data_dir).data)
    for p in range(2):
        stream = task.train_iterator(p, 2)
        np.testing.assert_array_equal(fed[p], np.stack([next(stream).inputs for _ in range(4)]))
        stream.close()
    assert fed[0].shape == (4, 2, 32)
    assert not {r.tobytes() for r in fed[0].reshape(-1, 32)} & {r.tobytes() for r in fed[1].reshape(-1, 32)}
    states = [json.loads((workdir / "checkpoints" / "4" / "data" / f"process_{p}-of-2.json").read_text())
              for p in range(2)]
    assert [s["layout"]["process_index"] for s in states] == [0, 1]

    one = subprocess.run(script[:-1], cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "saved by 2 processes" in one.stdout and "resuming" in one.stdout
    document = lm_pipeline.restart_document(states)
    stream = task.train_iterator(0, 1, start=document)
    np.testing.assert_array_equal(np.load(workdir / "rows_0_of_1.npy"),
                                  np.stack([next(stream).inputs for _ in range(2)]))
    stream.close()


def test_a_mesh_that_copies_the_batch_across_processes_is_refused_for_per_process_input(monkeypatch):
    """With 2 processes whose devices would each hold all rows (here: one process that claims to be one of two),
    per-process LM input cannot be placed: a ConfigError names the mesh and what to change."""
    import jax

    from ramjax.errors import ConfigError
    from ramjax.train.evaluation import Batches

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    batches = Batches(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None)))
    batches.check_rows_split_by_process(8)  # one process: always fine
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ConfigError, match="split across the 2 processes"):
        batches.check_rows_split_by_process(8)
