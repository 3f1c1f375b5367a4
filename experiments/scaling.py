"""Training throughput and memory per device over device counts and mesh shapes (weak scaling).

  python experiments/scaling.py --config configs/lm.py:ramnet --runs "1:1,1,1 2:2,1,1 2:1,2,1" \
      --per_device_batch 8 --steps 40 --config.data.data_dir=.data/python_stdlib

Each run is DEVICES:DATA,FSDP,TENSOR: the first DEVICES devices in that mesh, the global batch
per_device_batch x DEVICES (weak scaling), `--steps` steps of `ramjax train` in a fresh workdir (no checkpoints
but the last, one evaluation at the end). Tokens/s is measured over the steps after the first log interval
(compilation excluded); memory is each device's peak bytes in use (GPU/TPU; the CPU reports none). Efficiency
is tokens/s per device relative to the first run. Writes a Markdown table with device, versions, date and
command to --results. On GPUs keep NCCL's NVLink multicast off: NCCL_NVLS_ENABLE=0.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile

import jax
from absl import app, flags
from ml_collections import config_flags

from ramjax import timing
from ramjax.train.metrics import read_metrics
from ramjax.train.trainer import train


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs/lm.py:ramnet"), "training config")
flags.DEFINE_string("runs", "1:1,1,1 2:2,1,1 2:1,2,1", "space-separated DEVICES:DATA,FSDP,TENSOR runs")
flags.DEFINE_integer("per_device_batch", 8, "global batch = this x the run's devices")
flags.DEFINE_integer("steps", 40, "training steps per run")
flags.DEFINE_integer("log_every", 10, "steps per logged throughput")
flags.DEFINE_string("results", "experiments/results/scaling.md", "the Markdown file written")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = flags.FLAGS
    rows = []
    for run in args.runs.split():
        count, _, mesh = run.partition(":")
        count = int(count)
        data, fsdp, tensor = (int(x) for x in mesh.split(","))
        if count > jax.device_count():
            print(f"{run}: skipped, only {jax.device_count()} devices", flush=True)
            continue
        config = copy.deepcopy(_CONFIG.value)
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
        config.data.batch_size = args.per_device_batch * count
        t = config.train
        t.num_steps, t.log_every, t.eval_every, t.checkpoint_every = args.steps, args.log_every, args.steps, args.steps
        t.progress = False
        # One evaluation batch at the end (divisible by the batch shards): the run is for timing.
        config.data.eval_batch_size = max(count, config.data.eval_batch_size // count * count)
        config.data.eval_examples = config.data.eval_batch_size
        devices = jax.devices()[:count]
        summary = train(config, tempfile.mkdtemp(prefix="scaling-"), devices=devices)
        logged = [r for r in read_metrics(summary["workdir"]) if "train/tokens_per_s" in r][1:]  # drop compile
        tokens_per_s = statistics.median(r["train/tokens_per_s"] for r in logged) if logged else float("nan")
        steps_per_s = statistics.median(r["train/steps_per_s"] for r in logged) if logged else float("nan")
        stats = [d.memory_stats() or {} for d in devices]
        peak = max((s.get("peak_bytes_in_use", 0) for s in stats), default=0)
        rows.append({"run": run, "devices": count, "mesh": (data, fsdp, tensor), "batch": config.data.batch_size,
                     "params": summary["parameters"], "tokens_per_s": tokens_per_s,
                     "step_ms": 1e3 / steps_per_s if steps_per_s else float("nan"), "peak_gb": peak / 1e9})
        print(rows[-1], flush=True)
    if not rows:
        raise SystemExit("scaling: no run fitted the devices here")
    base = rows[0]["tokens_per_s"] / rows[0]["devices"]
    lines = ["| devices | mesh (data, fsdp, tensor) | global batch | tokens/s | tokens/s per device | efficiency | "
             "step ms | peak memory per device (GB) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_device = r["tokens_per_s"] / r["devices"]
        lines.append(f"| {r['devices']} | {r['mesh']} | {r['batch']} | {r['tokens_per_s']:,.0f} | {per_device:,.0f} | "
                     f"{per_device / base:.0%} | {r['step_ms']:.1f} | {r['peak_gb']:.2f} |")
    spec = config_flags.get_config_filename(args["config"]).replace(ROOT + os.sep, "")
    text = (f"# Training throughput by device count and mesh ({spec}, {rows[0]['params']:,} parameters)\n\n" +
            timing.environment_lines() + "\n" + "\n".join(lines) + "\n")
    print(text)
    with open(args.results, "w") as f:
        f.write(text)


if __name__ == "__main__":
    app.run(main)
