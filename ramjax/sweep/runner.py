"""`ramjax sweep` from Python: `sweep(config, sweep_file, ...)` checks every run's config, runs the grid (or prints
its commands), and writes the results."""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from ramjax.errors import ConfigError
from ramjax.sweep.grid import format_value, load_sweep, memory_fractions, split_sweep_path, sweep_name
from ramjax.sweep.launcher import Launcher, check_gpu_budget, printable, run_status, train_command
from ramjax.sweep.results import collect, failure, write_results


def sweep(config: str, sweep_path: str, *, workdir: str | None = None, dry_run: bool = False, max_parallel: int = 1,
          overrides: list[str] = (), devices: list[str] = (), report_only: bool = False,
          only: str | None = None, gpu_budget: float = 1.0) -> list[dict]:
    """Runs (or, with dry_run, prints) the sweep; returns its result rows. `only` ("3,6-11"): train (or print)
    just the runs of those indices; the directory, the run names and the results table stay the whole grid's, so a
    grid too large for one sitting is trained in parts into one directory."""
    runs, plot, names = load_sweep(sweep_path)
    shares = memory_fractions(sweep_path, runs)
    if max_parallel < 1:
        raise ConfigError(f"--max-parallel: must be >= 1, got {max_parallel}")
    check_gpu_budget(gpu_budget)
    chosen = select_runs(only, len(runs))
    sweep_dir = workdir or os.path.join("runs", "sweeps", sweep_name(sweep_path))
    commands = [train_command(config, os.path.join(sweep_dir, name), run, list(overrides))
                for name, run in zip(names, runs)]
    if not report_only:
        validate_runs(config, names, runs, list(overrides))
    if dry_run:
        for i, device in zip(chosen, itertools.cycle(devices or [None])):
            print((f"CUDA_VISIBLE_DEVICES={device} " if device is not None else "")
                  + (f"XLA_PYTHON_CLIENT_MEM_FRACTION={shares[i]} " if shares[i] else "") + printable(commands[i]))
        return []
    if report_only:
        if not os.path.isdir(sweep_dir):
            raise ConfigError(f"--report: no sweep directory {sweep_dir!r} (run the sweep first)")
    else:
        run_grid(config, sweep_path, sweep_dir, names, runs, commands, overrides, list(devices), max_parallel, chosen,
                 shares, gpu_budget)
    rows = collect(sweep_dir, names, runs)
    write_results(sweep_dir, rows, runs, plot)
    failed = [r["run"] for r in rows if r["status"] == "failed"]
    unfinished = [r["run"] for r in rows if r["status"] in ("unfinished", "new")]
    print(f"ramjax sweep: results in {sweep_dir}/results.md" + (f"; {len(failed)} failed: {failed}" if failed else "")
          + (f"; {len(unfinished)} unfinished (rerun the same command to finish them)" if unfinished else ""))
    return rows


def select_runs(only: str | None, count: int) -> list[int]:
    """The run indices `only` names ("3,6-11": single indices and inclusive ranges, as in the run names' 000-
    prefixes), or all `count` of them when it is None."""
    if only is None:
        return list(range(count))
    chosen = set()
    for part in only.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            low, high = int(first), int(last if dash else first)
        except ValueError:
            raise ConfigError(f"--runs: {part!r} is not an index or a range like 6-11 (the grid's runs are "
                              f"0-{count - 1})") from None
        if low > high:
            raise ConfigError(f"--runs: {part!r} is a reversed range; write it low-high, as {high}-{low}")
        if not 0 <= low <= high < count:
            raise ConfigError(f"--runs: {part!r} is outside the grid's runs 0-{count - 1}")
        chosen.update(range(low, high + 1))
    return sorted(chosen)


def validate_runs(config: str, names: list[str], runs: list[dict], overrides: list[str]) -> None:
    """Every run's config built and checked here first, with the checks `ramjax train` makes before building
    anything (a missing config file, a misspelt field, a bad model, train, optim or data value: one ConfigError
    naming the run and the field), so that neither --dry-run nor the sweep starts on a typo."""
    from ramjax.configs import error_message, load_config, override
    from ramjax.train.setup import check_run_config

    items = [o[len("--config."):] for o in overrides]
    try:
        load_config(config, items)
    except (OSError, KeyError, AttributeError, ValueError, TypeError) as error:
        raise ConfigError(f"--config {config} {' '.join(overrides)}: {error_message(error)}") from None
    for name, run in zip(names, runs):
        try:
            fields = [f"{field}={format_value(value)}" for field, value in run.items()]
            check_run_config(override(load_config(config, items), fields))
        except (ConfigError, KeyError, AttributeError, ValueError, TypeError) as error:
            raise ConfigError(f"run {name}: {error_message(error)}") from None


def check_sweep_record(sweep_dir: str, record: dict) -> None:
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


def run_grid(config, sweep_path, sweep_dir, names, runs, commands, overrides, devices, max_parallel,
             chosen: list[int], shares: list[str | None] | None = None, gpu_budget: float = 1.0) -> None:
    file, argument = split_sweep_path(sweep_path)
    record = {"config": config, "sweep": os.path.abspath(file) + ("" if argument is None else f":{argument}"), "overrides": list(overrides),
              "runs": [{"name": n, "fields": r} for n, r in zip(names, runs)]}
    check_sweep_record(sweep_dir, json.loads(json.dumps(record, default=str)))
    os.makedirs(sweep_dir, exist_ok=True)
    path = os.path.join(sweep_dir, "sweep.json")
    if os.path.exists(path):  # the grid may have grown: keep the runs already recorded, add the new ones
        with open(path) as f:
            known = {r["name"]: r for r in json.load(f).get("runs", [])}
        record["runs"] = list(known.values()) + [r for r in record["runs"] if r["name"] not in known]
    with open(path, "w") as f:
        json.dump(record, f, indent=2, default=str)
    shares = shares or [None] * len(runs)
    todo = [(names[i], commands[i], shares[i]) for i in chosen
            if run_status(os.path.join(sweep_dir, names[i])) != "finished"]
    part = "" if len(chosen) == len(runs) else f" ({len(chosen)} chosen by --runs)"
    print(f"ramjax sweep: {len(runs)} runs in {sweep_dir}{part}; {len(chosen) - len(todo)} of those finished "
          f"already, {len(todo)} to run ({max_parallel} at a time"
          + (f" on devices {','.join(devices)})" if devices else ")"))
    launcher = Launcher(devices, max_parallel, gpu_budget)
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, launcher.stop) if on_main_thread else None
    try:
        with tqdm(total=len(todo), unit="run", desc="sweep") as progress, ThreadPoolExecutor(max_parallel) as pool:
            futures = {pool.submit(launcher.execute, command, os.path.join(sweep_dir, name), share): name
                       for name, command, share in todo}
            for future in futures:
                status, seconds = future.result()
                progress.update(1)
                failed = f": {failure(os.path.join(sweep_dir, futures[future]))}" if status == "failed" else ""
                progress.write(f"{futures[future]}: {status} in {seconds:.0f} s{failed}")
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    if launcher.stopping:
        print("ramjax sweep: SIGTERM received; running trainers were told to save and stop, no new runs started")
