"""Evaluation curves of several runs in one table and one plot: mean accuracy against step, per seed too.

  python experiments/eval_curves.py "U = 5=runs/fig4_paper/005-..." "M = 4096, lr 1e-2=runs/fig4_lr/006-..." \
      --csv experiments/results/fig4_paper_regime.csv --png experiments/results/fig4_paper_regime.png

Each argument is LABEL=RUN_DIR (split at the first '=' followed by a run directory, so a label may contain '='),
so that runs from different sweeps, device calls or regimes share one figure. A run
with train.num_seeds = n contributes each seed's mean accuracy and their mean; a one-seed run its mean. A run
resumed after a cut keeps its re-evaluated steps' later values. Without --csv and --png the table is printed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ramjax.train.metrics import seed_evaluations  # noqa: E402


def split_argument(argument: str) -> tuple[str, str]:
    """LABEL=RUN_DIR, where the label may itself contain '=' (as 'U = 5' does): split at the first '=' whose
    right-hand side is a run directory (it has config.json)."""
    for index, char in enumerate(argument):
        if char == "=" and os.path.exists(os.path.join(argument[index + 1:], "config.json")):
            return argument[:index].strip(), argument[index + 1:]
    raise SystemExit(f"eval_curves: {argument!r}: expected LABEL=RUN_DIR with RUN_DIR a run directory "
                     "(one that has config.json)")


def curve(run_dir: str) -> list[dict]:
    """One row per evaluation: step, the seeds' mean and each seed's accuracy."""
    with open(os.path.join(run_dir, "config.json")) as f:
        num_seeds = int(json.load(f)["train"].get("num_seeds", 1))
    return [{"step": step, "mean": statistics.fmean(accuracies), "seeds": accuracies}
            for step, accuracies in seed_evaluations(run_dir, num_seeds)]


def write_csv(path: str, curves: dict[str, list[dict]]) -> None:
    width = max((len(row["seeds"]) for rows in curves.values() for row in rows), default=1)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "step", "mean"] + [f"seed_{i}" for i in range(width)])
        for label, rows in curves.items():
            for row in rows:
                seeds = [f"{a:.4f}" for a in row["seeds"]] + [""] * (width - len(row["seeds"]))
                writer.writerow([label, row["step"], f"{row['mean']:.4f}"] + seeds)


def write_png(path: str, curves: dict[str, list[dict]], title: str) -> None:
    import matplotlib  # a dependency; imported here so that printing a table does not load it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, rows in curves.items():
        steps = [row["step"] for row in rows]
        (line,) = ax.plot(steps, [row["mean"] for row in rows], marker="o", label=label)
        for i in range(len(rows[0]["seeds"]) if rows and len(rows[0]["seeds"]) > 1 else 0):
            ax.plot(steps, [row["seeds"][i] for row in rows], color=line.get_color(), alpha=0.3, linewidth=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("mean evaluation accuracy (faint: each seed)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    parser.add_argument("--csv", help="write every evaluation of every run here")
    parser.add_argument("--png", help="plot the curves here")
    parser.add_argument("--title", default="evaluation accuracy against training step")
    args = parser.parse_args()
    curves = {}
    for argument in args.runs:
        label, run_dir = split_argument(argument)
        if label in curves:
            raise SystemExit(f"eval_curves: label {label!r} given twice")
        curves[label] = curve(run_dir)
        if not curves[label]:
            print(f"eval_curves: {run_dir} has no evaluation yet; {label!r} is left empty", file=sys.stderr)
    if args.csv:
        write_csv(args.csv, curves)
    if args.png:
        write_png(args.png, curves, args.title)
    if not (args.csv or args.png):
        for label, rows in curves.items():
            points = ", ".join(f"{row['step']}: {row['mean']:.3f}" for row in rows)
            print(f"{label}: {points}")


if __name__ == "__main__":
    main()
