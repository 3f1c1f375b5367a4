"""The MQAR suite's table: accuracy per (kv, length) slice and steps/s of every run of a sweep directory.

  ramjax sweep --config configs/mqar.py --sweep experiments/sweeps/mqar_suite.py --workdir runs/mqar_suite \
      --config.train.num_steps=3000 --config.train.eval_every=3000                 # train (see that file)
  python experiments/mqar_suite.py --sweep_dir runs/mqar_suite --results experiments/results/mqar_gpu.md

One row per run of the sweep (its model fields name it); a run that has not finished shows its last evaluation.
Writes a Markdown table with device, versions, date and command to --results.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging

from ramjax import timing
from ramjax.train.metrics import read_metrics

flags.DEFINE_string("sweep_dir", "runs/mqar_suite", "the sweep directory (`ramjax sweep --workdir`)")
flags.DEFINE_string("results", "experiments/results/mqar_gpu.md", "the Markdown file written")


def unfinished_summary(workdir: str) -> dict | None:
    """The last evaluation and train metrics of a run that did not finish, shaped like its summary.json."""
    records = read_metrics(workdir) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else []
    evals = [r for r in records if "eval/accuracy/mean" in r]
    if not evals:
        return None
    trains = [r for r in records if "train/steps_per_s" in r]
    return {"steps": f"{evals[-1]['step']} (unfinished)", "parameters": None,
            "train": {"steps_per_s": trains[-1]["train/steps_per_s"]} if trains else {},
            "eval": {k: v for k, v in evals[-1].items() if k.startswith("eval/")}}


def run_label(fields: dict) -> str:
    """The model a run trained: its model.pattern (and log-linear base), else its fields."""
    pattern = fields.get("model.pattern")
    if pattern is None:
        return ", ".join(f"{k}={v}" for k, v in fields.items()) or "base"
    return pattern + (f" ({fields['model.loglinear.base']})" if "model.loglinear.base" in fields else "")


def collect(sweep_dir: str) -> list[tuple[str, dict]]:
    with open(os.path.join(sweep_dir, "sweep.json")) as f:
        runs = json.load(f)["runs"]
    rows = []
    for run in runs:
        workdir = os.path.join(sweep_dir, run["name"])
        label = run_label(run["fields"])
        if os.path.exists(os.path.join(workdir, "summary.json")):
            with open(os.path.join(workdir, "summary.json")) as f:
                summary = json.load(f)
        else:
            summary = unfinished_summary(workdir)
            if summary is None:
                print(f"{label}: no evaluation in {workdir}; left out of the table", flush=True)
                continue
        rows.append((label, summary))
        print(f"{label}: mean accuracy {summary['eval']['eval/accuracy/mean']:.3f}", flush=True)
    return rows


def table(rows: list[tuple[str, dict]]) -> str:
    slices = [k for k in rows[0][1]["eval"] if k.startswith("eval/accuracy/") and not k.endswith("/mean")]
    header = ["model", "params", "steps", "steps/s"] + [s.split("/")[-1] for s in slices] + ["mean"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, s in rows:
        steps_per_s = s["train"].get("steps_per_s", float("nan"))
        cells = [label, f"{s['parameters']:,}" if s["parameters"] else "-", str(s["steps"]), f"{steps_per_s:.1f}"]
        cells += [f"{s['eval'][k]:.3f}" for k in slices] + [f"{s['eval']['eval/accuracy/mean']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = flags.FLAGS
    logging.set_verbosity(logging.WARNING)  # absl would otherwise echo JAX's backend probing as INFO
    rows = collect(args.sweep_dir)
    if not rows:
        raise SystemExit(f"mqar_suite: nothing to tabulate in {args.sweep_dir}")
    text = table(rows)
    print(text)
    with open(args.results, "w") as f:
        f.write(f"# MQAR: accuracy per (kv, length) slice\n\n{timing.environment_lines()}\n{text}\n")


if __name__ == "__main__":
    app.run(main)
