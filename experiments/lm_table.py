"""The LM table: train the configs/lm.py variants on equal tokens, evaluate them, tabulate and plot.

  python experiments/lm_table.py --workdir runs/lm_table --steps 1500 --devices 0,1,2,3 \
      --config.data.data_dir=.data/python_stdlib --results experiments/results/lm_table.md
  python experiments/lm_table.py --from_json experiments/results/lm_table.json   # redraw table and plot

Every variant is `ramjax train` (same steps, batch and context, so equal tokens) in its own process on the next
device of --devices, through ramjax.sweep.Launcher (output in VARIANT/train.log), then `ramjax eval` on the
validation split (loss, bits per byte, per-position loss; output in VARIANT/lm_table.log). --config
FILE[:MODIFIERS] (default configs/lm.py) is the config of every variant, and its --config.FIELD=VALUE overrides
go to every `ramjax train`. `--timeout SECONDS` sends the trainers SIGTERM at that time (they save and stop; the
evaluation then runs on what they reached, and the table gives the steps done). Tokens/s is the median logged
training throughput after the first log interval; when several processes share a GPU it is lower than alone,
so pass the single-GPU measurements with --throughput VARIANT=TOKENS_PER_S[,...] to add them as a column.
Writes RESULTS.md, RESULTS.json (everything, per-position losses included) and RESULTS_per_position.png;
notes written below the marker line in RESULTS.md are kept when it is rewritten.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ramjax.configs import command_line_overrides

LM_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "lm.py")
VARIANTS = ("ramnet", "transformer", "loglinear_mamba2", "gated_deltanet", "hybrid")


def run_variant(variant: str, args, launcher, device: str | None) -> None:
    """`ramjax train` of one variant through `launcher` (ramjax.sweep.Launcher: its output in train.log, SIGTERM
    when the launcher is stopped), then `ramjax eval` of what it reached on the same device."""
    workdir = os.path.join(args.workdir, variant)
    os.makedirs(workdir, exist_ok=True)
    path, _, modifiers = config_flags.get_config_filename(args["config"]).partition(":")
    config = f"{path}:{variant}" + (f",{modifiers}" if modifiers else "") + (f",{args.size}" if args.size else "")
    train = [sys.executable, "-m", "ramjax.cli", "train", f"--config={config}", f"--workdir={workdir}",
             f"--config.train.num_steps={args.steps}", f"--config.train.eval_every={args.steps}",
             f"--config.train.checkpoint_every={args.checkpoint_every}", "--config.train.progress=False"]
    train += [f"--config.{item}" for item in command_line_overrides(sys.argv)]
    status, seconds = launcher.execute(train, workdir)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    with open(os.path.join(workdir, "lm_table.log"), "a") as log:
        log.write(f"train: {status} after {seconds:.0f} s (train.log)\n")
        log.flush()
        evaluate = [sys.executable, "-m", "ramjax.cli", "eval", f"--workdir={workdir}"]
        if args.eval_windows:
            evaluate.append(f"--max_windows={args.eval_windows}")
        log.write("$ " + " ".join(evaluate) + "\n")
        log.flush()
        done = subprocess.run(evaluate, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.write(f"eval exit code {done.returncode}\n")


def collect(workdir: str, variants, throughput: dict) -> list[dict]:
    records = []
    for variant in variants:
        directory = os.path.join(workdir, variant)
        record = {"variant": variant}
        config_path = os.path.join(directory, "config.json")
        if os.path.exists(config_path):
            with open(config_path) as f:
                config = json.load(f)
            record.update(batch=config["data"]["batch_size"], seq_len=config["data"]["seq_len"],
                          planned_steps=config["train"]["num_steps"], pattern=config["model"]["pattern"])
        metrics = []
        if os.path.exists(os.path.join(directory, "metrics.jsonl")):
            with open(os.path.join(directory, "metrics.jsonl")) as f:
                metrics = [json.loads(line) for line in f if line.strip()]
        rates = [m["train/tokens_per_s"] for m in metrics if "train/tokens_per_s" in m][1:]  # first: compile
        record["tokens_per_s"] = statistics.median(rates) if rates else None
        losses = [m for m in metrics if "train/loss" in m]
        record["train_loss"] = losses[-1]["train/loss"] if losses else None
        if os.path.exists(os.path.join(directory, "summary.json")):
            with open(os.path.join(directory, "summary.json")) as f:
                summary = json.load(f)
            record.update(parameters=summary.get("parameters"), wall_s=summary.get("wall_s"))
        evaluation = os.path.join(directory, "eval_validation.json")
        if os.path.exists(evaluation):
            with open(evaluation) as f:
                result = json.load(f)
            record.update(steps=result["step"], val_loss=result["loss"], val_bits_per_byte=result["bits_per_byte"],
                          val_windows=result["windows"], per_position_loss=result["per_position_loss"])
        if record.get("steps") is not None and record.get("batch"):
            record["tokens"] = record["steps"] * record["batch"] * record["seq_len"]
        record["tokens_per_s_alone"] = throughput.get(variant)
        records.append(record)
    return records


def table(records: list[dict]) -> str:
    def number(value, spec):
        return "-" if value is None else format(value, spec)

    lines = ["| variant | parameters | steps | tokens | val loss (nats/token) | val bits/byte | train loss | "
             "tokens/s (this run) | tokens/s alone on 1 GPU |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        tokens = "-" if r.get("tokens") is None else f"{r['tokens'] / 1e6:.1f} M"
        lines.append(f"| {r['variant']} | {number(r.get('parameters'), ',')} | {number(r.get('steps'), 'd')} | "
                     f"{tokens} | {number(r.get('val_loss'), '.4f')} | {number(r.get('val_bits_per_byte'), '.4f')} | "
                     f"{number(r.get('train_loss'), '.4f')} | {number(r.get('tokens_per_s'), ',.0f')} | "
                     f"{number(r.get('tokens_per_s_alone'), ',.0f')} |")
    return "\n".join(lines)


def plot(records: list[dict], path: str) -> str:
    import matplotlib  # a dependency; imported here so that commands without plots do not load it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    window = 1
    for r in records:
        if not r.get("per_position_loss"):
            continue
        losses = np.asarray(r["per_position_loss"])
        window = max(1, len(losses) // 64)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        positions = np.arange(1, len(losses) + 1)[window - 1:]
        axes.plot(positions, smooth, label=f"{r['variant']} ({r['val_bits_per_byte']:.3f} bits/byte)")
    axes.set_xscale("log")
    axes.set_xlabel("position in the context window")
    axes.set_ylabel(f"validation loss (nats/token), mean over a window of {window}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# Below this line of a results file, written notes survive a rewrite (--table_only, --from_json).
NOTES_MARKER = "<!-- lm_table.py writes everything above this line and keeps what follows -->"


def write(records: list[dict], header: str, results: str) -> None:
    stem = os.path.splitext(results)[0]
    with open(stem + ".json", "w") as f:
        json.dump({"header": header, "records": records}, f)
    png = plot(records, stem + "_per_position.png")
    text = header + "\n" + table(records) + "\n" + (f"\nPer-position loss: `{os.path.basename(png)}`\n" if png else "")
    notes = ""
    if os.path.exists(results):
        with open(results) as f:
            _, marker, notes = f.read().partition(NOTES_MARKER)
        notes = notes if marker else ""
    with open(results, "w") as f:
        f.write(text + "\n" + NOTES_MARKER + notes)
    print(text)


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", LM_CONFIG, "config file[:MODIFIERS] of every variant")
    flags.DEFINE_string("workdir", "runs/lm_table", "one run directory per variant under it")
    flags.DEFINE_list("variants", list(VARIANTS), f"comma-separated, of {', '.join(VARIANTS)}")
    flags.DEFINE_string("size", "", "size modifier of configs/lm.py ('cpu' for a smoke test)")
    flags.DEFINE_integer("steps", 2000, "training steps of every variant (equal tokens)")
    flags.DEFINE_integer("checkpoint_every", 500, "steps between checkpoints")
    flags.DEFINE_string("devices", "", "GPU indices, one variant per device in turn (e.g. 0,1,2,3)")
    flags.DEFINE_float("timeout", 0, "stop the trainers after this many seconds")
    flags.DEFINE_integer("eval_windows", 0, "validation windows (0: the config's)")
    flags.DEFINE_list("throughput", [], "VARIANT=TOKENS_PER_S,...: single-GPU throughputs, a column")
    flags.DEFINE_string("results", "experiments/results/lm_table.md", "the Markdown file written")
    flags.DEFINE_bool("table_only", False, "tabulate the runs in --workdir, train nothing")
    flags.DEFINE_string("from_json", None, "redraw the table and plot from a results JSON")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = flags.FLAGS
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise app.UsageError(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")

    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        write(saved["records"], saved["header"], os.path.splitext(args.from_json)[0] + ".md")
        return
    throughput = {}
    for item in args.throughput:
        variant, _, value = item.partition("=")
        throughput[variant] = float(value)
    if not args.table_only:
        devices = [d for d in args.devices.split(",") if d] or [None]
        if len(args.variants) > len(devices):
            # Seen on an H200: two LM processes on one GPU ran it out of memory (63 + 37 GB peaks, plus slack).
            print(f"lm_table: {len(args.variants)} variants on {len(devices)} device(s): some share a GPU, so "
                  "their throughput is shared too and their memory must fit together (set "
                  "XLA_PYTHON_CLIENT_MEM_FRACTION, or run the extra variants in a second invocation)")
        from ramjax.sweep import Launcher

        # One launcher per variant, on its device; --timeout stops them all (the trainers save and stop).
        assigned = [devices[i % len(devices)] for i in range(len(args.variants))]
        launchers = [Launcher([d] if d is not None else [], 1) for d in assigned]
        timer = threading.Timer(args.timeout, lambda: [launcher.stop() for launcher in launchers])
        if args.timeout:
            timer.start()
        threads = [threading.Thread(target=run_variant, args=(v, args, launcher, d))
                   for v, launcher, d in zip(args.variants, launchers, assigned)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        timer.cancel()
    from ramjax import timing  # after the trainers: this process then takes no GPU memory while they run

    header = f"# Language models on equal tokens (configs/lm.py, {args.workdir})\n\n" + timing.environment_lines()
    write(collect(args.workdir, args.variants, throughput), header, args.results)


if __name__ == "__main__":
    define_flags()
    app.run(main)
