"""`ramjax sweep`: grid expansion, dry-run commands, running with skip/resume, failed runs reported, results."""

import csv
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from ramjax import sweep
from ramjax.sweep.grid import format_value
from ramjax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_product_and_zipped_expand_in_order():
    grid = sweep.product(sweep.values("a", [1, 2]),
                         sweep.zipped(sweep.values("b", ["x", "y"]), sweep.values("c", [0.1, 0.2])))
    assert grid == [{"a": 1, "b": "x", "c": 0.1}, {"a": 1, "b": "y", "c": 0.2},
                    {"a": 2, "b": "x", "c": 0.1}, {"a": 2, "b": "y", "c": 0.2}]
    with pytest.raises(ConfigError, match="equal length"):
        sweep.zipped(sweep.values("b", [1, 2]), sweep.values("c", [1]))
    with pytest.raises(ConfigError, match="swept twice"):
        sweep.product(sweep.values("a", [1]), sweep.values("a", [2]))
    with pytest.raises(ConfigError, match="at least one value"):
        sweep.values("a", [])


def test_run_names_are_unique_and_readable():
    names = [sweep.run_name(i, r) for i, r in enumerate(sweep.product(sweep.values("model.pattern", ["a,b", "c"]),
                                                                     sweep.values("optim.learning_rate", [1e-3])))]
    assert names == ["000-pattern=a,b-learning_rate=0.001", "001-pattern=c-learning_rate=0.001"]


