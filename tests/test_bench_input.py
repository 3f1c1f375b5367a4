"""experiments/bench_input.py, the input-pipeline throughput: a tiny cpu run on a small corpus, and its results
file (newest run first, earlier runs kept)."""

import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_input", ROOT / "experiments" / "bench_input.py")
bench_input = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_input)

EARLIER = "## 2026-01-01 00:00 UTC: an earlier run\n\n| byte | 0 | 1.0 |\n"


def test_results_file_puts_the_newest_run_first_and_keeps_the_rest():
    new = "## now: this run\n"
    assert bench_input.with_earlier_runs("", new) == bench_input.TITLE + "\nNewest run first.\n\n" + new
    existing = bench_input.TITLE + "\nNotes kept on top.\n\n" + EARLIER
    assert bench_input.with_earlier_runs(existing, new) == (bench_input.TITLE + "\nNotes kept on top.\n\n" + new
                                                            + "\n" + EARLIER)
    assert bench_input.with_earlier_runs(EARLIER, new) == new + "\n" + EARLIER
    assert bench_input.with_earlier_runs("no runs yet\n", new) == "no runs yet\n\n" + new


@pytest.mark.slow  # ~8 s on 2 cores: a benchmark script, not the package; its results file is the fast test above
def test_cpu_run_measures_each_worker_count_after_preparing_the_data(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"doc{i:02d}.txt").write_text(f"document {i} " + "memory slot decay " * (10 + 7 * i))
    results = tmp_path / "input.md"
    results.write_text(bench_input.TITLE + "\nNewest run first.\n\n" + EARLIER)
    rows = bench_input.main([
        "--config", f"{ROOT}/configs/bench_input.py:cpu", "--config.tokenizers=('byte',)",
        "--config.num_workers=(0, 1)", "--config.warmup_batches=1", "--config.batches=3",
        f"--config.results_file={results}",
        f"--config.data_overrides=data.corpus_dir={corpus} data.data_dir={tmp_path / 'data'} "
        "data.validation_percent=20 data.seq_len=64 data.batch_size=4"])
    assert [(r["tokenizer"], r["num_workers"]) for r in rows] == [("byte", 0), ("byte", 1)]
    for r in rows:
        assert "error" not in r, r
        assert r["batches_per_s"] > 0 and r["first_batch_s"] > 0 and r["peak_rss_bytes"] > 2**20
        assert r["tokens_per_s"] == r["batches_per_s"] * 64 * 4
    assert rows[0]["workers_peak_rss_bytes"] is None and rows[0]["workers_seen"] == 0
    assert rows[1]["workers_peak_rss_bytes"] > 2**20 and rows[1]["workers_seen"] == 1

    text = results.read_text()
    assert text.startswith(bench_input.TITLE) and text.index("## 20") < text.index(EARLIER) and text.endswith(EARLIER)
    for key in ("device", "jax", "date", "command", "host"):
        assert re.search(rf"^- {key}: \S", text, re.M), key
    assert "prepared in this run" in text and "seq_len 64, batch 4" in text and ">= 341 batches/s" in text
    table = [line for line in text.splitlines() if line.startswith("| byte | ")]
    assert len(table) == 3 and table[0].startswith("| byte | 0 | ") and table[1].startswith("| byte | 1 | ")
    assert re.search(r"^- byte: best [\d,.]+ batches/s with num_workers [01], ", text, re.M)
