"""Running the sweep's `ramjax train` processes: their commands, their status from their directories, and the
Launcher that spreads them over devices and stops them on SIGTERM."""

from __future__ import annotations

import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time

from ramjax.errors import ConfigError
from ramjax.sweep.grid import format_value


def train_command(config: str, workdir: str, run: dict, overrides: list[str]) -> list[str]:
    return ([sys.executable, "-m", "ramjax.cli", "train", f"--config={config}", f"--workdir={workdir}"] + overrides
            + [f"--config.{field}={format_value(value)}" for field, value in run.items()])


def printable(command: list[str]) -> str:
    return shlex.join(["ramjax"] + command[3:])


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
