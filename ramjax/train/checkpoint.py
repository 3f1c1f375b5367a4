"""Orbax checkpoints of the train state plus a JSON of run metadata (step, data position, seeds).

Saves are asynchronous (training continues while the previous step's arrays are written) and keep the newest
`keep` checkpoints. Restoring takes the abstract state with the current run's shardings, so a checkpoint is
read straight into the layout this run uses.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, directory: str, *, keep: int, every: int):
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints: must be >= 1, got {keep}")
        if every < 1:
            raise ValueError(f"train.checkpoint_every: must be >= 1, got {every}")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, create=True,
                                               enable_async_checkpointing=True)
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

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
