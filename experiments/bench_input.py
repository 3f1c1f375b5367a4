"""Input throughput: batches per second of the language-model input pipeline, as `ramjax train` reads it.

  python experiments/bench_input.py --config configs/bench_input.py:gpu      # on the training host
  python experiments/bench_input.py --config configs/bench_input.py:cpu      # 2 cores: workers (0, 1)
  python experiments/bench_input.py --config configs/bench_input.py:cpu --config.tokenizers="('byte',)" \
      --config.num_workers="(0, 1, 2)" --config.batches=1000

Each row is one (tokenizer, data.num_workers): the configs/lm.py data settings (seq_len 1024, batch 32, the stdlib
corpus; configs/bench_input.py), the pipeline of ramjax/data/lm_pipeline.py through `LMTask.train_iterator()`
(one process reading the whole global batch). Preparation (building the dataset, training the SentencePiece
model) happens first, once per tokenizer, and is timed apart: it is not part of the throughput. Each row then
runs in a fresh process, so that its peak memory and its time to the first batch are its own and no earlier
row's threads or workers compete with it: it builds the iterator, takes the first batch
(timed: pipeline start-up, worker processes included), `warmup_batches` more, then times `batches` batches, each
followed by get_state() as the trainer does after every step (the iterator state its checkpoints hold). The
Markdown results file gets this run's section on top; earlier runs stay below it.

Options: --config FILE[:VARIANT] and --config.FIELD=VALUE (e.g. --config.num_workers="(0, 2)",
--config.data_overrides="data.data_dir=/tmp/ramjax_data", --config.results_file=...).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shlex
import subprocess
import sys
import tempfile
import time

import ml_collections
from absl import flags
from ml_collections import config_flags

from ramjax import timing
from ramjax.configs import error_message, load_config, override
from ramjax.data import lm
from ramjax.data.local_text import local_text_builder
from ramjax.data.tokenizers import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TITLE = "# Input pipeline throughput: language-model batches per second\n"


# --- the data config and its preparation ---------------------------------------------------------------------------


def data_config(bench, tokenizer: str) -> ml_collections.ConfigDict:
    """The data section of bench.data_config with bench.data_overrides, for `tokenizer`."""
    path, sep, variant = bench.data_config.partition(":")
    config = load_config(os.path.join(ROOT, path) + sep + variant if not os.path.isabs(path) else bench.data_config)
    override(config, shlex.split(bench.data_overrides))
    d = config.data
    d.tokenizer = tokenizer
    d.vocab_size = ByteTokenizer.vocab_size if tokenizer == "byte" else int(bench.sentencepiece_vocab_size)
    return d


def is_prepared(d) -> bool:
    """Whether the dataset (and the SentencePiece model) are already in data.data_dir."""
    try:
        lm.make_tokenizer(d, train_if_missing=False)  # a missing SentencePiece model: ValueError
    except ValueError:
        return False
    if d.dataset != "local_text":
        return True  # tfds:NAME is prepared elsewhere (LMTask refuses one that is not)
    return local_text_builder(corpus_dir=d.corpus_dir or None, data_dir=lm.source_dir(d),
                              validation_percent=d.validation_percent).is_prepared()


def prepare(d) -> dict:
    """Prepares what `d` reads if it is not yet (as `ramjax prepare` would); returns its seconds and what it did."""
    prepared = is_prepared(d)
    start = time.perf_counter()
    task = lm.LMTask(d)  # checks the corpus, trains the SentencePiece model if missing
    documents = len(task.source("train"))  # builds the dataset if missing
    return {"prepare_s": time.perf_counter() - start, "already_prepared": prepared, "documents": documents,
            "source_dir": lm.source_dir(d)}


# --- one row, in its own process -----------------------------------------------------------------------------------


def peak_rss_bytes(pid: int | str = "self") -> int | None:
    """A process's peak resident memory, VmHWM in /proc/PID/status; None without /proc (not Linux). Not
    getrusage's ru_maxrss: Linux carries that high-water mark across fork and exec, so a process started by
    another reports at least the other's peak (each row would show this script's SentencePiece training, each
    worker the row's process)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure(d, warmup_batches: int, batches: int) -> dict:
    """Reads `batches` batches of LMTask(d).train_iterator() after the first one and `warmup_batches` more."""
    task = lm.LMTask(d)
    task.source("train")  # opened before the clock starts: preparation is timed apart
    start = time.perf_counter()
    iterator = task.train_iterator()
    first = next(iterator)
    iterator.get_state()
    first_batch_s = time.perf_counter() - start
    expected = (d.batch_size, d.seq_len)
    if first.inputs.shape != expected:
        raise ValueError(f"batches of shape {first.inputs.shape}, expected {expected}")
    for _ in range(warmup_batches):
        next(iterator)
        iterator.get_state()
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
        iterator.get_state()  # the trainer keeps the state before every step (its checkpoints save it)
    elapsed = time.perf_counter() - start
    # grain's workers are this process's multiprocessing children; read their peaks while they still run.
    workers = [peak_rss_bytes(child.pid) for child in multiprocessing.active_children()]
    iterator.close()
    return {"batches_per_s": batches / elapsed, "tokens_per_s": batches * d.batch_size * d.seq_len / elapsed,
            "first_batch_s": first_batch_s, "peak_rss_bytes": peak_rss_bytes(), "workers_seen": len(workers),
            "workers_peak_rss_bytes": sum(workers) if workers and None not in workers else None}


