"""Issue 21's tables: multi-seed runs (train.num_seeds) tabulated per seed, best and final evaluation.

  python experiments/fork_table.py runs/fork_mqar runs/fork_length runs/fork_sc256 \
      --results experiments/results/adaptive_decay_fork.md --title "the length test and selective copying"

Each argument is a sweep directory (`ramjax sweep --workdir`) or one run directory. A row per run: the lambda mode,
the block (the fork's, or ours: `,ours`), the task and its train -> evaluation settings, the last evaluated step,
the final and the best evaluation as mean +- std over seeds (population std, as the fork's tables), how many
seeds' best reached --threshold, the median step at which those seeds first did, and each seed's best. Runs cut
short (a timeout, a kill) are tabulated at their last evaluation; the table says how far they got. --results
appends a section (date, command, table) to a Markdown file; without it the table is printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ramjax.train.metrics import seed_evaluations  # noqa: E402


def run_dirs(path: str) -> list[str]:
    """`path` itself if it is a run (it has config.json), else its subdirectories that are, in name order."""
    if os.path.exists(os.path.join(path, "config.json")):
        return [path]
    if not os.path.isdir(path):
        raise SystemExit(f"fork_table: {path} is neither a run directory (config.json) nor a sweep directory")
    return [os.path.join(path, name) for name in sorted(os.listdir(path))
            if os.path.exists(os.path.join(path, name, "config.json"))]


def mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} +- {statistics.pstdev(values):.3f}"


def summarise(workdir: str, threshold: float) -> dict | None:
    """The table's row for one run, or None for a run not yet evaluated."""
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    model, data = config["model"], config["data"]
    num_seeds = int(config["train"].get("num_seeds", 1))
    evaluations = seed_evaluations(workdir, num_seeds)
    if not evaluations:
        return None
    best = [max(acc[i] for _, acc in evaluations) for i in range(num_seeds)]
    first = [next((step for step, acc in evaluations if acc[i] >= threshold), None) for i in range(num_seeds)]
    reached = [s for s in first if s is not None]
    return {
        "mode": model.get("loglinear", {}).get("mode", "-"),
        "block": "fork" if model.get("block") == "post_norm" else "ours",
        "task": f"{config.get('task', '?')} {data.get('train_settings')} -> {data.get('eval_settings')}",
        "steps": f"{evaluations[-1][0]} of {config['train']['num_steps']}",
        "final": mean_std(evaluations[-1][1]),
        "best": mean_std(best),
        "reached": f"{len(reached)} of {num_seeds}",
        "median_first": str(int(statistics.median(reached))) if reached else "-",
        "per_seed": " ".join(f"{b:.2f}" for b in best),
    }


def table(rows: list[dict], threshold: float) -> str:
    head = ["mode", "block", "task (train -> eval)", "evaluated step", "final mean +- std", "best mean +- std",
            f"seeds >= {threshold:g} (best)", f"median step a seed first reached {threshold:g}", "per seed, best"]
    keys = ["mode", "block", "task", "steps", "final", "best", "reached", "median_first", "per_seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row[k] for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="sweep or run directories")
    parser.add_argument("--threshold", type=float, default=0.99, help="accuracy a seed must reach (the fork's 99%%)")
    parser.add_argument("--results", help="append the table to this Markdown file")
    parser.add_argument("--title", default="", help="the appended section's title")
    args = parser.parse_args(argv)
    rows = [row for path in args.paths for d in run_dirs(path) if (row := summarise(d, args.threshold))]
    if not rows:
        raise SystemExit(f"fork_table: no evaluated run under {' '.join(args.paths)}")
    text = table(rows, args.threshold)
    if args.results:
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        command = shlex.join(["python", "experiments/fork_table.py", *(argv if argv is not None else sys.argv[1:])])
        with open(args.results, "a") as f:
            f.write(f"\n## {args.title or 'Multi-seed runs'} (tabulated {now})\n\n- command: `{command}`\n\n{text}")
        print(f"fork_table: {len(rows)} rows appended to {args.results}")
    else:
        print(text, end="")
    return text


if __name__ == "__main__":
    main()
