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


# Device memory a training process holds outside XLA's pool (CUDA context, library workspaces, command-buffer
# graphs): seen on one H200 with jax 0.11 (2026-12-01), 10 processes with pools of 0.07 of its ~139 GiB (~10.4 GB
# each) used 135,062 MiB (141.6 GB) by nvidia-smi, ~3.7 GB each beyond its pool; 12 runs at the old default split
# (0.9 / 12 of the memory each) ran out of memory instantiating their command buffers.
PROCESS_OVERHEAD_GB = 4.0


def gpu_memory_gb(device: str | None) -> float | None:
    """Total memory of GPU `device` (the first one for None) in GB from nvidia-smi; None without one."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits",
                               "-i", device or "0"], capture_output=True, text=True, timeout=30)
        return float(done.stdout.split()[0]) * 2**20 / 1e9 if done.returncode == 0 else None  # MiB -> GB
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def check_gpu_budget(budget: float) -> float:
    """`budget` if it is a fraction in (0, 1] of a GPU's memory, else a ConfigError naming --gpu-budget."""
    if not 0.0 < budget <= 1.0:
        raise ConfigError(f"--gpu-budget: must be a fraction in (0, 1] of each GPU's memory, got {budget}")
    return budget


def memory_share(runs_per_device: int, device: str | None, budget: float = 1.0) -> str | None:
    """XLA_PYTHON_CLIENT_MEM_FRACTION for each of `runs_per_device` runs sharing a GPU: 90% of the part `budget`
    of its memory, less each process's memory outside the pool, split evenly (None for one run with the whole GPU:
    XLA's own default)."""
    if runs_per_device <= 1 and budget >= 1.0:
        return None
    total = gpu_memory_gb(device)
    if total is None:  # no nvidia-smi (a CPU, or another accelerator): an even split of 90%
        return f"{0.9 * budget / runs_per_device:.3f}"
    share = (0.9 * budget * total - runs_per_device * PROCESS_OVERHEAD_GB) / runs_per_device / total
    if share < 0.005:
        part = "" if budget >= 1.0 else f" (--gpu-budget {budget:g} of it)"
        raise ConfigError(f"--max-parallel: {runs_per_device} runs on one GPU of {total:.0f} GB{part} leave each less "
                          f"than 0.5% of it once each process's ~{PROCESS_OVERHEAD_GB:.0f} GB outside XLA's pool is "
                          f"counted; run fewer at a time, or set XLA_PYTHON_CLIENT_MEM_FRACTION yourself")
    return f"{share:.3f}"


def run_status(workdir: str) -> str:
    """finished, failed, unfinished (a checkpoint or a log, no summary) or new."""
    if os.path.exists(os.path.join(workdir, "summary.json")):
        return "finished"
    if os.path.exists(os.path.join(workdir, "error.txt")):
        return "failed"
    return "unfinished" if os.path.exists(workdir) else "new"


