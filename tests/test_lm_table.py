"""experiments/lm_table.py: tabulating run directories and redrawing from the saved JSON (no training here)."""

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lm_table", ROOT / "experiments" / "lm_table.py")
lm_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lm_table)


def _fake_run(directory: pathlib.Path, steps: int, loss: float) -> None:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"data": {"batch_size": 4, "seq_len": 8},
                                                       "train": {"num_steps": steps}, "model": {"pattern": "x"}}))
    (directory / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "train/loss": 3.0, "train/tokens_per_s": rate}) + "\n"
        for s, rate in [(10, 1.0), (20, 100.0), (30, 300.0)]))  # the first interval (compilation) is dropped
    (directory / "summary.json").write_text(json.dumps({"parameters": 1234, "wall_s": 5.0}))
    (directory / "eval_validation.json").write_text(json.dumps(
        {"step": steps, "loss": loss, "bits_per_byte": loss / 0.693, "windows": 2, "per_position_loss": [loss] * 8}))


def test_table_from_run_directories_and_from_json(tmp_path):
    _fake_run(tmp_path / "runs" / "ramnet", 30, 1.0)
    (tmp_path / "runs" / "transformer").mkdir()  # a run that never started: a row of dashes, not a crash
    records = lm_table.collect(str(tmp_path / "runs"), ["ramnet", "transformer"], {"ramnet": 500.0})
    assert records[0]["tokens"] == 30 * 4 * 8 and records[0]["tokens_per_s"] == 200.0
    assert records[0]["tokens_per_s_alone"] == 500.0 and records[1].get("val_loss") is None
    results = tmp_path / "out" / "table.md"
    results.parent.mkdir()
    lm_table.write(records, "# header\n", str(results))
    text = results.read_text()
    assert "| ramnet | 1,234 | 30 | 0.0 M | 1.0000 | 1.4430 | 3.0000 | 200 | 500 |" in text
    assert "| transformer | - | - | - |" in text
    saved = json.loads((tmp_path / "out" / "table.json").read_text())
    assert saved["header"] == "# header\n" and saved["records"][0]["per_position_loss"] == [1.0] * 8
    results.write_text(results.read_text() + "\nOur notes.\n")  # below the marker: kept on a rewrite
    lm_table.write(records, "# header 2\n", str(results))
    assert results.read_text().startswith("# header 2\n") and results.read_text().endswith("\nOur notes.\n")