def measure_in_fresh_process(d, bench) -> dict:
    """`measure` in a new Python process running this script (--measure); a failure becomes row["error"]."""
    with tempfile.TemporaryDirectory() as directory:
        out = os.path.join(directory, "row.json")
        spec = {"data": d.to_dict(), "warmup_batches": bench.warmup_batches, "batches": bench.batches, "out": out}
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", json.dumps(spec)],
                              capture_output=True, text=True)
        if done.returncode or not os.path.exists(out):
            lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
            return {"error": f"exit {done.returncode}: {lines[-1].strip() if lines else 'no output'}"[:240]}
        with open(out) as f:
            return json.load(f)


def measure_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    row = measure(ml_collections.ConfigDict(spec["data"]), spec["warmup_batches"], spec["batches"])
    with open(spec["out"], "w") as f:
        json.dump(row, f)


# --- the results file ----------------------------------------------------------------------------------------------


def _mb(value) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def total_rss_bytes(row: dict) -> int | None:
    """The row's process and its workers together (each at its own peak: an upper bound on the host's)."""
    if row["peak_rss_bytes"] is None or (row["num_workers"] and row["workers_peak_rss_bytes"] is None):
        return None
    return row["peak_rss_bytes"] + (row["workers_peak_rss_bytes"] or 0)


def table(rows: list[dict], target: float) -> str:
    lines = ["| tokenizer | num_workers | batches/s | tokens/s | x target | first batch s | peak RSS MB: main | "
             "workers | total | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tokenizer']} | {r['num_workers']} | - | - | - | - | - | - | - | "
                         f"{r['error'].replace('|', '/')} |")
            continue
        note = (f"{r['workers_seen']} worker processes found" if r["workers_seen"] != r["num_workers"] else "")
        lines.append(f"| {r['tokenizer']} | {r['num_workers']} | {r['batches_per_s']:,.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['batches_per_s'] / target:.2f}x | {r['first_batch_s']:.2f} | "
                     f"{_mb(r['peak_rss_bytes'])} | {_mb(r['workers_peak_rss_bytes'])} | {_mb(total_rss_bytes(r))} | "
                     f"{note} |")
    return "\n".join(lines)


