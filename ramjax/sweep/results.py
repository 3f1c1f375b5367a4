"""A sweep's results: one row per run from its directory (summary, last evaluation, or error), the CSV and
Markdown tables and the plots."""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import statistics

import ml_collections

from ramjax.data.tasks import parse_settings
from ramjax.sweep.grid import format_value
from ramjax.sweep.launcher import run_status
from ramjax.train.metrics import best_per_seed


def collect(sweep_dir: str, names: list[str], runs: list[dict]) -> list[dict]:
    rows = []
    for name, run in zip(names, runs):
        directory = os.path.join(sweep_dir, name)
        row = {"run": name, **{field: format_value(value) for field, value in run.items()}}
        status = run_status(directory)
        row["status"] = status
        if status == "finished":
            with open(os.path.join(directory, "summary.json")) as f:
                summary = json.load(f)
            row.update({"steps": summary.get("steps"), "parameters": summary.get("parameters"),
                        "state_size": summary.get("state_size"),
                        "wall_s": round(summary.get("wall_s", float("nan")), 1),
                        "train/loss": summary.get("train", {}).get("loss")})
            row.update(best_of_seeds(directory))
            row.update(summary.get("eval", {}))
        elif status == "unfinished":
            row["state_size"] = state_size_from_config(directory)
            row.update(best_of_seeds(directory))
            row.update(last_evaluation(directory))
        elif status == "failed":
            row["error"] = failure(directory)
        rows.append(row)
    return rows


# A line that states an error: ramjax's own one-line messages, or the last line of a Python traceback.
_ERROR_LINE = re.compile(r"^(ramjax \w+: |[\w.]*(Error|Exception|Interrupt)\b|Killed|Segmentation fault)")


def failure(directory: str) -> str:
    """The error of the failed run in `directory` (its error.txt), in one line."""
    with open(os.path.join(directory, "error.txt")) as f:
        return error_summary([line.strip() for line in f.read().splitlines() if line.strip()])


def error_summary(lines: list[str]) -> str:
    """The error of a failed run from the end of its log (error.txt: exit code, then the log's tail, then perhaps a
    "hint: " line): the last line that states an error (progress-bar redraws dropped), with the exit code and the
    hint."""
    if not lines:
        return "failed"
    hint = None
    if len(lines) > 1 and lines[-1].startswith("hint: "):
        hint, lines = lines[-1][len("hint: "):], lines[:-1]
    shown = [line.split("\r")[-1].strip() for line in lines[1:]]
    errors = [line for line in shown if _ERROR_LINE.search(line)]
    message = errors[-1] if errors else (shown[-1] if shown else "")
    summary = f"{message} ({lines[0]})" if message else lines[0]
    return f"{summary}; {hint}" if hint else summary


def last_evaluation(directory: str) -> dict:
    """The newest evaluation an unfinished run logged (its step as eval_step), from metrics.jsonl."""
    latest = {}
    for record in _records(directory):
        if any(k.startswith("eval/") for k in record):
            latest = record
    if not latest:
        return {}
    return {"eval_step": latest.get("step"), **{k: v for k, v in latest.items() if k.startswith("eval/")}}


def state_size_from_config(directory: str) -> int | None:
    """The recurrent state size a finished run's summary would give (at the longest evaluation length), from the
    run's config.json, for a run stopped before its summary; None without a readable config."""
    # Imported here: ramjax.models brings in JAX and Flax (~2 s), which `ramjax sweep --dry-run` does not need.
    from ramjax.models.state_size import recurrent_state_size

    try:
        with open(os.path.join(directory, "config.json")) as f:
            config = json.load(f)
        longest = max(n for _, n in parse_settings("data.eval_settings", config["data"]["eval_settings"]))
        return recurrent_state_size(ml_collections.ConfigDict(config["model"]), longest)
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None


