"""The `ramjax sweep` command line (the usage is ramjax.sweep's docstring)."""

from __future__ import annotations

from ramjax.errors import ConfigError, exit_with_usage_error
from ramjax.sweep.launcher import parse_devices
from ramjax.sweep.runner import sweep


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="ramjax sweep", description=_description())
    parser.add_argument("--config", default="configs/mqar.py:ramnet", help="config file[:variant] of every run")
    parser.add_argument("--sweep", required=True,
                        help="sweep file (Python, defines get_sweep()); FILE.py:ARG calls get_sweep(ARG)")
    parser.add_argument("--workdir", default=None, help="sweep directory (default runs/sweeps/<sweep file name>)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs' `ramjax train` commands, run nothing")
    parser.add_argument("--max-parallel", type=int, default=1, help="runs at the same time (default 1)")
    parser.add_argument("--devices", default=None, help="GPU indices to spread the runs over, e.g. 0,1,2,3")
    parser.add_argument("--gpu-budget", type=float, default=1.0, help="the part of each GPU's memory this sweep's "
                        "runs may hold together (default 1; e.g. 0.5 to run two sweeps side by side on one GPU)")
    parser.add_argument("--runs", default=None, help="train only the runs of these indices, e.g. 0-5 or 3,8 (the "
                        "000- prefixes of the run names; --dry-run lists them); the results table still covers the "
                        "whole grid")
    parser.add_argument("--report", action="store_true", help="only write the results table and plots from the "
                        "runs' directories (no training)")
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if not a.startswith("--config.")]
    if bad:
        parser.error(f"unexpected arguments {bad}; settings for every run go through --config.FIELD=VALUE")
    try:
        rows = sweep(args.config, args.sweep, workdir=args.workdir, dry_run=args.dry_run,
                     max_parallel=args.max_parallel, overrides=extra, devices=parse_devices(args.devices),
                     report_only=args.report, only=args.runs, gpu_budget=args.gpu_budget)
    except ConfigError as error:
        exit_with_usage_error(f"ramjax sweep: {error}")
    if any(r["status"] == "failed" for r in rows):
        raise SystemExit(1)


def _description() -> str:
    import ramjax.sweep

    return ramjax.sweep.__doc__.splitlines()[0]
