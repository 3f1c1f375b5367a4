"""`ramjax sweep`: run a grid of training runs from one config and a sweep file, and tabulate and plot them.

  ramjax sweep --config configs/mqar.py:ramnet --sweep configs/sweeps/NAME.py [--workdir DIR]
               [--dry-run] [--max-parallel N] [--devices 0,1,2,3] [--report] [--config.FIELD=VALUE ...]

A sweep file is Python, like a config file. It defines `get_sweep()`, returning the grid built from
`values(field, [...])` with `product(...)` (every combination) and `zipped(...)` (element by element), and may
define `PLOT = {"x": field, "y": metric, "series": [fields], "best_over": [fields]}` (best_over: plot only the
best run over those fields, e.g. the learning rate, for each combination of the others):

    from ramjax.sweep import product, values, zipped

    def get_sweep():
        return product(values("model.pattern", ["ramnet", "attention"]),
                       zipped(values("model.d_model", [64, 128]), values("optim.learning_rate", [3e-3, 1e-3])))

Every run is `ramjax train` in its own process and workdir under the sweep directory (default
runs/sweeps/<sweep file name>), so a crash of one run does not end the sweep. Rerunning the same command skips
finished runs and resumes unfinished ones. `--dry-run` prints the `ramjax train` command of every run (for a
cluster scheduler) and runs nothing. `--devices` spreads the runs over those GPUs (each run sees one, through
CUDA_VISIBLE_DEVICES; with --max-parallel above the number of GPUs, runs share them, each with an equal part of
the GPU's memory unless XLA_PYTHON_CLIENT_MEM_FRACTION is set). At the end, results.csv, results.md and plots
(PNG, when matplotlib is installed) are written to the sweep directory; a failed run is a row saying so, with the
end of its error output, and an unfinished one (stopped, or still running elsewhere) shows its last evaluation.
`--report` only writes those results from the runs' directories. SIGTERM (a scheduler's time limit) is passed on
to the running trainers, which save a checkpoint and stop; no new run starts, the results are written, and the
next invocation resumes.
"""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import os
import re
import shlex
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from ramjax.errors import ConfigError

# ----------------------------------------------------------------------------------------------------------
# Grids: a grid is a list of runs, a run a dict {field: value} (fields in the order they were declared).


def values(field: str, options) -> list[dict]:
    """One field over a list of values."""
    if not isinstance(field, str) or not field:
        raise ConfigError(f"sweep: a field name must be a non-empty string like 'model.d_model', got {field!r}")
    options = list(options)
    if not options:
        raise ConfigError(f"sweep: values({field!r}, ...) needs at least one value")
    return [{field: value} for value in options]


def product(*grids) -> list[dict]:
    """Every combination of the grids' runs (the last grid varies fastest)."""
    runs = [{}]
    for grid in grids:
        runs = [_merged(a, b) for a in runs for b in grid]
    return runs


def zipped(*grids) -> list[dict]:
    """The grids' runs element by element; they must have the same length."""
    lengths = [len(grid) for grid in grids]
    if len(set(lengths)) > 1:
        raise ConfigError(f"sweep: zipped(...) needs grids of equal length, got lengths {lengths}")
    return [_merged_all(parts) for parts in zip(*grids)]


def _merged(a: dict, b: dict) -> dict:
    both = set(a) & set(b)
    if both:
        raise ConfigError(f"sweep: field {sorted(both)[0]!r} is swept twice in one run")
    return {**a, **b}


def _merged_all(parts) -> dict:
    out = {}
    for part in parts:
        out = _merged(out, part)
    return out


# ----------------------------------------------------------------------------------------------------------
# Loading a sweep file, naming runs, building their commands.


