"""The grid language of sweep files and loading one: `values`, `product`, `zipped` build a grid, a list of runs,
each a dict {field: value} (fields in the order they were declared); `load_sweep` reads a sweep file; `run_name`
names each run's directory."""

from __future__ import annotations

import importlib.util
import os
import re

from ramjax.errors import ConfigError


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


def split_sweep_path(path: str) -> tuple[str, str | None]:
    """"sweeps/a.py:65536" -> ("sweeps/a.py", "65536"); "sweeps/a.py" -> ("sweeps/a.py", None). The part after
    the file's ":" is passed to its get_sweep(), as a config file's variant is passed to its get_config()."""
    file, sep, argument = path.rpartition(":")
    if sep and file.endswith(".py"):
        return file, argument
    return path, None


def sweep_name(path: str) -> str:
    """The sweep's default directory name: the file's name, with its argument if it has one."""
    file, argument = split_sweep_path(path)
    name = os.path.splitext(os.path.basename(file))[0]
    return name if argument is None else f"{name}_{argument}"


def _load_module(path: str):
    if not os.path.exists(path):
        raise ConfigError(f"--sweep: no such file {path!r}")
    spec = importlib.util.spec_from_file_location(f"sweep_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as error:  # the user's file, not ramjax: where, in one line (other errors keep their trace)
        raise ConfigError(f"--sweep {path}: line {error.lineno}: {error.msg}: {(error.text or '').strip()!r}") from None
    return module


def load_sweep(path: str):
    """(runs, plot spec, run names) from a sweep file, "FILE.py" or "FILE.py:ARGUMENT" (get_sweep(ARGUMENT))."""
    path, argument = split_sweep_path(path)
    module = _load_module(path)
    if not hasattr(module, "get_sweep"):
        raise ConfigError(f"--sweep {path}: defines no get_sweep()")
    try:
        runs = module.get_sweep() if argument is None else module.get_sweep(argument)
    except TypeError as error:
        if argument is not None and "positional argument" in str(error):
            raise ConfigError(f"--sweep {path}:{argument}: its get_sweep() takes no argument") from None
        raise
    if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
        raise ConfigError(f"--sweep {path}: get_sweep() must return a non-empty list of runs (use values, product, "
                          "zipped from ramjax.sweep)")
    names = [run_name(i, r) for i, r in enumerate(runs)]
    # BASE: fields every run starts from, unless it sets them itself; not part of the run names (e.g. the method a
    # sweep's results were recorded with, after the config's default changed).
    base = getattr(module, "BASE", {})
    if not isinstance(base, dict):
        raise ConfigError(f"--sweep {path}: BASE must be a dict of field -> value, got {type(base).__name__}")
    runs = [{**base, **r} for r in runs]
    plot = getattr(module, "PLOT", None)
    set_fields = {field for run in runs for field in run}
    # A misspelt field here would drop out of the plot without a word. Checked on the whole grid only: a file's
    # argument may pick a smaller grid that fixes a PLOT field (plot_fields then plots without it).
    for key in ("series", "best_over") if argument is None else ():
        unknown = [f for f in (plot or {}).get(key, []) if f not in set_fields]
        if unknown:
            raise ConfigError(f"--sweep {path}: PLOT {key} {unknown} is not a field any run sets (they set: "
                              f"{', '.join(sorted(set_fields))})")
    return runs, plot, names


def memory_fractions(path: str, runs: list[dict]) -> list[str | None]:
    """Each run's share of one GPU's memory (its process's XLA_PYTHON_CLIENT_MEM_FRACTION) from the sweep file's
    optional `memory_fraction(run)` (the run's fields -> a number in (0, 1], or None for the launcher's share);
    all None without one. For grids whose runs need very different memory (RAM-Net at d_model 256 beside small
    baselines): the launcher starts a run only when its device has room for its share."""
    module = _load_module(split_sweep_path(path)[0])
    function = getattr(module, "memory_fraction", None)
    if function is None:
        return [None] * len(runs)
    shares = []
    for index, run in enumerate(runs):
        share = function(dict(run))
        if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float))
                                  or not 0 < share <= 1):
            raise ConfigError(f"--sweep {path}: memory_fraction() of run {index} ({run_name(index, run)}) must be "
                              f"a number in (0, 1] (a share of one GPU's memory) or None, got {share!r}")
        shares.append(None if share is None else f"{share:g}")
    return shares


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def run_name(index: int, run: dict) -> str:
    """A directory name: the run's index and its swept values, e.g. 003-d_model=64-learning_rate=0.001."""
    parts = [f"{field.split('.')[-1]}={format_value(value)}" for field, value in run.items()]
    name = "-".join([f"{index:03d}"] + parts)
    return re.sub(r"[^A-Za-z0-9_.=,()+-]", "_", name)[:180]