def test_dry_run_prints_one_train_command_per_run(capsys):
    rows = sweep.sweep("configs/mqar.py:ramnet,cpu", str(ROOT / "configs" / "sweeps" / "mqar_width.py"),
                       workdir="/tmp/never_made", dry_run=True, overrides=["--config.train.num_steps=10"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rows == [] and len(lines) == 9 and not os.path.exists("/tmp/never_made")
    assert all(line.startswith("ramjax train --config=configs/mqar.py:ramnet,cpu --workdir=/tmp/never_made/")
               for line in lines)
    assert "--config.train.num_steps=10 --config.model.pattern=ramnet --config.model.d_model=64" in lines[0]


def test_bad_sweep_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        sweep.load_sweep(str(tmp_path / "missing.py"))
    path = tmp_path / "empty.py"
    path.write_text("X = 1\n")
    with pytest.raises(ConfigError, match="defines no get_sweep"):
        sweep.load_sweep(str(path))
    path = tmp_path / "typo.py"  # a syntax error: where, in one line, not importlib's traceback
    path.write_text("def get_sweep(:\n    return []\n")
    with pytest.raises(ConfigError, match=r"typo.py: line 1: .*'def get_sweep\(:'"):
        sweep.load_sweep(str(path))
    path = tmp_path / "plot.py"  # a PLOT field no run sets would drop out of the plot without a word
    path.write_text("from ramjax.sweep import values\nPLOT = {'series': ['model.patern']}\n"
                    "def get_sweep():\n    return values('model.pattern', ['ramnet', 'gla'])\n")
    with pytest.raises(ConfigError, match=r"PLOT series \['model.patern'\] is not a field any run sets"):
        sweep.load_sweep(str(path))


def test_a_sweep_file_argument_goes_to_get_sweep(tmp_path):
    """FILE.py:ARG calls get_sweep(ARG), as a config file's variant reaches get_config; the default directory
    names the argument, and a get_sweep() without a parameter refuses one."""
    path = tmp_path / "sizes.py"
    path.write_text("from ramjax.sweep import values\n"
                    "def get_sweep(size='64'):\n"
                    "    return values('model.d_model', [int(size), 2 * int(size)])\n")
    runs, _, _ = sweep.load_sweep(f"{path}:32")
    assert [r["model.d_model"] for r in runs] == [32, 64]
    assert [r["model.d_model"] for r in sweep.load_sweep(str(path))[0]] == [64, 128]
    from ramjax.sweep.grid import sweep_name
    assert sweep_name(f"{path}:32") == "sizes_32" and sweep_name(str(path)) == "sizes"
    plain = tmp_path / "plain.py"
    plain.write_text("from ramjax.sweep import values\ndef get_sweep():\n    return values('model.d_model', [8])\n")
    with pytest.raises(ConfigError, match="takes no argument"):
        sweep.load_sweep(f"{plain}:1")


def test_base_fields_reach_every_run_but_not_its_name(tmp_path):
    path = tmp_path / "pinned.py"
    path.write_text("from ramjax.sweep import values, zipped\n"
                    "BASE = {'train.ramnet_top_k_start': 32, 'train.num_steps': 10}\n"
                    "def get_sweep():\n"
                    "    return zipped(values('model.d_model', [8, 16]), values('train.num_steps', [10, 20]))\n")
    runs, _, names = sweep.load_sweep(str(path))
    assert runs == [{"train.ramnet_top_k_start": 32, "train.num_steps": 10, "model.d_model": 8},
                    {"train.ramnet_top_k_start": 32, "train.num_steps": 20, "model.d_model": 16}]  # its own wins
    assert names == ["000-d_model=8-num_steps=10", "001-d_model=16-num_steps=20"]
    path.write_text("from ramjax.sweep import values\nBASE = [1]\n"
                    "def get_sweep():\n    return values('model.d_model', [8])\n")
    with pytest.raises(ConfigError, match="BASE must be a dict"):
        sweep.load_sweep(str(path))


TINY_CONFIG = f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from tiny import tiny_config


def get_config(variant="transformer"):
    config = tiny_config(variant, steps=2)
    config.data.eval_settings = "2:32,4:32"
    config.train.on_nonfinite = "stop"  # a run whose loss turns NaN exits 3: a run that fails while training
    return config
"""

SWEEP = """
from ramjax.sweep import product, values

PLOT = {"x": "optim.learning_rate", "y": "eval/accuracy/mean", "series": ["train.inject_nan_at_step"]}


def get_sweep():
    # The second setting makes the loss NaN at step 1: that run fails, and the sweep must say so. (An invalid
    # field would not get that far: the sweep checks every run's config before it starts any.)
    return product(values("train.inject_nan_at_step", [-1, 1]), values("optim.learning_rate", [1e-3, 1e-2]))
"""


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "ramjax.cli", "sweep", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, PYTHONPATH=str(ROOT)))


# slow: ~38 s on 2 cores (eight training subprocesses); the sweep's expansion, naming, validation, launcher and
# report are the fast tests in this file.
@pytest.mark.slow
def test_sweep_runs_skips_resumes_and_reports_failures(tmp_path):
    (tmp_path / "tiny.py").write_text(TINY_CONFIG)
    (tmp_path / "grid.py").write_text(SWEEP)
    args = ("--config", "tiny.py:transformer", "--sweep", "grid.py", "--workdir", "out", "--max-parallel", "2")
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 1, first.stderr[-2000:]  # two runs failed
    said = first.stdout + first.stderr  # each run's end, its error when it fails
    assert ": failed in " in said and "stopped at step 1 (train.on_nonfinite='stop')" in said, said[-2000:]
    out = tmp_path / "out"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["finished", "finished", "failed", "failed"]
    assert all(float(r["eval/accuracy/mean"]) >= 0 for r in rows[:2])
    assert "stopped at step 1" in rows[2]["error"] and "exit code 3" in rows[2]["error"], rows[2]["error"]
    table = (out / "results.md").read_text()
    assert "| failed |" in table and "| 000-inject_nan_at_step=-1-learning_rate=0.001 | -1 | 0.001 | finished |" in table
    assert (out / "plot_eval_accuracy_mean.png").stat().st_size > 1000

    # Rerun: finished runs are skipped; an unfinished one (no summary) resumes from its checkpoint.
    (out / "001-inject_nan_at_step=-1-learning_rate=0.01" / "summary.json").unlink()
    second = run_cli(*args, cwd=tmp_path)
    assert "4 runs in out; 1 of those finished already, 3 to run" in second.stdout, second.stdout
    log = (out / "001-inject_nan_at_step=-1-learning_rate=0.01" / "train.log").read_text()
    assert "resuming" in log
    with open(out / "results.csv") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["finished", "finished", "failed", "failed"]


def test_dry_run_spreads_runs_over_devices(capsys):
    sweep.sweep("configs/mqar.py:ramnet,cpu", str(ROOT / "configs" / "sweeps" / "mqar_width.py"),
                workdir="/tmp/never_made", dry_run=True, devices=["0", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines[:3]] == ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=3",
                                                       "CUDA_VISIBLE_DEVICES=0"]
    with pytest.raises(ConfigError, match="GPU indices"):
        sweep.parse_devices("gpu0")


def test_runs_picks_part_of_the_grid_by_index(capsys, tmp_path):
    """--runs trains (here: prints) only the named runs; their names keep the whole grid's indices."""
    grid = str(ROOT / "experiments" / "sweeps" / "fig3_mqar_state_size.py:paper")
    sweep.sweep("configs/mqar.py:ramnet", grid, workdir=str(tmp_path / "never_made"), dry_run=True, only="6-8,35")
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("--workdir=")[1].split("/")[-1][:4] for line in lines] == ["006-", "007-", "008-", "035-"]
    assert sweep.runner.select_runs(None, 3) == [0, 1, 2] and sweep.runner.select_runs("2,0-1,1", 3) == [0, 1, 2]
    for bad, needle in (("36", "outside the grid's runs 0-35"), ("a-b", "not an index or a range"),
                        ("5-3", "'5-3' is a reversed range; write it low-high, as 3-5")):
        with pytest.raises(ConfigError, match=needle):
            sweep.runner.select_runs(bad, 36)


ECHO_ENV = ("import os, sys; open(sys.argv[1], 'w').write(os.environ.get('CUDA_VISIBLE_DEVICES', '') + ' ' + "
            "os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', ''))")


def test_launcher_gives_each_run_a_device_and_a_share_of_its_memory(tmp_path, monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    monkeypatch.setattr(sweep.launcher, "gpu_memory_gb", lambda device: None)  # no nvidia-smi: an even split
    launcher = sweep.Launcher(["0", "1"], max_parallel=4)
    seen = []
    for i in range(4):
        out = tmp_path / f"env{i}.txt"
        status, _ = launcher.execute([sys.executable, "-c", ECHO_ENV, str(out)], str(tmp_path / f"run{i}"))
        assert status == "unfinished"  # exit 0 without a summary.json: a stopped trainer, resumed next time
        seen.append(out.read_text())
    # Two runs per GPU: each gets 0.9 / 2 of its memory; slots are reused in order when runs are sequential.
    assert seen == ["0 0.450", "1 0.450", "0 0.450", "1 0.450"]
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.2")
    assert sweep.Launcher(["0"], max_parallel=3).memory_fraction == "0.2"  # the user's setting wins
    assert sweep.Launcher([], max_parallel=3).memory_fraction == "0.2"


SPAN = ("import sys, time; start = time.time(); time.sleep(float(sys.argv[2])); "
        "open(sys.argv[1], 'w').write(f'{start} {time.time()}')")


def test_runs_with_their_own_memory_share_start_only_when_their_gpu_has_room(tmp_path, monkeypatch):
    """A sweep file's memory_fraction(run): each process gets its run's share, and a run waits while the shares
    of the runs on its GPU (each with the ~4 GB a process holds outside XLA's pool) leave no room for it. On one
    H200 (2026-12-03) RAM-Net at d_model 256 needed ~33 GB beside runs that fit in 14."""
    import threading

    monkeypatch.setattr(sweep.launcher, "gpu_memory_gb", lambda device: 100.0)  # overhead 4 GB = 0.04 each
    launcher = sweep.Launcher([], max_parallel=3)
    spans = {}

    def run(name, share, seconds):
        out = tmp_path / f"{name}.txt"
        status, _ = launcher.execute([sys.executable, "-c", SPAN, str(out), str(seconds)], str(tmp_path / name),
                                     share)
        spans[name] = [float(v) for v in out.read_text().split()]
        assert status == "unfinished"

    # big (0.6 + 0.04) and small (0.3 + 0.04) fit together; a second big one (another 0.64) waits for the first.
    threads = [threading.Thread(target=run, args=a) for a in (("big1", "0.6", 2.0), ("small", "0.3", 2.0))]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    late = threading.Thread(target=run, args=("big2", "0.6", 0.1))
    late.start()
    for thread in threads + [late]:
        thread.join()
    assert spans["small"][0] < spans["big1"][1] and spans["big1"][0] < spans["small"][1]  # overlapped
    assert spans["big2"][0] >= spans["big1"][1]  # started after the first big run ended
    assert launcher.reserved[None] == pytest.approx(0.0)
    # The process sees its own share, not the launcher's.
    out = tmp_path / "env.txt"
    launcher.execute([sys.executable, "-c", ECHO_ENV, str(out)], str(tmp_path / "env"), "0.25")
    assert out.read_text() == " 0.25"


def test_a_gpu_budget_keeps_a_sweep_within_its_part_of_the_gpu(tmp_path, monkeypatch):
    """--gpu-budget 0.5: two runs of 0.3 (+ 0.04 outside the pool each) no longer fit side by side, and the even
    split is of half the GPU, so that another sweep can have the other half."""
    import threading

    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    monkeypatch.setattr(sweep.launcher, "gpu_memory_gb", lambda device: 100.0)
    assert float(sweep.Launcher([], max_parallel=2, gpu_budget=0.5).memory_fraction) == pytest.approx(
        (0.9 * 0.5 * 100 - 2 * sweep.launcher.PROCESS_OVERHEAD_GB) / 2 / 100, abs=1e-3)
    assert sweep.Launcher([], max_parallel=1, gpu_budget=0.5).memory_fraction == "0.410"  # one run: 45 - 4 GB
    launcher = sweep.Launcher([], max_parallel=2, gpu_budget=0.5)
    spans = {}

    def run(name, seconds):
        out = tmp_path / f"{name}.txt"
        launcher.execute([sys.executable, "-c", SPAN, str(out), str(seconds)], str(tmp_path / name), "0.3")
        spans[name] = [float(v) for v in out.read_text().split()]

    first = threading.Thread(target=run, args=("a", 1.0))
    first.start()
    time.sleep(0.3)
    run("b", 0.1)
    first.join()
    assert spans["b"][0] >= spans["a"][1]  # waited for the first
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match=r"--gpu-budget: must be a fraction in \(0, 1\]"):
            sweep.Launcher([], max_parallel=1, gpu_budget=bad)


def test_a_sweep_files_memory_fraction_reaches_each_run(tmp_path, capsys):
    grid = tmp_path / "grid.py"
    grid.write_text("from ramjax.sweep import product, values\n\n\ndef get_sweep():\n"
                    "    return product(values('model.d_model', [32, 64]), values('optim.learning_rate', [1e-3, 1e-2]))"
                    "\n\n\ndef memory_fraction(run):\n    return 0.5 if run['model.d_model'] == 64 else None\n")
    runs, _, _ = sweep.load_sweep(str(grid))
    assert sweep.memory_fractions(str(grid), runs) == [None, None, "0.5", "0.5"]
    sweep.sweep("configs/mqar.py:ramnet,cpu", str(grid), workdir=str(tmp_path / "s"), dry_run=True)
    lines = capsys.readouterr().out.splitlines()
    assert [line.startswith("XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 ramjax train") for line in lines] == \
        [False, False, True, True]
    grid.write_text(grid.read_text().replace("0.5 if", "1.5 if"))
    with pytest.raises(ConfigError, match=r"memory_fraction\(\) of run 2 .* must be a number in \(0, 1\].*got 1.5"):
        sweep.memory_fractions(str(grid), runs)


def test_a_run_out_of_its_gpu_share_says_what_to_change(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.028")
    crash = ("import sys; print('jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to "
             "allocate 3.58GiB'); sys.exit(1)")
    status, _ = sweep.Launcher(["0"], max_parallel=11).execute([sys.executable, "-c", crash], str(tmp_path / "a"))
    assert status == "failed"
    lines = [line for line in (tmp_path / "a" / "error.txt").read_text().splitlines() if line.strip()]
    summary = sweep.error_summary(lines)
    assert summary.startswith("jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to "
                              "allocate 3.58GiB (exit code 1); out of device memory at "
                              "XLA_PYTHON_CLIENT_MEM_FRACTION=0.028")
    assert "--max-parallel" in summary
    # Another failure gets no hint.
    status, _ = sweep.Launcher([], max_parallel=2).execute([sys.executable, "-c", "raise ValueError('x')"],
                                                           str(tmp_path / "b"))
    lines = (tmp_path / "b" / "error.txt").read_text().splitlines()
    assert status == "failed" and sweep.error_summary(lines) == "ValueError: x (exit code 1)"


def test_launcher_stop_passes_sigterm_on_and_starts_nothing_new(tmp_path):
    import threading

    launcher = sweep.Launcher([], max_parallel=1)
    threading.Timer(1.0, launcher.stop).start()
    status, seconds = launcher.execute([sys.executable, "-c", "import time; time.sleep(60)"], str(tmp_path / "a"))
    assert status == "unfinished" and seconds < 30
    assert launcher.execute([sys.executable, "-c", "pass"], str(tmp_path / "b")) == ("not started", 0.0)
    assert not (tmp_path / "a" / "error.txt").exists()


def test_report_shows_unfinished_runs_at_their_last_evaluation(tmp_path):
    (tmp_path / "grid.py").write_text(SWEEP)
    runs, _, names = sweep.load_sweep(str(tmp_path / "grid.py"))
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="no sweep directory"):
        sweep.sweep("tiny.py", str(tmp_path / "grid.py"), workdir=str(out), report_only=True)
    run = out / names[0]
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 10, "train/loss": 2.0}\n{"step": 20, "eval/accuracy/mean": 0.25}\n'
                                       '{"step": 30, "train/loss": 1.5}\n{"step": 40, "eval/acc')  # cut by a kill
    rows = sweep.sweep("tiny.py", str(tmp_path / "grid.py"), workdir=str(out), report_only=True)
    assert rows[0]["status"] == "unfinished" and rows[0]["eval_step"] == 20
    assert rows[0]["eval/accuracy/mean"] == 0.25
    assert [r["status"] for r in rows[1:]] == ["new"] * 3
    assert "| unfinished |" in (out / "results.md").read_text()


