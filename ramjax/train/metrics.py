"""Metrics to a JSONL file and TensorBoard event files in the workdir (written by process 0 only)."""

from __future__ import annotations

import json
import math
import os
import time

from tensorboardX import SummaryWriter


class MetricsLog:
    def __init__(self, workdir: str, *, enabled: bool = True, resumed_from: int | None = None):
        """`resumed_from`: the step a resumed run restarts at. Lines logged after it by the interrupted run are
        dropped from metrics.jsonl, because the resumed run computes and logs those steps again (the JSONL then
        has one line per step; TensorBoard shows the rerun's points over the old ones)."""
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        if enabled and os.path.exists(self.path):
            with open(self.path) as f:
                lines = f.readlines()
            records = _parse_lines(lines, self.path)  # a torn last line (a kill mid-write) is dropped
            kept = [line for line, record in zip(lines, records)
                    if record is not None and (resumed_from is None or record["step"] <= resumed_from)]
            if len(kept) != len(lines):
                with open(self.path + ".tmp", "w") as f:
                    f.writelines(kept)
                os.replace(self.path + ".tmp", self.path)
        # tensorboardX: a new event file per session (a resumed run adds one; TensorBoard reads them all).
        self.tensorboard = SummaryWriter(logdir=os.path.join(workdir, "tensorboard")) if enabled else None

    def write(self, step: int, metrics: dict) -> None:
        """One JSON line {"step", "time", **metrics} and one TensorBoard scalar per metric."""
        if not self.enabled:
            return
        clean = {name: (float(value) if math.isfinite(float(value)) else str(float(value)))
                 for name, value in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        for name, value in metrics.items():
            self.tensorboard.add_scalar(name, float(value), step)
        self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _parse_lines(lines: list[str], path: str) -> list[dict | None]:
    """One record per line (None for blank lines and for a torn last line: a process killed while writing it).
    An unreadable line before the last one is damage no kill explains: an error naming the file and line."""
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            records.append(None)
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                records.append(None)
            else:
                raise ValueError(f"{path}, line {number}: not a JSON record; the file is damaged") from None
    return records


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [record for record in _parse_lines(f.readlines(), path) if record is not None]


def seed_evaluations(workdir: str, num_seeds: int) -> list[tuple[int, list[float]]]:
    """(step, [accuracy of each seed]) of every evaluation in the run's metrics.jsonl, in step order (a resumed
    run's re-evaluated steps: the later line wins)."""
    keys = [f"eval/accuracy/mean/seed_{i}" for i in range(num_seeds)] if num_seeds > 1 else ["eval/accuracy/mean"]
    evaluations = {}
    for row in read_metrics(workdir):
        if all(isinstance(row.get(k), (int, float)) for k in keys):
            evaluations[row["step"]] = [float(row[k]) for k in keys]
    return sorted(evaluations.items())


def best_per_seed(workdir: str, n: int) -> list[dict]:
    """Each seed's best evaluation (highest mean accuracy over slices) in a train.num_seeds = n run's
    metrics.jsonl, with its step (step None for a seed not yet evaluated)."""
    best = [{"step": None, "accuracy": -1.0} for _ in range(n)]
    for row in read_metrics(workdir):  # a torn last line (a crash while writing it) is skipped
        for i in range(n):
            value = row.get(f"eval/accuracy/mean/seed_{i}")
            if isinstance(value, (int, float)) and value > best[i]["accuracy"]:
                best[i] = {"step": row["step"], "accuracy": value}
    return best
