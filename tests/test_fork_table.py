"""experiments/fork_table.py: issue 21's per-seed table (best and final evaluation, seeds that reached the
threshold and when) from multi-seed runs' metrics, runs cut short included."""

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fork_table", ROOT / "experiments" / "fork_table.py")
fork_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fork_table)


def write_run(directory, mode, block, evaluations, num_steps=20000):
    directory.mkdir(parents=True)
    config = {"task": "mqar", "model": {"block": block, "loglinear": {"mode": mode}},
              "data": {"train_settings": "32:128", "eval_settings": "32:256"},
              "train": {"num_seeds": 3, "num_steps": num_steps}}
    (directory / "config.json").write_text(json.dumps(config))
    lines = [json.dumps({"step": 50, "train/loss": 3.0})]
    for step, accs in evaluations:
        lines.append(json.dumps({"step": step, "eval/accuracy/mean": sum(accs) / 3,
                                 **{f"eval/accuracy/mean/seed_{i}": a for i, a in enumerate(accs)}}))
    (directory / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4')  # torn by a kill


def test_table_gives_best_final_and_first_steps_per_seed(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    write_run(sweep / "000-mode=linear", "linear", "post_norm",
              [(100, [0.1, 0.995, 0.2]), (200, [0.3, 0.5, 0.99]), (300, [0.2, 0.999, 0.991])])
    write_run(sweep / "001-mode=mlp_softplus", "mlp_softplus", "pre_norm", [(100, [0.0, 0.0, 0.0])])
    (sweep / "002-not-started").mkdir()
    text = fork_table.main([str(sweep)])
    lines = text.splitlines()
    assert len(lines) == 4 and "median step a seed first reached 0.99" in lines[0]
    linear = lines[2].split(" | ")
    assert linear[:4] == ["| linear", "fork", "mqar 32:128 -> 32:256", "300 of 20000"]
    assert linear[4] == "0.730 +- 0.375"  # final: 0.2, 0.999, 0.991
    assert linear[5] == "0.763 +- 0.328"  # best: 0.3, 0.999, 0.991
    assert linear[6:9] == ["2 of 3", "150", "0.30 1.00 0.99 |"]  # seeds 1 and 2 first reached 0.99 at 100 and 200
    assert lines[3].startswith("| mlp_softplus | ours |") and "| 0 of 3 | - |" in lines[3]
    results = tmp_path / "results.md"
    fork_table.main([str(sweep / "000-mode=linear"), "--results", str(results), "--title", "length test"])
    written = results.read_text()
    assert "## length test (tabulated" in written and "fork_table.py" in written and "| linear | fork |" in written


_curves_spec = importlib.util.spec_from_file_location("eval_curves", ROOT / "experiments" / "eval_curves.py")
eval_curves = importlib.util.module_from_spec(_curves_spec)
_curves_spec.loader.exec_module(eval_curves)


def test_eval_curves_reads_seeds_resumed_steps_and_labels_with_equals(tmp_path):
    """experiments/eval_curves.py: a label may contain '=' ('U = 5'); a resumed run's re-evaluated step keeps its
    later value; the CSV has each seed and their mean."""
    run = tmp_path / "000-num_factors=5"
    write_run(run, "linear", "pre_norm", [(500, [0.0, 0.1, 0.2]), (1000, [0.5, 0.5, 0.5]), (1000, [0.9, 0.6, 0.3])])
    label, run_dir = eval_curves.split_argument(f"U = 5={run}")
    assert (label, run_dir) == ("U = 5", str(run))
    rows = eval_curves.curve(run_dir)
    assert [row["step"] for row in rows] == [500, 1000]
    assert rows[1]["seeds"] == [0.9, 0.6, 0.3] and abs(rows[1]["mean"] - 0.6) < 1e-12
    path = tmp_path / "curves.csv"
    eval_curves.write_csv(str(path), {label: rows})
    assert path.read_text().splitlines()[1:] == ["U = 5,500,0.1000,0.0000,0.1000,0.2000",
                                                 "U = 5,1000,0.6000,0.9000,0.6000,0.3000"]
    try:
        eval_curves.split_argument(f"U = 5={tmp_path / 'missing'}")
    except SystemExit as error:
        assert "RUN_DIR" in str(error)
    else:
        raise AssertionError("a missing run directory must be refused")
