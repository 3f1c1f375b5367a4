"""Orbax checkpoints of the train state plus a JSON of run metadata (step, data position, seeds) and, for
streamed data (language models), the data iterator's state of every process.

Saves are asynchronous (training continues while the previous step's arrays are written) and keep the newest
`keep` checkpoints. Restoring takes the abstract state with the current run's shardings, so a checkpoint is
read straight into the layout this run uses.

The data item (`track_data`) is grain's Orbax item (grain.checkpoint.CheckpointHandler): each process writes
its own iterator state, `<step>/data/process_<i>-of-<n>.json`, so a resume on n processes reads its own and a
resume on another number reads all n (`data_states`).
"""

from __future__ import annotations

import os
import shutil
import time

import json
import re
from typing import Callable

import grain
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
        self.data_state: Callable[[int], dict | None] | None = None
        self.manager = self._open()

    def _open(self):
        return ocp.CheckpointManager(self.directory, options=self.options, item_names=("state", "meta", "data"))

    def track_data(self, state_at: Callable[[int], dict | None]) -> None:
        """Every later save of step s also saves `state_at(s)`, this process's data-iterator state before the
        batch of step s (a JSON-able dict; None: none to save)."""
        self.data_state = state_at

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

    def shape_changes(self, step: int, abstract_state) -> list[str] | None:
        """Where checkpoint `step`'s stored state differs in shape from `abstract_state` ("path: stored (64,), now
        (32,)", and paths only one of them has), or None when its metadata does not read (a corrupt checkpoint:
        `restore_newest_good` deals with it). A run whose sizes changed cannot resume from its checkpoints, and its
        checkpoints are not corrupt: the caller says so before anything is moved or recorded."""
        try:
            metadata = ocp.StandardCheckpointer().metadata(os.path.join(self.directory, str(step), "state"))
        except Exception:  # noqa: BLE001 -- unreadable metadata is corruption, judged when restoring
            return None
        stored = _shapes(getattr(metadata, "item_metadata", metadata))  # a StepMetadata in newer Orbax
        if not stored:
            return None
        now = _shapes(abstract_state)
        if not set(stored) & set(now):  # leaves named in a way this reading does not know: no judgement
            return None
        stored = dict(sorted(stored.items(), key=lambda item: (not item[0].startswith("params"), item[0])))
        changes = [f"{path}: stored {stored[path]}, now {now[path]}" for path in stored
                   if path in now and stored[path] != now[path]]
        changes += [f"{path}: stored {stored[path]}, not in this run's model" for path in stored if path not in now]
        changes += [f"{path}: not stored, now {now[path]}" for path in now if path not in stored]
        return changes

    def corrupt_dirs(self) -> list[str]:
        """The checkpoints `restore_newest_good` moved aside, by name (corrupt-STEP-TIME)."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(n for n in os.listdir(self.directory) if n.startswith("corrupt-"))

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        """Save at `step` if it is a checkpoint step (or `force`); True when a save started."""
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        data = self.data_state(step) if self.data_state is not None else None
        if data is not None:
            # grain's handler asks the item for its state as it saves: hand it the state of `step`, frozen now.
            items["data"] = grain.checkpoint.CheckpointSave(_SavedState(data))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state):
        """(state, meta) of checkpoint `step`, placed as `abstract_state` (ShapeDtypeStructs with shardings) says."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored.state, restored.meta

    def data_states(self, step: int) -> list[dict] | None:
        """The data-iterator state of every process that saved checkpoint `step`, by process index; None if the
        checkpoint has none (synthetic data, or saved before the trainer kept one)."""
        directory = os.path.join(self.directory, str(step), "data")
        if not os.path.isdir(directory):
            return None
        files = {}
        for name in os.listdir(directory):
            match = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", name)
            if match:
                files[int(match[1])] = (int(match[2]), os.path.join(directory, name))
        counts = {count for count, _ in files.values()}
        if len(counts) != 1 or sorted(files) != list(range(counts.pop())):
            raise ValueError(f"{directory}: the data-iterator states of some processes are missing "
                             f"({sorted(os.listdir(directory))})")
        states = []
        for index in sorted(files):
            with open(files[index][1]) as f:
                states.append(json.load(f))
        return states

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


class _SavedState:
    """A data-iterator state, as grain's CheckpointHandler asks an iterator for it (get_state() -> JSON bytes)."""

    def __init__(self, state: dict):
        self.state = json.dumps(state, indent=1).encode()

    def get_state(self) -> bytes:
        return self.state


def _shapes(tree) -> dict[str, tuple]:
    """{"params/layers/0/w": shape} of a state tree's arrays (ShapeDtypeStructs, arrays or Orbax's metadata), the
    path's keys as plain names so that a stored tree and a live one name a leaf alike."""
    def path_name(path):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        return name.removesuffix("/value")  # an nnx Variable's leaf, stored or live

    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {path_name(path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}
