"""Wall-clock timing of jitted functions, the events of a profiler trace, and the facts a results file records about
the machine."""

from __future__ import annotations

import ast
import contextlib
import datetime
import glob
import gzip
import importlib
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

import jax


def time_call(fn: Callable, *args, warmup: int = 2, iters: int = 10) -> float:
    """Median seconds of `fn(*args)` over `iters` calls after `warmup` calls (the first one compiles)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def environment() -> dict:
    """Device, versions and date, for the header of a results file."""
    import flax
    import jaxlib

    device = jax.devices()[0]
    described = f"{jax.device_count()} x {device.device_kind} ({device.platform})"
    if device.platform == "cpu":
        described += f", {os.cpu_count()} cores"
    return {
        "device": described,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def environment_lines(command: str | None = None) -> str:
    """The header lines of a results file: "- key: value" for the device, versions and date, then the command
    (default: this process's sys.argv)."""
    command = " ".join(sys.argv) if command is None else command
    return "\n".join(f"- {k}: {v}" for k, v in environment().items()) + f"\n- command: `{command}`\n"


def parse_module_setting(setting: str):
    """"package.module.NAME=value" -> (module, NAME, value), checked: the module imports, already defines NAME, and
    value is a Python literal (or, for a switch whose value is a string, a bare word: tf32x3 as 'tf32x3')."""
    target, sep, text = setting.partition("=")
    module_name, _, name = target.strip().rpartition(".")
    if not sep or not module_name or not name:
        raise ValueError(f"kernel_settings: expected 'package.module.NAME=value', got {setting!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"kernel_settings: {setting!r}: cannot import {module_name!r} ({error})") from None
    if not hasattr(module, name):
        raise ValueError(f"kernel_settings: {setting!r}: {module_name} has no {name!r}")
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        if isinstance(getattr(module, name), str) and text.strip().isidentifier():
            return module, name, text.strip()  # a bare word for a string switch (a shell has eaten the quotes)
        raise ValueError(f"kernel_settings: {setting!r}: the value must be a Python literal (True, 32, "
                         f"'name'), got {text.strip()!r}") from None
    return module, name, value


def apply_module_settings(settings) -> None:
    """Sets module-level switches for an A/B timing, each "package.module.NAME=value" (value a Python literal),
    e.g. "kernels.gla_chunk.SUB=32". Only names the module already defines can be set, so that a
    typo is an error rather than a setting that silently does nothing. Call before anything is traced."""
    for module, name, value in [parse_module_setting(setting) for setting in settings]:
        setattr(module, name, value)


@contextlib.contextmanager
def module_settings(settings):
    """apply_module_settings for the body of a `with` block, the previous values restored after it. JAX's caches
    are cleared on the way in and out (when there are settings): the switches are read when a function is traced,
    and a trace cached under other values would otherwise be reused."""
    parsed = [parse_module_setting(setting) for setting in settings]  # every setting checked before any is set
    saved = [(module, name, getattr(module, name)) for module, name, _ in parsed]
    if parsed:
        jax.clear_caches()
    try:
        for module, name, value in parsed:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)
        if parsed:
            jax.clear_caches()


def trace_events(trace_dir: str) -> tuple[list[dict], dict]:
    """Every complete ('X') event of the newest perfetto trace under trace_dir (jax.profiler.trace(...,
    create_perfetto_trace=True)), and pid -> process name."""
    paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise SystemExit(f"no perfetto trace under {trace_dir}")
    with gzip.open(max(paths, key=os.path.getmtime)) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes = {e["pid"]: e["args"].get("name", "") for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    return [e for e in events if e.get("ph") == "X"], processes
