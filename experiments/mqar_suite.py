"""Train several models on MQAR and tabulate accuracy per (kv, length) slice, with steps/s.

  python experiments/mqar_suite.py --variants ramnet,transformer,gla --num_steps 3000 --workdir runs/mqar_suite
  python experiments/mqar_suite.py --variants ramnet,transformer --cpu --num_steps 200 --workdir /tmp/mqar  # smoke

Each model is a variant of configs/mqar.py (d_model 128, 2 layers, trained on the 7-setting suite by default),
trained with `ramjax.train.trainer.train` in its own workdir under --workdir (rerunning resumes and skips
finished runs). Writes a Markdown table with device, versions, date and command to --results.
"""

from __future__ import annotations

import argparse
import json
import os

from ramjax import config_files, timing
from ramjax.train.metrics import read_metrics
from ramjax.train.trainer import train


MQAR_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "mqar.py")


def load_config(variant: str):
    return config_files.load_config(f"{MQAR_CONFIG}:{variant}")


def unfinished_summary(workdir: str) -> dict | None:
    """The last evaluation and train metrics of a run that did not finish, shaped like its summary.json."""
    records = read_metrics(workdir)
    evals = [r for r in records if "eval/accuracy/mean" in r]
    if not evals:
        return None
    trains = [r for r in records if "train/steps_per_s" in r]
    return {"steps": f"{evals[-1]['step']} (unfinished)", "parameters": None,
            "train": {"steps_per_s": trains[-1]["train/steps_per_s"]} if trains else {},
            "eval": {k: v for k, v in evals[-1].items() if k.startswith("eval/")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="ramnet,transformer,gla")
    parser.add_argument("--num_steps", type=int, default=3000)
    parser.add_argument("--workdir", default="runs/mqar_suite")
    parser.add_argument("--cpu", action="store_true", help="the configs' cpu sizes")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field for every variant, e.g. --set optim.learning_rate=3e-3")
    parser.add_argument("--results", default="experiments/results/mqar_gpu.md")
    parser.add_argument("--table_only", action="store_true",
                        help="train nothing: tabulate the runs in --workdir (an unfinished run shows its last eval)")
    args = parser.parse_args()

    rows = []
    for variant in args.variants.split(","):
        config = load_config(variant + (",cpu" if args.cpu else ""))
        config.train.num_steps = args.num_steps
        config.train.eval_every = args.num_steps
        for item in args.set:
            config_files.set_field(config, item)
        workdir = os.path.join(args.workdir, variant)
        summary_path = os.path.join(workdir, "summary.json")
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                summary = json.load(f)
        elif args.table_only:
            summary = unfinished_summary(workdir)
            if summary is None:
                print(f"{variant}: no evaluation in {workdir}; left out of the table", flush=True)
                continue
        else:
            summary = train(config, workdir)
        rows.append((variant, summary))
        print(f"{variant}: mean accuracy {summary['eval']['eval/accuracy/mean']:.3f}", flush=True)
    if not rows:
        raise SystemExit(f"mqar_suite: nothing to tabulate in {args.workdir}")

    slices = [k for k in rows[0][1]["eval"] if k.startswith("eval/accuracy/") and not k.endswith("/mean")]
    header = ["model", "params", "steps", "steps/s"] + [s.split("/")[-1] for s in slices] + ["mean"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, s in rows:
        steps_per_s = s["train"].get("steps_per_s", float("nan"))
        cells = [variant, f"{s['parameters']:,}" if s["parameters"] else "-", str(s["steps"]), f"{steps_per_s:.1f}"]
        cells += [f"{s['eval'][k]:.3f}" for k in slices] + [f"{s['eval']['eval/accuracy/mean']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    with open(args.results, "w") as f:
        f.write(f"# MQAR: accuracy per (kv, length) slice\n\n{timing.environment_lines()}\n{table}\n")


if __name__ == "__main__":
    main()
