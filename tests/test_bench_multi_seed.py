"""experiments/bench_multi_seed.py: steps/s of train.num_seeds = 1, N in the real training loop, and the table's
ratios (step time against one seed's; gain, the seed-steps/s against one seed's)."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_multi_seed", ROOT / "experiments" / "bench_multi_seed.py")
bench_multi_seed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_multi_seed)


def cells(text):
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in text.splitlines()[2:]]


def test_table_ratios_against_the_fewest_seeds():
    rows = [{"num_seeds": 8, "steps_per_s": 100.0}, {"num_seeds": 1, "steps_per_s": 200.0},
            {"num_seeds": 4, "steps_per_s": 50.0}]
    got = cells(bench_multi_seed.table(rows))
    # 8 seeds at half the single seed's steps/s: 800 seed-steps/s, step time x 2, gain 4
    assert got[0] == ["8", "100.0", "800.0", "2.00", "4.00"]
    assert got[1] == ["1", "200.0", "200.0", "1.00", "1.00"]
    assert got[2] == ["4", "50.0", "200.0", "4.00", "1.00"]  # four seeds cost what four single runs do
    # without a one-seed row the base is the fewest seeds measured
    got = cells(bench_multi_seed.table([{"num_seeds": 2, "steps_per_s": 10.0}, {"num_seeds": 4, "steps_per_s": 10.0}]))
    assert got[1] == ["4", "10.0", "40.0", "1.00", "2.00"]


def test_run_config_fixes_the_steps_and_drops_early_stop():
    config = bench_multi_seed.run_config(str(ROOT / "configs" / "adaptive_decay.py:mqar"), ["model.d_model=32"],
                                         num_seeds=4, steps=300, log_every=50)
    t = config.train
    assert (t.num_seeds, t.num_steps, t.log_every, t.eval_every, t.checkpoint_every) == (4, 300, 50, 300, 300)
    assert t.early_stop_accuracy == 0.0 and config.model.d_model == 32


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "1,0"], "--seeds"),
    (["--seeds", "one"], "--seeds"),
    (["--steps", "150", "--log_every", "100"], "twice --log_every"),
    (["--bogus"], "unrecognised arguments: --bogus"),
])
def test_bad_arguments_name_what_is_wrong(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_multi_seed.parse_args(argv)
    assert message in capsys.readouterr().err


def test_measures_each_num_seeds_and_appends_the_results(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    results = tmp_path / "results.md"
    text = bench_multi_seed.main(["--seeds", "1,2", "--steps", "4", "--log_every", "2", "--results", str(results),
                                  "--config.data.batch_size=8", "--config.data.eval_examples=16",
                                  "--config.data.eval_batch_size=16", "--config.model.num_layers=1"])
    got = cells(text)
    assert [row[0] for row in got] == ["1", "2"]
    assert all(float(row[1]) > 0 for row in got) and got[0][3:] == ["1.00", "1.00"]
    written = results.read_text()
    assert "## Many seeds in one program: configs/adaptive_decay.py:mqar, 4 steps per run" in written
    assert "- device:" in written and "- command: `python experiments/bench_multi_seed.py --seeds 1,2" in written
    assert text in written
