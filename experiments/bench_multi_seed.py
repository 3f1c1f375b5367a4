"""What many seeds in one program cost: a small model's training speed with train.num_seeds = 1, 8, ... in the real
training loop (`ramjax.train.trainer.train`: data, logging and checkpoints included), one run after another.

    python experiments/bench_multi_seed.py                                   # the fork's MQAR cell, 1 and 8 seeds
    python experiments/bench_multi_seed.py --config configs/adaptive_decay.py:mqar,ours --seeds 1,4,8,16 \
        --results experiments/results/multi_seed_throughput.md

Per num_seeds: a fresh run in a temporary workdir for --steps steps, logging every --log_every. The first logged
interval holds the compilation and is dropped; steps/s is the median of the other intervals (the evaluation and
the checkpoint come once, at the last step, after the last interval is timed). Columns: steps/s; seed-steps/s
(num_seeds x steps/s, the rate at which single runs' steps get done); the step's time against one seed's; and
"gain", the seed-steps/s over one seed's (8 at 8 seeds: eight seeds for the price of one; 1: no better than
single runs one after another). --config.FIELD=VALUE overrides apply to every row. Prints the table and appends it, with device, versions, date and command, to --results when given.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

from ramjax import timing
from ramjax.configs import load_config
from ramjax.train.metrics import read_metrics
from ramjax.train.trainer import train


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/adaptive_decay.py:mqar", help="config FILE[:VARIANT]")
    parser.add_argument("--seeds", default="1,8", help="comma-separated train.num_seeds values (default 1,8)")
    parser.add_argument("--steps", type=int, default=600, help="steps per run (default 600)")
    parser.add_argument("--log_every", type=int, default=100, help="steps per timed interval (default 100)")
    parser.add_argument("--results", default=None, help="markdown file to append the table to")
    known, rest = parser.parse_known_args(argv)
    unknown = [arg for arg in rest if not arg.startswith("--config.") or "=" not in arg]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)} (config overrides: --config.FIELD=VALUE)")
    overrides = [arg[len("--config."):] for arg in rest]
    try:
        seeds = [int(s) for s in known.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds: comma-separated positive integers, got {known.seeds!r}")
    if not seeds or min(seeds) < 1:
        parser.error(f"--seeds: comma-separated positive integers, got {known.seeds!r}")
    if known.log_every < 1 or known.steps < 2 * known.log_every:
        parser.error(f"--steps ({known.steps}) must be at least twice --log_every ({known.log_every}) and "
                     f"--log_every at least 1: the first interval (the compilation) is not timed")
    known.seeds = seeds
    return known, overrides


def run_config(spec: str, overrides: list[str], num_seeds: int, steps: int, log_every: int):
    """The training config of one row: `spec` with the overrides, num_seeds, a fixed number of steps (no early
    stop), the timed intervals, one evaluation and one checkpoint at the end, no progress bar."""
    config = load_config(spec, overrides)
    t = config.train
    t.num_seeds = num_seeds
    t.num_steps, t.log_every = steps, log_every
    t.eval_every = t.checkpoint_every = steps
    t.early_stop_accuracy = 0.0
    t.progress = False
    return config


def steps_per_second(workdir: str) -> list[float]:
    """The logged train/steps_per_s of every interval but the first (the compilation), in step order."""
    rows = [row for row in read_metrics(workdir) if "train/steps_per_s" in row]
    return [row["train/steps_per_s"] for row in sorted(rows, key=lambda row: row["step"])[1:]]


def measure(spec: str, overrides: list[str], seeds: list[int], steps: int, log_every: int) -> list[dict]:
    rows = []
    for n in seeds:
        with tempfile.TemporaryDirectory(prefix=f"bench_multi_seed_{n}_") as workdir:
            train(run_config(spec, overrides, n, steps, log_every), workdir)
            rates = steps_per_second(workdir)
        rows.append({"num_seeds": n, "steps_per_s": statistics.median(rates), "intervals": len(rates)})
        print(f"bench_multi_seed: num_seeds {n}: {rows[-1]['steps_per_s']:.1f} steps/s "
              f"(median of {len(rates)} intervals of {log_every} steps)", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """The markdown table. The ratio columns are against the row with the fewest seeds (one, when measured): the
    step's time, and "gain", the seed-steps per second over that row's (N x rate_N / rate_1 against one seed: N
    when N seeds in one program cost what one does, 1 when they cost what N single runs one after another do)."""
    base = min(rows, key=lambda row: row["num_seeds"])
    base_seed_rate = base["num_seeds"] * base["steps_per_s"]
    lines = [f"| num_seeds | steps/s | seed-steps/s | step time x {base['num_seeds']} seed(s) | gain |",
             "|---|---|---|---|---|"]
    for row in rows:
        n, rate = row["num_seeds"], row["steps_per_s"]
        lines.append(f"| {n} | {rate:.1f} | {n * rate:.1f} | {base['steps_per_s'] / rate:.2f} | "
                     f"{n * rate / base_seed_rate:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    rows = measure(args.config, overrides, args.seeds, args.steps, args.log_every)
    text = table(rows)
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            command = "python experiments/bench_multi_seed.py " + " ".join(sys.argv[1:] if argv is None else argv)
            f.write(f"\n## Many seeds in one program: {args.config}, {args.steps} steps per run\n\n"
                    f"{timing.environment_lines(command)}\n{text}\n")
    return text


if __name__ == "__main__":
    main()