def load_sweep(path: str):
    """(runs, plot spec) from a sweep file."""
    if not os.path.exists(path):
        raise ConfigError(f"--sweep: no such file {path!r}")
    spec = importlib.util.spec_from_file_location(f"sweep_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise ConfigError(f"--sweep {path}: defines no get_sweep()")
    runs = module.get_sweep()
    if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
        raise ConfigError(f"--sweep {path}: get_sweep() must return a non-empty list of runs (use values, product, "
                          "zipped from ramjax.sweep)")
    names = [run_name(i, r) for i, r in enumerate(runs)]
    plot = getattr(module, "PLOT", None)
    return runs, plot, names


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(_format(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def run_name(index: int, run: dict) -> str:
    """A directory name: the run's index and its swept values, e.g. 003-d_model=64-learning_rate=0.001."""
    parts = [f"{field.split('.')[-1]}={_format(value)}" for field, value in run.items()]
    name = "-".join([f"{index:03d}"] + parts)
    return re.sub(r"[^A-Za-z0-9_.=,()+-]", "_", name)[:180]


def train_command(config: str, workdir: str, run: dict, overrides: list[str]) -> list[str]:
    return ([sys.executable, "-m", "ramjax.cli", "train", f"--config={config}", f"--workdir={workdir}"] + overrides
            + [f"--config.{field}={_format(value)}" for field, value in run.items()])


def printable(command: list[str]) -> str:
    return shlex.join(["ramjax"] + command[3:])


# ----------------------------------------------------------------------------------------------------------
# Running.


def run_status(workdir: str) -> str:
    """finished, failed, unfinished (a checkpoint or a log, no summary) or new."""
    if os.path.exists(os.path.join(workdir, "summary.json")):
        return "finished"
    if os.path.exists(os.path.join(workdir, "error.txt")):
        return "failed"
    return "unfinished" if os.path.exists(workdir) else "new"


class Launcher:
    """Starts training processes, each on the next free device slot, and stops them all on request."""

    def __init__(self, devices: list[str], max_parallel: int):
        self.slots = queue.Queue()
        for i in range(max_parallel):
            self.slots.put(devices[i % len(devices)] if devices else None)
        # Without --devices every run shares the default device: split its memory between them too.
        per_device = -(-max_parallel // len(devices)) if devices else max_parallel
        self.memory_fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                              f"{0.9 / per_device:.3f}" if per_device > 1 else None)
        self.stopping = False
        self.running: set[subprocess.Popen] = set()
        self.lock = threading.Lock()

    def stop(self, signum=signal.SIGTERM, frame=None) -> None:
        """No new runs; the running trainers get SIGTERM (they save a checkpoint and exit)."""
        self.stopping = True
        with self.lock:
            for process in self.running:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)

    def execute(self, command: list[str], workdir: str) -> tuple[str, float]:
        """Runs one training process; its output goes to workdir/train.log. Returns (status, seconds)."""
        if self.stopping:
            return "not started", 0.0
        device = self.slots.get()
        try:
            return self._execute(command, workdir, device)
        finally:
            self.slots.put(device)

    def _execute(self, command: list[str], workdir: str, device) -> tuple[str, float]:
        os.makedirs(workdir, exist_ok=True)
        error_path = os.path.join(workdir, "error.txt")
        if os.path.exists(error_path):
            os.remove(error_path)  # a retry
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        if self.memory_fraction:
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = self.memory_fraction
        start = time.time()
        with open(os.path.join(workdir, "train.log"), "a") as log:
            log.write(f"$ {printable(command)}" + (f"  (device {device})" if device is not None else "") + "\n")
            log.flush()
            with self.lock:
                if self.stopping:
                    return "not started", 0.0
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
                self.running.add(process)
            returncode = process.wait()
            with self.lock:
                self.running.discard(process)
        if os.path.exists(os.path.join(workdir, "summary.json")):
            return "finished", time.time() - start
        if returncode == 0 or (self.stopping and returncode in (-signal.SIGTERM, 128 + signal.SIGTERM)):
            return "unfinished", time.time() - start  # stopped by SIGTERM: the next invocation resumes it
        with open(os.path.join(workdir, "train.log")) as f:
            tail = [line.rstrip() for line in f.readlines()[-15:] if line.strip()]
        with open(error_path, "w") as f:
            f.write(f"exit code {returncode}\n" + "\n".join(tail) + "\n")
        return "failed", time.time() - start


def parse_devices(text: str | None) -> list[str]:
    if not text:
        return []
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices or not all(d.isdigit() for d in devices):
        raise ConfigError(f"--devices: a comma-separated list of GPU indices like 0,1,2,3, got {text!r}")
    return devices


def sweep(config: str, sweep_path: str, *, workdir: str | None = None, dry_run: bool = False, max_parallel: int = 1,
          overrides: list[str] = (), devices: list[str] = (), report_only: bool = False) -> list[dict]:
    """Runs (or, with dry_run, prints) the sweep; returns its result rows."""
    runs, plot, names = load_sweep(sweep_path)
    if max_parallel < 1:
        raise ConfigError(f"--max-parallel: must be >= 1, got {max_parallel}")
    sweep_dir = workdir or os.path.join("runs", "sweeps", os.path.splitext(os.path.basename(sweep_path))[0])
    commands = [train_command(config, os.path.join(sweep_dir, name), run, list(overrides))
                for name, run in zip(names, runs)]
    if not report_only:
        validate_runs(config, names, runs, list(overrides))
    if dry_run:
        for command, device in zip(commands, itertools.cycle(devices or [None])):
            print((f"CUDA_VISIBLE_DEVICES={device} " if device is not None else "") + printable(command))
        return []
    if report_only:
        if not os.path.isdir(sweep_dir):
            raise ConfigError(f"--report: no sweep directory {sweep_dir!r} (run the sweep first)")
    else:
        run_grid(config, sweep_path, sweep_dir, names, runs, commands, overrides, list(devices), max_parallel)
    rows = collect(sweep_dir, names, runs)
    write_results(sweep_dir, rows, runs, plot)
    failed = [r["run"] for r in rows if r["status"] == "failed"]
    unfinished = [r["run"] for r in rows if r["status"] in ("unfinished", "new")]
    print(f"ramjax sweep: results in {sweep_dir}/results.md" + (f"; {len(failed)} failed: {failed}" if failed else "")
          + (f"; {len(unfinished)} unfinished (rerun the same command to finish them)" if unfinished else ""))
    return rows


def validate_runs(config: str, names: list[str], runs: list[dict], overrides: list[str]) -> None:
    """Every run's config built and checked here first (a missing config file, a misspelt field, a bad value:
    one ConfigError naming the run and the field), so that neither --dry-run nor the sweep starts on a typo."""
    from ramjax.configs import error_message, load_config, override
    from ramjax.train.trainer import check_model_config

    items = [o[len("--config."):] for o in overrides]
    try:
        load_config(config, items)
    except (OSError, KeyError, AttributeError, ValueError, TypeError) as error:
        raise ConfigError(f"--config {config} {' '.join(overrides)}: {error_message(error)}") from None
    for name, run in zip(names, runs):
        try:
            fields = [f"{field}={_format(value)}" for field, value in run.items()]
            check_model_config(override(load_config(config, items), fields))
        except (ConfigError, KeyError, AttributeError, ValueError, TypeError) as error:
            raise ConfigError(f"run {name}: {error_message(error)}") from None


def _check_sweep_record(sweep_dir: str, record: dict) -> None:
    """A sweep directory keeps the config and overrides it was run with: rerunning it with others would label
    finished runs with values they were not trained with."""
    path = os.path.join(sweep_dir, "sweep.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    differences = [f"{key}: {old.get(key)!r} -> {record[key]!r}" for key in ("config", "overrides")
                   if old.get(key) != record[key]]
    if differences:
        raise ConfigError(f"{sweep_dir} was run with other settings ({'; '.join(differences)}); rerun it with "
                          "the same ones, or use a new --workdir")


def run_grid(config, sweep_path, sweep_dir, names, runs, commands, overrides, devices, max_parallel) -> None:
    record = {"config": config, "sweep": os.path.abspath(sweep_path), "overrides": list(overrides),
              "runs": [{"name": n, "fields": r} for n, r in zip(names, runs)]}
    _check_sweep_record(sweep_dir, json.loads(json.dumps(record, default=str)))
    os.makedirs(sweep_dir, exist_ok=True)
    path = os.path.join(sweep_dir, "sweep.json")
    if os.path.exists(path):  # the grid may have grown: keep the runs already recorded, add the new ones
        with open(path) as f:
            known = {r["name"]: r for r in json.load(f).get("runs", [])}
        record["runs"] = list(known.values()) + [r for r in record["runs"] if r["name"] not in known]
    with open(path, "w") as f:
        json.dump(record, f, indent=2, default=str)
    todo = [(name, command) for name, command in zip(names, commands)
            if run_status(os.path.join(sweep_dir, name)) != "finished"]
    print(f"ramjax sweep: {len(runs)} runs in {sweep_dir}; {len(runs) - len(todo)} finished already, "
          f"{len(todo)} to run ({max_parallel} at a time" + (f" on devices {','.join(devices)})" if devices else ")"))
    launcher = Launcher(devices, max_parallel)
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, launcher.stop) if on_main_thread else None
    try:
        with tqdm(total=len(todo), unit="run", desc="sweep") as progress, ThreadPoolExecutor(max_parallel) as pool:
            futures = {pool.submit(launcher.execute, command, os.path.join(sweep_dir, name)): name
                       for name, command in todo}
            for future in futures:
                status, seconds = future.result()
                progress.update(1)
                progress.write(f"{futures[future]}: {status} in {seconds:.0f} s")
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    if launcher.stopping:
        print("ramjax sweep: SIGTERM received; running trainers were told to save and stop, no new runs started")


# ----------------------------------------------------------------------------------------------------------
# Results.


def collect(sweep_dir: str, names: list[str], runs: list[dict]) -> list[dict]:
    rows = []
    for name, run in zip(names, runs):
        directory = os.path.join(sweep_dir, name)
        row = {"run": name, **{field: _format(value) for field, value in run.items()}}
        status = run_status(directory)
        row["status"] = status
        if status == "finished":
            with open(os.path.join(directory, "summary.json")) as f:
                summary = json.load(f)
            row.update({"steps": summary.get("steps"), "parameters": summary.get("parameters"),
                        "state_size": summary.get("state_size"),
                        "wall_s": round(summary.get("wall_s", float("nan")), 1),
                        "train/loss": summary.get("train", {}).get("loss")})
            row.update(summary.get("eval", {}))
        elif status == "unfinished":
            row.update(last_evaluation(directory))
        elif status == "failed":
            with open(os.path.join(directory, "error.txt")) as f:
                lines = [line.strip() for line in f.read().splitlines() if line.strip()]
            row["error"] = error_summary(lines)
        rows.append(row)
    return rows


# A line that states an error: ramjax's own one-line messages, or the last line of a Python traceback.
_ERROR_LINE = re.compile(r"^(ramjax \w+: |[\w.]*(Error|Exception|Interrupt)\b|Killed|Segmentation fault)")


def error_summary(lines: list[str]) -> str:
    """The error of a failed run from the end of its log (error.txt: exit code, then the log's tail): the last
    line that states an error (progress-bar redraws dropped), with the exit code."""
    if not lines:
        return "failed"
    shown = [line.split("\r")[-1].strip() for line in lines[1:]]
    errors = [line for line in shown if _ERROR_LINE.search(line)]
    message = errors[-1] if errors else (shown[-1] if shown else "")
    return f"{message} ({lines[0]})" if message else lines[0]


def last_evaluation(directory: str) -> dict:
    """The newest evaluation an unfinished run logged (its step as eval_step), from metrics.jsonl."""
    path = os.path.join(directory, "metrics.jsonl")
    latest = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if any(k.startswith("eval/") for k in record):
                    latest = record
    if not latest:
        return {}
    return {"eval_step": latest.get("step"), **{k: v for k, v in latest.items() if k.startswith("eval/")}}


def _columns(rows: list[dict]) -> list[str]:
    columns = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def write_results(sweep_dir: str, rows: list[dict], runs: list[dict], plot) -> None:
    columns = _columns(rows)
    with open(os.path.join(sweep_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(value):
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value).replace("|", "/")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    with open(os.path.join(sweep_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    fields = list(dict.fromkeys(field for run in runs for field in run))
    for path in plot_results(sweep_dir, rows, fields, plot):
        print(f"ramjax sweep: plot {path}")


def plot_results(sweep_dir: str, rows: list[dict], fields: list[str], plot) -> list[str]:
    """Metric against one swept field, a line per combination of the others; PNG files in sweep_dir. Unfinished
    runs are drawn at their last evaluation (the table says which)."""
    try:
        import matplotlib
    except ImportError:
        print("ramjax sweep: matplotlib is not installed, so no plots; `pip install matplotlib` and rerun with --report")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = [r for r in rows if r["status"] in ("finished", "unfinished") and any(k.startswith("eval/") for k in r)]
    if not finished or not fields:
        return []
    plot = dict(plot or {})
    x = plot.get("x", fields[0])
    ys = plot.get("y", "eval/accuracy/mean")
    ys = [ys] if isinstance(ys, str) else list(ys)
    best_over = list(plot.get("best_over", []))
    series = plot.get("series", [f for f in fields if f != x and f not in best_over])
    paths = []
    for y in ys:
        if not any(y in r for r in finished):
            continue
        shown = best_rows(finished, y, [f for f in fields if f not in best_over]) if best_over else finished
        figure, axes = plt.subplots(figsize=(6, 4))
        key = lambda r: tuple(r.get(s) for s in series)  # noqa: E731
        for group, members in itertools.groupby(sorted(shown, key=lambda r: str(key(r))), key=key):
            members = [m for m in members if m.get(y) is not None]
            points = sorted(((_number(m[x]), m[y]) for m in members), key=lambda p: p[0])
            label = ", ".join(f"{s.split('.')[-1]}={v}" for s, v in zip(series, group)) or y
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        axes.set_xlabel(x)
        axes.set_ylabel(y + (f" (best over {', '.join(f.split('.')[-1] for f in best_over)})" if best_over else ""))
        if all(isinstance(_number(r[x]), float) and _number(r[x]) > 0 for r in finished):
            values = sorted({_number(r[x]) for r in finished})
            if len(values) > 2 and values[-1] / values[0] >= 16:
                axes.set_xscale("log")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
        figure.tight_layout()
        path = os.path.join(sweep_dir, "plot_" + re.sub(r"[^A-Za-z0-9]+", "_", y).strip("_") + ".png")
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(path)
    return paths


def best_rows(rows: list[dict], metric: str, keep: list[str]) -> list[dict]:
    """For each combination of the `keep` fields, the row with the highest `metric` (e.g. the best learning rate
    of each model and width)."""
    best = {}
    for row in rows:
        if row.get(metric) is None:
            continue
        key = tuple(str(row.get(f)) for f in keep)
        if key not in best or row[metric] > best[key][metric]:
            best[key] = row
    return list(best.values())


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


# ----------------------------------------------------------------------------------------------------------
# The command line.


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="ramjax sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mqar.py:ramnet", help="config file[:variant] of every run")
    parser.add_argument("--sweep", required=True, help="sweep file (Python, defines get_sweep())")
    parser.add_argument("--workdir", default=None, help="sweep directory (default runs/sweeps/<sweep file name>)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs' `ramjax train` commands, run nothing")
    parser.add_argument("--max-parallel", type=int, default=1, help="runs at the same time (default 1)")
    parser.add_argument("--devices", default=None, help="GPU indices to spread the runs over, e.g. 0,1,2,3")
    parser.add_argument("--report", action="store_true", help="only write the results table and plots from the "
                        "runs' directories (no training)")
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if not a.startswith("--config.")]
    if bad:
        parser.error(f"unexpected arguments {bad}; settings for every run go through --config.FIELD=VALUE")
    try:
        rows = sweep(args.config, args.sweep, workdir=args.workdir, dry_run=args.dry_run,
                     max_parallel=args.max_parallel, overrides=extra, devices=parse_devices(args.devices),
                     report_only=args.report)
    except ConfigError as error:
        raise SystemExit(f"ramjax sweep: {error}") from None
    if any(r["status"] == "failed" for r in rows):
        raise SystemExit(1)
