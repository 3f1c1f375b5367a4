"""Orbax checkpoints of the train state plus a JSON of run metadata (step, data position, seeds).

Saves are asynchronous (training continues while the previous step's arrays are written) and keep the newest
`keep` checkpoints. Restoring takes the abstract state with the current run's shardings, so a checkpoint is
read straight into the layout this run uses.
"""

from __future__ import annotations

import os
import shutil
import time

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


class Checkpoints:
    def __init__(self, directory: str, *, keep: int, every: int):
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints: must be >= 1, got {keep}")
        if every < 1:
            raise ValueError(f"train.checkpoint_every: must be >= 1, got {every}")
        self.every = every
        self.options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, create=True,
                                                    enable_async_checkpointing=True)
        self.directory = os.path.abspath(directory)
        self.manager = self._open()

    def _open(self):
        return ocp.CheckpointManager(self.directory, options=self.options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def is_save_step(self, step: int) -> bool:
        return step % self.every == 0

    def restore_newest_good(self, abstract_state, *, log=None):
        """(state, meta) of the newest checkpoint that restores, or None if none does.

        A checkpoint that fails to restore (a corrupt or truncated file; Orbax already ignores saves that never
        finished) is moved aside to `<dir>/corrupt-<step>-<time>`, kept for inspection but out of the way of
        keep-N and of the next resume, and the one before it is tried.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self.restore(step, abstract_state)
            except Exception as error:  # noqa: BLE001 -- any failure to read means: try the previous one
                self.manager.close()
                aside = os.path.join(self.directory, f"corrupt-{step}-{int(time.time())}")
                if jax.process_index() == 0:
                    shutil.move(os.path.join(self.directory, str(step)), aside)
                if jax.process_count() > 1:
                    multihost_utils.sync_global_devices(f"ramjax: checkpoint {step} moved aside")
                self.manager = self._open()
                if log:
                    log(f"ramjax train: checkpoint step {step} in {self.directory} does not restore "
                        f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); moved it to {aside} and "
                        "trying the previous one")
        return None

    def corrupt_dirs(self) -> list[str]:
        """The checkpoints `restore_newest_good` moved aside, by name (corrupt-STEP-TIME)."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(n for n in os.listdir(self.directory) if n.startswith("corrupt-"))

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        """Save at `step` if it is a checkpoint step (or `force`); True when a save started."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state):
        """(state, meta) of checkpoint `step`, placed as `abstract_state` (ShapeDtypeStructs with shardings) says."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored.state, restored.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
