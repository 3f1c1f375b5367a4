"""SIGTERM as a preemption signal: the train loop saves the current step and exits 0 (rerunning resumes).

With several processes, every process must stop at the same step: a SIGTERM reaches the processes of a job at
slightly different times, and one that stops alone leaves the others waiting forever in a collective.
"""

from __future__ import annotations

import signal

import jax
import numpy as np


def install_sigterm_flag(flag: list):
    """SIGTERM appends its number to `flag` instead of killing the process. Returns the previous handler, or None
    where no handler can be installed (not the main thread)."""
    try:
        return signal.signal(signal.SIGTERM, lambda signum, frame: flag.append(signum))
    except ValueError:
        return None


def any_process(flag: bool) -> bool:
    """Whether `flag` is set in any process. Every process must call this at the same step: with several
    processes it is a host all-gather."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def ignore_sigterm() -> None:
    """From here to exit a second SIGTERM (a scheduler signalling every process, or repeating itself) must not
    kill a multi-process run while the distributed runtime shuts down (seen: exit -15 after the save)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
