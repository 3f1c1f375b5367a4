"""Train several models on MQAR and tabulate accuracy per (kv, length) slice, with steps/s.

  python experiments/mqar_suite.py --variants ramnet,transformer,gla --num_steps 3000 --workdir runs/mqar_suite
  python experiments/mqar_suite.py --variants ramnet,transformer --cpu --num_steps 200 --workdir /tmp/mqar  # smoke
  python experiments/mqar_suite.py --variants ramnet,gla --config.optim.learning_rate=3e-3   # for every variant

Each model is a variant of the --config file (default configs/mqar.py: d_model 128, 2 layers, trained on the
7-setting suite; a variant given with it, e.g. --config configs/mqar.py:fig4, is added to every model's), with the
--config.FIELD=VALUE overrides, trained with `ramjax.train.trainer.train` in its own workdir under --workdir
(rerunning resumes and skips finished runs). Writes a Markdown table with device, versions, date and command to
--results.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from ramjax import timing
from ramjax.configs import command_line_overrides, load_config
from ramjax.train.metrics import read_metrics
from ramjax.train.trainer import train

MQAR_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "mqar.py")
_CONFIG = config_flags.DEFINE_config_file("config", MQAR_CONFIG, "config file[:MODIFIERS] of every variant")
flags.DEFINE_string("variants", "ramnet,transformer,gla", "model variants of the config file, comma-separated")
flags.DEFINE_integer("num_steps", 3000, "training steps of every variant")
flags.DEFINE_string("workdir", "runs/mqar_suite", "one run directory per variant under it")
flags.DEFINE_bool("cpu", False, "the configs' cpu sizes")
flags.DEFINE_string("results", "experiments/results/mqar_gpu.md", "the Markdown file written")
flags.DEFINE_bool("table_only", False, "train nothing: tabulate the runs in --workdir (an unfinished run shows its "
                  "last eval)")


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


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = flags.FLAGS
    path, _, modifiers = config_flags.get_config_filename(args["config"]).partition(":")
    rows = []
    for variant in args.variants.split(","):
        spec = f"{path}:{variant}" + (f",{modifiers}" if modifiers else "") + (",cpu" if args.cpu else "")
        steps = [f"train.num_steps={args.num_steps}", f"train.eval_every={args.num_steps}"]
        config = load_config(spec, steps + command_line_overrides(sys.argv))  # the command line's win
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
    app.run(main)
