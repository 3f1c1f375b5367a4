"""Multi-process (multi-host) start-up: `jax.distributed.initialize` when, and only when, the run has several
processes.

Where the process layout comes from, first match wins:
  1. explicit arguments (the `ramjax train` flags --coordinator_address, --num_processes, --process_id);
  2. the environment: RAMJAX_COORDINATOR_ADDRESS, RAMJAX_NUM_PROCESSES, RAMJAX_PROCESS_ID;
  3. a cluster JAX detects by itself: a SLURM job step with more than one task (`srun`), or a Cloud TPU pod
     slice with more than one worker; then `jax.distributed.initialize()` gets no arguments.
Otherwise the run is one process and nothing is initialised. Must run before anything touches a JAX device.
"""

from __future__ import annotations

import os

import jax

from ramjax.errors import ConfigError

ENV = ("RAMJAX_COORDINATOR_ADDRESS", "RAMJAX_NUM_PROCESSES", "RAMJAX_PROCESS_ID")


def _cluster_detected() -> str | None:
    if int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1")) or 1) > 1 and \
            "SLURM_JOB_ID" in os.environ:
        return "SLURM"
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # a Cloud TPU slice with more than one worker
        return "TPU pod"
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> str:
    """Initialises jax.distributed if the run is multi-process; returns how the layout was found."""
    if coordinator_address is None and num_processes is None and process_id is None:
        coordinator_address = os.environ.get(ENV[0]) or None
        num_processes = int(os.environ[ENV[1]]) if os.environ.get(ENV[1]) else None
        process_id = int(os.environ[ENV[2]]) if os.environ.get(ENV[2]) else None
        source = "environment"
    else:
        source = "flags"
    given = [x is not None for x in (coordinator_address, num_processes, process_id)]
    if any(given):
        if not all(given):
            raise ConfigError(f"multi-process run from {source}: give all of the coordinator address, the number "
                              f"of processes and this process's id (flags --coordinator_address, --num_processes, "
                              f"--process_id or the variables {', '.join(ENV)}); got coordinator "
                              f"{coordinator_address!r}, processes {num_processes!r}, id {process_id!r}")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ConfigError(f"multi-process run: process id must be in [0, {num_processes}), got {process_id}")
        if num_processes == 1:
            return "single process"
        _use_cpu_collectives_if_cpu()
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
        return f"{num_processes} processes ({source})"
    cluster = _cluster_detected()
    if cluster:
        jax.distributed.initialize()
        return f"{jax.process_count()} processes ({cluster})"
    return "single process"


def _use_cpu_collectives_if_cpu() -> None:
    """CPU processes talk through gloo (JAX's CPU backend has no cross-process collectives otherwise)."""
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    if platforms.startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