class Launcher:
    """Starts training processes, each on the next free device slot, and stops them all on request.

    A run may bring its own memory share (a sweep file's memory_fraction(run)); then it starts only when the
    shares of the runs on its device, each with the memory a process holds outside XLA's pool, leave room for
    its own (a run alone on a device always starts), so that large and small runs can share GPUs in one sweep.
    `gpu_budget`: the part of each GPU this sweep's runs may hold together (below 1 to leave the rest to another
    sweep on the same GPUs)."""

    def __init__(self, devices: list[str], max_parallel: int, gpu_budget: float = 1.0):
        self.gpu_budget = check_gpu_budget(gpu_budget)
        self.slots = queue.Queue()
        for i in range(max_parallel):
            self.slots.put(devices[i % len(devices)] if devices else None)
        # Without --devices every run shares the default device: split its memory between them too.
        per_device = -(-max_parallel // len(devices)) if devices else max_parallel
        self.memory_fraction = (os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"]
                                if "XLA_PYTHON_CLIENT_MEM_FRACTION" in os.environ
                                else memory_share(per_device, devices[0] if devices else None, gpu_budget))
        self.stopping = False
        self.running: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.reserved: dict = {}  # device -> the shares (with overheads) of its runs that brought their own
        self.memory_changed = threading.Condition()
        self._overheads: dict = {}

    def stop(self, signum=signal.SIGTERM, frame=None) -> None:
        """No new runs; the running trainers get SIGTERM (they save a checkpoint and exit)."""
        self.stopping = True
        with self.lock:
            for process in self.running:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)

    def execute(self, command: list[str], workdir: str, memory_fraction: str | None = None) -> tuple[str, float]:
        """Runs one training process; its output goes to workdir/train.log. Returns (status, seconds).
        memory_fraction: this run's XLA_PYTHON_CLIENT_MEM_FRACTION, instead of the launcher's."""
        if self.stopping:
            return "not started", 0.0
        device = self.slots.get()
        try:
            need = float(memory_fraction) + self._overhead(device) if memory_fraction else 0.0
            if not self._reserve(device, need):
                return "not started", 0.0
            try:
                return self._execute(command, workdir, device, memory_fraction or self.memory_fraction)
            finally:
                with self.memory_changed:
                    self.reserved[device] -= need
                    self.memory_changed.notify_all()
        finally:
            self.slots.put(device)

    def _reserve(self, device, need: float) -> bool:
        """Waits until `need` of the device's memory is free (or the device has no reserved run); False if the
        launcher is stopped meanwhile. Timed waits: stop() may run in a signal handler, which must not lock."""
        with self.memory_changed:
            while (self.reserved.get(device, 0.0) > 0 and self.reserved[device] + need > self.gpu_budget + 1e-9
                   and not self.stopping):
                self.memory_changed.wait(timeout=1.0)
            if self.stopping:
                return False
            self.reserved[device] = self.reserved.get(device, 0.0) + need
            return True

    def _overhead(self, device) -> float:
        """The share of the device a process holds outside XLA's pool (0 when its size is unknown)."""
        if device not in self._overheads:
            total = gpu_memory_gb(device)
            self._overheads[device] = PROCESS_OVERHEAD_GB / total if total else 0.0
        return self._overheads[device]

    def _execute(self, command: list[str], workdir: str, device, memory_fraction: str | None) -> tuple[str, float]:
        os.makedirs(workdir, exist_ok=True)
        error_path = os.path.join(workdir, "error.txt")
        if os.path.exists(error_path):
            os.remove(error_path)  # a retry
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        if memory_fraction:
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = memory_fraction
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
        hint = out_of_memory_hint(tail, env.get("XLA_PYTHON_CLIENT_MEM_FRACTION"))
        with open(error_path, "w") as f:
            f.write(f"exit code {returncode}\n" + "\n".join(tail) + "\n" + (f"hint: {hint}\n" if hint else ""))
        return "failed", time.time() - start


def out_of_memory_hint(log_tail: list[str], memory_fraction: str | None) -> str | None:
    """What to change when a run that shared a GPU ran out of its memory (XLA's RESOURCE_EXHAUSTED), or None.
    Seen on an H200: U = 1 RAM-Net runs at 0.028 of the GPU each, beside 10 other runs."""
    if not memory_fraction or not any("RESOURCE_EXHAUSTED" in line for line in log_tail):
        return None
    return (f"out of device memory at XLA_PYTHON_CLIENT_MEM_FRACTION={memory_fraction}, this run's share of the "
            f"GPU: run fewer at a time (--max-parallel) or set XLA_PYTHON_CLIENT_MEM_FRACTION larger, then rerun "
            f"the sweep (finished runs are kept)")


def parse_devices(text: str | None) -> list[str]:
    if not text:
        return []
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices or not all(d.isdigit() for d in devices):
        raise ConfigError(f"--devices: a comma-separated list of GPU indices like 0,1,2,3, got {text!r}")
    return devices