def test_report_gives_a_multi_seed_runs_best_of_each_seed(tmp_path):
    """Each seed's best evaluation so far (mean +- std over seeds, the worst seed's best), and a Markdown table
    without the per-seed columns (they stay in the CSV)."""
    (tmp_path / "grid.py").write_text(SWEEP)
    runs, _, names = sweep.load_sweep(str(tmp_path / "grid.py"))
    out = tmp_path / "out"
    run = out / names[0]
    run.mkdir(parents=True)
    seed = "eval/accuracy/mean/seed_"
    rows = [{"step": 100, "eval/accuracy/mean": 0.5, f"{seed}0": 0.2, f"{seed}1": 0.8},
            {"step": 200, "eval/accuracy/mean": 0.45, f"{seed}0": 0.6, f"{seed}1": 0.3}]
    (run / "config.json").write_text(json.dumps({"train": {"num_seeds": 2}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3')
    row = sweep.sweep("tiny.py", str(tmp_path / "grid.py"), workdir=str(out), report_only=True)[0]
    assert row["best/accuracy/mean"] == pytest.approx(0.7) and row["best/accuracy/std"] == pytest.approx(0.1)
    assert row["best/accuracy/min"] == 0.6 and row["best/accuracy/per_seed"] == "0.600 0.800"
    assert row["eval_step"] == 200 and row["eval/accuracy/mean/seed_0"] == 0.6  # the last evaluation too
    table = (out / "results.md").read_text()
    assert "best/accuracy/mean" in table and "seed_0" not in table
    assert "eval/accuracy/mean/seed_0" in (out / "results.csv").read_text()


def test_figure_3_in_zoologys_layout_puts_a_base_conv_layer_before_every_mixer(tmp_path):
    """fig3_mqar_state_size.py:zoology: the paper grid's 36 programs as Zoology builds MQAR models (BaseConv, then
    the mixer, no MLP); RAM-Net without its own conv and with the top-K anneal added; the state is one mixer's."""
    from ramjax.configs import load_config
    from ramjax.models.state_size import recurrent_state_size

    paper, _, _ = sweep.load_sweep(str(ROOT / "experiments" / "sweeps" / "fig3_mqar_state_size.py:paper"))
    grid = str(ROOT / "experiments" / "sweeps" / "fig3_mqar_state_size.py:zoology")
    zoology, _, names = sweep.load_sweep(grid)
    assert len(zoology) == 36
    for before, after in zip(paper, zoology):
        mixer = before["model.pattern"]
        assert after["model.pattern"] == f"base_conv,{mixer}" and after["model.feed_forward"] is False
        assert {k: after[k] for k in before if k != "model.pattern"} == {k: v for k, v in before.items()
                                                                         if k != "model.pattern"}
        assert (after.get("model.ramnet.short_conv"), after.get("train.ramnet_top_k_start")) == (
            (0, 32) if mixer == "ramnet" else (None, None))
    config = load_config("configs/mqar.py:ramnet", [f"{k}={format_value(v)}" for k, v in zoology[2].items()])
    assert recurrent_state_size(config.model, 1024) == 4 * 1024 * 65  # one RAM-Net layer at d_v 64
    sweep.sweep("configs/mqar.py:ramnet", grid, workdir=str(tmp_path / "never_made"), dry_run=True, only="2,8,14,20,26,32")
    assert not (tmp_path / "never_made").exists()


def test_an_unfinished_runs_state_size_comes_from_its_config_and_the_plot_skips_runs_without_it(tmp_path):
    """Figure 3's x axis is a result column (state_size) that only a finished run's summary held: a report of a
    part-trained grid raised KeyError (2026-12-03). An unfinished run's comes from its config.json; one without a
    config is left out of the plot, not fatal."""
    from ramjax.configs import load_config

    grid = str(ROOT / "experiments" / "sweeps" / "fig3_mqar_state_size.py:paper")
    runs, _, names = sweep.load_sweep(grid)
    out = tmp_path / "out"
    for i in (2, 8):  # RAM-Net and GLA at d_model 128: with a config; 14 (Mamba-2): none
        config = load_config("configs/mqar.py:ramnet", [f"{k}={v}" for k, v in runs[i].items()])
        (out / names[i]).mkdir(parents=True)
        (out / names[i] / "config.json").write_text(config.to_json())
    for i in (2, 8, 14):
        (out / names[i]).mkdir(parents=True, exist_ok=True)
        (out / names[i] / "metrics.jsonl").write_text(json.dumps({"step": 500, "eval/accuracy/mean": 0.5}) + "\n")
    rows = sweep.sweep("configs/mqar.py:ramnet", grid, workdir=str(out), report_only=True)
    assert rows[2]["state_size"] == 2 * 4 * 1024 * 65  # 2 layers x 4 heads x M 1024 x (d_v 64 + 1)
    assert rows[8]["state_size"] == 4096  # GLA at d_model 128, as its finished runs' summaries say
    assert rows[14]["status"] == "unfinished" and rows[14]["state_size"] is None
    assert list(out.glob("plot_*.png"))


def test_best_rows_keeps_the_best_run_of_each_combination():
    rows = [{"model": "a", "lr": 1e-2, "acc": 0.1}, {"model": "a", "lr": 3e-3, "acc": 0.7},
            {"model": "b", "lr": 1e-2, "acc": 0.5}, {"model": "b", "lr": 3e-3, "acc": None},
            {"model": "c", "lr": 1e-2}]
    best = sweep.best_rows(rows, "acc", ["model"])
    assert sorted((r["model"], r["lr"]) for r in best) == [("a", 3e-3), ("b", 1e-2)]


def test_dry_run_validates_every_run_first(tmp_path, capsys):
    grid = str(ROOT / "configs" / "sweeps" / "mqar_width.py")
    with pytest.raises(ConfigError, match="model.no_such_field|no_such_field"):
        sweep.sweep("configs/mqar.py:ramnet,cpu", grid, workdir=str(tmp_path / "s"), dry_run=True,
                    overrides=["--config.model.no_such_field=3"])
    with pytest.raises(ConfigError, match="model.ramnet.impl: must be one of"):
        sweep.sweep("configs/mqar.py:ramnet,cpu", grid, workdir=str(tmp_path / "s"), dry_run=True,
                    overrides=["--config.model.ramnet.impl=fast"])
    with pytest.raises(ConfigError, match="nope.py"):
        sweep.sweep("configs/nope.py", grid, workdir=str(tmp_path / "s"), dry_run=True)
    # the train, optim and data fields too: the checks `ramjax train` makes before building anything
    for override, needle in (("optim.schedule=cosine_typo", "optim.schedule: must be one of .*got 'cosine_typo'"),
                             ("train.num_steps=0", "train.num_steps: must be a positive integer, got 0"),
                             ("data.mixture=zzz", "data.mixture: must be one of .*got 'zzz'"),
                             ("train.keep_checkpoints=0", "train.keep_checkpoints: must be a positive integer"),
                             ("train.early_stop_accuracy=2.0", "train.early_stop_accuracy: must be in \\[0, 1\\]")):
        with pytest.raises(ConfigError, match=f"run 000-.*: {needle}"):
            sweep.sweep("configs/mqar.py:ramnet,cpu", grid, workdir=str(tmp_path / "s"), dry_run=True,
                        overrides=[f"--config.{override}"])
    assert capsys.readouterr().out == ""  # nothing printed before the error


def test_the_paper_regime_sweeps_train_two_seeds_per_program_with_the_method_on():
    """Issue 16 section 4: Figure 3 (6 models x 3 widths x 2 learning rates) and Figure 4 (7 rows) in the paper's
    regime, each program with seeds 0 and 1 (train.num_seeds); Figure 4's factor schedule starts from about 64
    slots whatever d_p, and U = 1 (no factor to hold) anneals top-K instead."""
    fig3, _, _ = sweep.load_sweep(str(ROOT / "experiments" / "sweeps" / "fig3_mqar_state_size.py:paper"))
    assert len(fig3) == 39 and all(run["train.num_seeds"] == 2 for run in fig3)
    # RAM-Net at the baselines' state sizes, after the 36 runs of the grid (whose indices stay)
    assert [(r["model.ramnet.num_factors"], r["model.ramnet.d_v"]) for r in fig3[36:]] == [(3, 16), (4, 16), (4, 32)]
    assert fig3[2]["model.pattern"] == "ramnet" and fig3[2]["model.d_model"] == 128
    assert not any("train.init_seed" in run or "data.seed" in run for run in fig3)
    fig4, _, _ = sweep.load_sweep(str(ROOT / "experiments" / "sweeps" / "fig4_ramnet_ablations.py:paper"))
    starts = {(r["model.ramnet.num_factors"], r["model.ramnet.factor_size"]):
              (r["train.ramnet_factors_start"], r["train.ramnet_top_k_start"]) for r in fig4}
    assert starts == {(1, 1024): (0, 32), (2, 32): (1, 0), (5, 4): (3, 0), (10, 2): (6, 0), (4, 4): (3, 0),
                      (6, 4): (3, 0)}
    assert all(run["train.num_seeds"] == 2 for run in fig4) and len(fig4) == 7
    # lr 3e-3: at the config's former 1e-3 no row learned in 3000 steps (2026-12-03)
    assert all(run["optim.learning_rate"] == 3e-3 for run in fig4)
    # evaluation is not microbatched: the d_v 256 row evaluates in small batches (it ran out of memory at 125)
    assert [run.get("data.eval_batch_size") for run in fig4] == [None, None, None, None, 25, None, None]
    with pytest.raises(ValueError, match="unknown regime 'papr'"):
        sweep.load_sweep(str(ROOT / "experiments" / "sweeps" / "fig4_ramnet_ablations.py:papr"))


def test_fig4_paper_both_adds_the_top_k_anneal_to_the_factor_schedule_with_more_microbatches():
    """`paper_both`: each row of `paper` plus top-K 32 -> 8 over 500 steps (U = 1 unchanged: it anneals already);
    the K-32 steps are split into more microbatches (with d_v) and the rows declare larger memory shares."""
    path = str(ROOT / "experiments" / "sweeps" / "fig4_ramnet_ablations.py")
    paper, _, _ = sweep.load_sweep(path + ":paper")
    both, _, _ = sweep.load_sweep(path + ":paper_both")
    assert len(both) == len(paper) == 7
    assert both[0] == paper[0]  # U = 1
    for one, two in zip(paper[1:], both[1:]):
        assert two["train.ramnet_factors_start"] == one["train.ramnet_factors_start"] > 0
        assert (two["train.ramnet_top_k_start"], two["train.ramnet_top_k_anneal_steps"]) == (32, 500)
        assert two["train.microbatches"] >= max(4, one["train.microbatches"])
    assert [run["train.microbatches"] for run in both] == [4, 4, 4, 4, 16, 4, 4]
    shares = sweep.memory_fractions(path + ":paper_both", both)
    assert shares == ["0.35"] + ["0.2"] * 6
    fast, _, _ = sweep.load_sweep(path + ":paper_lr1e-2")  # the paper rows at another rate, nothing else
    assert [dict(run, **{"optim.learning_rate": 3e-3}) for run in fast] == paper
    assert all(run["optim.learning_rate"] == 1e-2 for run in fast)


def test_a_sweep_directory_refuses_other_overrides(tmp_path):
    (tmp_path / "s").mkdir()
    record = {"config": "configs/mqar.py:cpu", "overrides": ["--config.optim.learning_rate=0.01"], "runs": []}
    (tmp_path / "s" / "sweep.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"overrides: \['--config.optim.learning_rate=0.01'\] -> \[\]"):
        sweep.check_sweep_record(str(tmp_path / "s"), dict(record, overrides=[]))
    sweep.check_sweep_record(str(tmp_path / "s"), record)  # the same settings: fine


def test_runs_sharing_the_default_device_share_its_memory(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    monkeypatch.setattr(sweep.launcher, "gpu_memory_gb", lambda device: None)
    assert sweep.Launcher([], max_parallel=6).memory_fraction == f"{0.9 / 6:.3f}"
    assert sweep.Launcher([], max_parallel=1).memory_fraction is None


def test_a_gpus_share_leaves_room_for_each_process_outside_the_pool(monkeypatch):
    """12 runs on an H200 (~150 GB): 90% less 12 x 4 GB, split 12 ways, not 0.9 / 12 (which ran out of memory)."""
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    asked = []
    monkeypatch.setattr(sweep.launcher, "gpu_memory_gb", lambda device: asked.append(device) or 150.0)
    share = float(sweep.Launcher([], max_parallel=12).memory_fraction)
    assert share == pytest.approx((0.9 * 150 - 12 * sweep.launcher.PROCESS_OVERHEAD_GB) / 12 / 150, abs=1e-3)
    assert share * 12 * 150 + 12 * sweep.launcher.PROCESS_OVERHEAD_GB <= 0.9 * 150 + 0.1
    assert float(sweep.Launcher(["2", "3"], max_parallel=4).memory_fraction) > share and asked[-1] == "2"
    with pytest.raises(ConfigError, match=r"--max-parallel: 40 runs on one GPU of 150 GB"):
        sweep.Launcher([], max_parallel=40)


def test_failed_run_error_is_the_exception_not_the_progress_bar():
    lines = ["exit code 1", "train:  40%|####  | 4/10\rtrain:  50%|#####  | 5/10", "Traceback (most recent call last):",
             '  File "x.py", line 1', "RuntimeError: out of memory allocating 12 GB", "train:  50%|#####  | 5/10"]
    assert sweep.error_summary(lines) == "RuntimeError: out of memory allocating 12 GB (exit code 1)"


def test_a_plot_field_the_sweep_does_not_vary_falls_back_to_one_it_does(tmp_path, capsys):
    """experiments/sweeps/adaptive_decay_fork.py:modes fixes the PLOT's x (data.train_settings) in the config:
    the report still writes its table and a plot, against the lambda mode, instead of a KeyError."""
    from ramjax.sweep.results import plot_fields

    fork = ROOT / "experiments" / "sweeps" / "adaptive_decay_fork.py"
    runs, plot, names = sweep.load_sweep(f"{fork}:modes")
    x, ys, series, best_over = plot_fields(plot, ["model.loglinear.mode"])  # the field it varies
    assert x == "model.loglinear.mode" and series == [] and best_over == []
    assert "not varied by this sweep" in capsys.readouterr().out
    out = tmp_path / "out"
    for i, name in enumerate(names):
        (out / name).mkdir(parents=True)
        (out / name / "metrics.jsonl").write_text(json.dumps({"step": 100, "eval/accuracy/mean": 0.1 * i}) + "\n")
    rows = sweep.sweep(str(ROOT / "configs" / "adaptive_decay.py") + ":mqar_length", f"{fork}:modes",
                       workdir=str(out), report_only=True)
    assert [r["status"] for r in rows] == ["unfinished"] * 3
    assert (out / "results.md").exists() and list(out.glob("plot_*.png"))