def verdict(rows: list[dict], target: float) -> str:
    measured = [r for r in rows if "error" not in r]
    if not measured:
        return "No row measured."
    lines = []
    for tokenizer in dict.fromkeys(r["tokenizer"] for r in measured):
        best = max((r for r in measured if r["tokenizer"] == tokenizer), key=lambda r: r["batches_per_s"])
        met = "meets" if best["batches_per_s"] >= target else "below"
        lines.append(f"- {tokenizer}: best {best['batches_per_s']:,.1f} batches/s with num_workers "
                     f"{best['num_workers']}, {best['batches_per_s'] / target:.2f}x the target ({met})")
    return "\n".join(lines)


def run_header(bench, command: str, d, preparation: dict, load_before: float) -> str:
    """The head of this run's section of the results file: date, versions, command, settings, preparation.
    `load_before`: the host's load average before the run (the pipeline runs on the host's CPUs only: other jobs
    there slow it)."""
    env = timing.environment()
    corpus = lm.source_facts(d)["corpus_dir"] if d.dataset == "local_text" else d.dataset
    source = next(iter(preparation.values()))  # the same dataset whatever the tokenizer
    prepared = "; ".join(f"{tokenizer}: {p['prepare_s']:.1f} s ("
                         + ("already prepared, opening only" if p["already_prepared"] else "prepared in this run") + ")"
                         for tokenizer, p in preparation.items())
    lines = [
        f"## {env['date']}: {', '.join(bench.tokenizers)}; num_workers {', '.join(map(str, bench.num_workers))}; "
        f"{d.seq_len} x {d.batch_size}",
        "",
        timing.environment_lines(command).rstrip("\n"),
        f"- host: {os.cpu_count()} CPU cores; 1-minute load average {load_before:.1f} before this run",
        "",
        f"Data: `{bench.data_config}`" + (f" with {bench.data_overrides}" if bench.data_overrides else "")
        + f": data.dataset {d.dataset} ({corpus}), {source['documents']:,} train documents, prepared in "
        f"{source['source_dir']}; seq_len {d.seq_len}, batch {d.batch_size} (global, one process reads it all), "
        f"seed {d.seed}" + (f"; sentencepiece vocabulary {bench.sentencepiece_vocab_size}"
                            if "sentencepiece" in bench.tokenizers else "") + ".",
        "",
        f"Preparation, timed apart (not in the throughput): {prepared}.",
        "",
        "Each row, in a fresh process: `LMTask(data).train_iterator()` as `ramjax train` builds it; first batch s = "
        "from building the iterator to its first batch (grain threads and worker processes starting); then "
        f"{bench.warmup_batches} warm-up batches and {bench.batches} timed ones, each followed by get_state() as the "
        "trainer does every step. tokens/s = batches/s x seq_len x batch. Peak RSS (VmHWM in /proc): of the row's "
        "process (main) and the sum over its grain worker processes (read before they stop); total = main + "
        "workers, each at its own peak.",
        "",
        f"Target: >= {bench.target_batches_per_s:g} batches/s (target_batches_per_s; configs/bench_input.py's 341 "
        "is 10x the fastest model's steps/s at context 1024: the transformer's 1,116,460 tokens/s at 1024 x 32 on "
        "one H200, experiments/results/bench_models.md, the 2026-12-01 00:37 run).",
    ]
    return "\n".join(lines) + "\n"


def with_earlier_runs(existing: str, new_section: str) -> str:
    """The results file with `new_section` as its newest run: the file's preamble (the title, any notes above
    the first run), this run, then every earlier run as it was."""
    if not existing.strip():
        return TITLE + "\nNewest run first.\n\n" + new_section
    first_run = 0 if existing.startswith("## ") else existing.find("\n## ") + 1
    if not first_run and not existing.startswith("## "):  # no run in it yet: keep it all above this one
        return existing.rstrip("\n") + "\n\n" + new_section
    return existing[:first_run] + new_section + "\n" + existing[first_run:]


