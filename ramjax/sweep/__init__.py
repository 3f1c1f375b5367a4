"""`ramjax sweep`: run a grid of training runs from one config and a sweep file, and tabulate and plot them.

  ramjax sweep --config configs/mqar.py:ramnet --sweep configs/sweeps/NAME.py [--workdir DIR]
               [--dry-run] [--max-parallel N] [--devices 0,1,2,3] [--gpu-budget F] [--report]
               [--config.FIELD=VALUE ...]

A sweep file is Python, like a config file. It defines `get_sweep()`, returning the grid built from
`values(field, [...])` with `product(...)` (every combination) and `zipped(...)` (element by element), and may
define `PLOT = {"x": field, "y": metric, "series": [fields], "best_over": [fields]}` (best_over: plot only the
best run over those fields, e.g. the learning rate, for each combination of the others). `--sweep FILE.py:ARG`
calls `get_sweep(ARG)` (one file, several grids; the default directory is then <file name>_<ARG>):

    from ramjax.sweep import product, values, zipped

    def get_sweep():
        return product(values("model.pattern", ["ramnet", "attention"]),
                       zipped(values("model.d_model", [64, 128]), values("optim.learning_rate", [3e-3, 1e-3])))

Every run is `ramjax train` in its own process and workdir under the sweep directory (default
runs/sweeps/<sweep file name>), so a crash of one run does not end the sweep. Rerunning the same command skips
finished runs and resumes unfinished ones. `--dry-run` prints the `ramjax train` command of every run (for a
cluster scheduler) and runs nothing. `--devices` spreads the runs over those GPUs (each run sees one, through
CUDA_VISIBLE_DEVICES; with --max-parallel above the number of GPUs, runs share them, each with an equal part of
90% of the GPU's memory less what a process holds outside XLA's pool, unless XLA_PYTHON_CLIENT_MEM_FRACTION is
set: launcher.memory_share). A sweep file may also define `memory_fraction(run)`, the share of one GPU's memory
a run needs (a number in (0, 1], or None for that default): its process gets that XLA_PYTHON_CLIENT_MEM_FRACTION
and starts only when the shares of the runs on its GPU leave room for it, so that large and small runs share GPUs
in one sweep (--dry-run prints each share). `--gpu-budget F` keeps this sweep's runs within the part F of each
GPU (both the even split and the shares' packing), so that two sweeps can share GPUs side by side. At the end,
results.csv, results.md and plots (PNG) are written to the sweep directory; a failed run is a row saying so, with the
end of its error output, and an unfinished one (stopped, or still running elsewhere) shows its last evaluation.
`--report` only writes those results from the runs' directories. SIGTERM (a scheduler's time limit) is passed on
to the running trainers, which save a checkpoint and stop; no new run starts, the results are written, and the
next invocation resumes.
"""

from ramjax.sweep.grid import format_value, load_sweep, memory_fractions, product, run_name, values, zipped
from ramjax.sweep.launcher import Launcher, parse_devices, printable, run_status, train_command
from ramjax.sweep.results import best_rows, collect, error_summary, last_evaluation, plot_results, write_results
from ramjax.sweep.runner import check_sweep_record, run_grid, sweep, validate_runs
from ramjax.sweep.cli import main

__all__ = ["values", "product", "zipped", "load_sweep", "memory_fractions", "run_name", "format_value",
           "train_command", "printable", "run_status", "Launcher", "parse_devices", "sweep", "validate_runs",
           "check_sweep_record", "run_grid", "collect", "error_summary", "last_evaluation", "write_results",
           "plot_results", "best_rows", "main"]