def best_of_seeds(directory: str) -> dict:
    """A multi-seed run (train.num_seeds > 1 in its config.json): each seed's best evaluation so far (its highest
    mean accuracy over slices) as best/accuracy/mean and /std over seeds, the worst seed's best, and the seeds'
    bests in seed order (best/accuracy/per_seed); {} for a single-seed run or none evaluated yet. The papers we
    compare with report these (the best evaluation of each seed, mean +- std)."""
    try:
        with open(os.path.join(directory, "config.json")) as f:
            n = json.load(f).get("train", {}).get("num_seeds", 1)
        values = [b["accuracy"] for b in best_per_seed(directory, n) if b["step"] is not None] if n > 1 else []
    except (OSError, ValueError):  # no record yet, or a damaged metrics.jsonl: the row says what it can
        return {}
    if not values:
        return {}
    return {"best/accuracy/mean": statistics.fmean(values), "best/accuracy/std": statistics.pstdev(values),
            "best/accuracy/min": min(values), "best/accuracy/per_seed": " ".join(f"{v:.3f}" for v in values)}


def _records(directory: str):
    """metrics.jsonl's records; a line cut short by a kill is skipped."""
    path = os.path.join(directory, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


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

    # Markdown: one seed's numbers stay in the CSV; the table keeps the means, stds and best-of-seed columns.
    columns = [c for c in columns if not re.search(r"/seed_\d+$", c)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    with open(os.path.join(sweep_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    fields = list(dict.fromkeys(field for run in runs for field in run))
    # Plot against what changes from run to run (a field every run sets alike, e.g. train.num_seeds, is no axis).
    varied = [f for f in fields if len({format_value(run.get(f)) for run in runs}) > 1]
    for path in plot_results(sweep_dir, rows, varied or fields, plot):
        print(f"ramjax sweep: plot {path}")


def plot_results(sweep_dir: str, rows: list[dict], fields: list[str], plot) -> list[str]:
    """Metric against one swept field, a line per combination of the others; PNG files in sweep_dir. Unfinished
    runs are drawn at their last evaluation (the table says which)."""
    import matplotlib  # a dependency; imported here so that commands without plots do not load it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = [r for r in rows if r["status"] in ("finished", "unfinished") and any(k.startswith("eval/") for k in r)]
    if not finished or not fields:
        return []
    x, ys, series, best_over = plot_fields(plot, fields, columns=[k for r in finished for k in r])
    paths = []
    for y in ys:
        if not any(y in r for r in finished):
            continue
        shown = best_rows(finished, y, [f for f in fields if f not in best_over]) if best_over else finished
        figure, axes = plt.subplots(figsize=(6, 4))
        key = lambda r: tuple(r.get(s) for s in series)  # noqa: E731
        for group, members in itertools.groupby(sorted(shown, key=lambda r: str(key(r))), key=key):
            # A run without the x value (a result column such as state_size that an unfinished run may lack)
            # is left out of the plot; the table still shows it.
            members = [m for m in members if m.get(y) is not None and m.get(x) is not None]
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


def plot_fields(plot, fields: list[str], columns=()) -> tuple[str, list[str], list[str], list[str]]:
    """(x, ys, series, best_over) of a sweep file's PLOT, kept to the fields this sweep varies (x may also be a
    result column, e.g. state_size): a sweep file whose argument picks a smaller grid (one that fixes the PLOT's
    x in the config) still plots, against the first field it does vary, and says so."""
    plot = dict(plot or {})
    ys = plot.get("y", "eval/accuracy/mean")
    ys = [ys] if isinstance(ys, str) else list(ys)
    best_over = [f for f in plot.get("best_over", []) if f in fields]
    series = [f for f in plot["series"] if f in fields] if "series" in plot else None
    x = plot.get("x", fields[0])
    if x not in fields and x not in columns:
        others = [f for f in fields if f not in best_over and f not in (series or [])] or fields
        print(f"ramjax sweep: the sweep file's PLOT x {x!r} is not varied by this sweep; plotting against "
              f"{others[0]!r} instead")
        x = others[0]
    if series is None or x in series:
        series = [f for f in (series or fields) if f != x and f not in best_over]
    return x, ys, series, best_over


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