# --- main ----------------------------------------------------------------------------------------------------------


def parse_flags(argv: list[str]) -> flags.FlagValues:
    """The command line (without the program name) parsed into its own flag values, so `main` may run more than
    once in a process (the tests)."""
    argv = ["bench_input"] + list(argv)
    f = flags.FlagValues()
    config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs/bench_input.py:gpu"),
                                    "the bench config, FILE[:VARIANT]", flag_values=f, sys_argv=argv)
    flags.DEFINE_bool("help", False, "print this script's description and its flags", flag_values=f,
                      short_name="h")
    flags.DEFINE_string("measure", None, "internal: measure one row given as JSON (a row's own process)",
                        flag_values=f)
    try:
        rest = f(argv)
    except flags.Error as error:  # a config file's own error arrives with its traceback inside: its last line
        raise SystemExit(f"bench_input: {error_message(error)}") from None
    if f.help:  # absl's own --help needs the global flags; these are the script's own
        print(__doc__ + "\nFlags:\n" + f.main_module_help())
        raise SystemExit(0)
    if len(rest) > 1:
        raise SystemExit(f"bench_input: unexpected arguments {rest[1:]}")
    return f


def main(argv: list[str] | None = None) -> list[dict]:
    """Measures every (tokenizer, num_workers); returns the rows (also written to the results file)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_flags(argv)
    if args.measure:
        measure_main(args.measure)
        return []
    load_before = os.getloadavg()[0]
    bench = args.config
    command = "python experiments/bench_input.py " + shlex.join(argv)
    path = bench.results_file
    existing = ""
    if os.path.exists(path):
        with open(path) as f:
            existing = f.read()

    preparation = {}
    for tokenizer in bench.tokenizers:
        print(f"bench_input: preparing the data for {tokenizer} (timed apart)", flush=True)
        preparation[tokenizer] = prepare(data_config(bench, tokenizer))
        print(f"bench_input: {tokenizer}: {preparation[tokenizer]['prepare_s']:.1f} s"
              + (" (already prepared)" if preparation[tokenizer]["already_prepared"] else ""), flush=True)
    head = run_header(bench, command, data_config(bench, bench.tokenizers[0]), preparation, load_before)

    rows = []
    total = len(bench.tokenizers) * len(bench.num_workers)
    for tokenizer in bench.tokenizers:
        for num_workers in bench.num_workers:
            d = data_config(bench, tokenizer)
            d.num_workers = int(num_workers)
            label = f"[{len(rows) + 1}/{total}] {tokenizer}, num_workers {num_workers}"
            print(f"{label}: {bench.warmup_batches} warm-up + {bench.batches} timed batches", flush=True)
            row = {"tokenizer": tokenizer, "num_workers": int(num_workers)}
            row.update(measure_in_fresh_process(d, bench))
            rows.append(row)
            if "error" in row:
                print(f"{label}: FAILED ({row['error']})", flush=True)
            else:
                print(f"{label}: {row['batches_per_s']:,.1f} batches/s "
                      f"({row['batches_per_s'] / bench.target_batches_per_s:.2f}x target), "
                      f"{row['tokens_per_s']:,.0f} tokens/s, first batch {row['first_batch_s']:.2f} s, peak RSS "
                      f"{_mb(row['peak_rss_bytes'])} MB main + {_mb(row['workers_peak_rss_bytes'])} MB workers",
                      flush=True)
            # Written after every row, so a run cut short keeps what it measured.
            results = table(rows, bench.target_batches_per_s) + "\n\n" + verdict(rows, bench.target_batches_per_s)
            text = with_earlier_runs(existing, head + "\n" + results + "\n")
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
    print("\n" + table(rows, bench.target_batches_per_s) + "\n\n" + verdict(rows, bench.target_batches_per_s))
    print(f"\nwrote {path}", flush=True)
    return rows


if __name__ == "__main__":
    main()
