"""Placing global batches on the mesh, and the accuracy / loss of a model on a task's evaluation slices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ramjax.errors import ConfigError


class Batches:
    """Batches as sharded jax.Arrays of the global batch: `put` takes the global batch (every process makes all
    of it, from (seed, step), and contributes its own rows), `put_local` only this process's rows (a streamed
    dataset, each process reading its own)."""

    def __init__(self, batch_sharding):
        self.sharding = batch_sharding

    def put(self, batch) -> dict:
        rows = batch.inputs.shape[0] // jax.process_count()
        start = jax.process_index() * rows
        return {field: jax.make_array_from_process_local_data(self.sharding, np.asarray(value[start:start + rows]))
                for field, value in batch._asdict().items()}

    def check_rows_split_by_process(self, batch_size: int) -> None:
        """put_local needs each process's devices to hold its own block of batch_size / process_count rows; a mesh
        that copies the batch across processes (its batch axes span fewer shards than there are processes)
        cannot take per-process rows."""
        count = jax.process_count()
        held = {i for index in self.sharding.addressable_devices_indices_map((batch_size, 1)).values()
                for i in range(*index[0].indices(batch_size))}
        if count > 1 and len(held) != batch_size // count:
            mesh = dict(self.sharding.mesh.shape)
            raise ConfigError(f"mesh {mesh}: language-model input is read per process, so the batch must be split "
                              f"across the {count} processes (each holding {batch_size // count} of data.batch_size "
                              f"{batch_size} rows), but this process's devices hold {len(held)}; give the batch "
                              "axes (mesh.data x mesh.fsdp) a multiple of the process count")

    def put_local(self, rows) -> dict:
        """This process's rows (a batch of global rows // process count) as the global batch's arrays."""
        count = jax.process_count()
        return {field: jax.make_array_from_process_local_data(
                    self.sharding, np.asarray(value), (value.shape[0] * count, *value.shape[1:]))
                for field, value in rows._asdict().items()}


def slice_totals(eval_step, params, rest, task, batches):
    """(evaluation slice, the eval step's outputs summed over the slice's batches, on the host) for every slice of
    `task`: correct, count and loss_sum (arrays over seeds for a multi-seed step)."""
    for eval_slice in task.eval_slices:
        totals = None
        for batch in task.eval_batches(eval_slice):
            out = eval_step(params, rest, batches.put(batch))
            totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        yield eval_slice, jax.device_get(totals)


def evaluate(eval_step, params, rest, task, batches: Batches) -> dict:
    """Accuracy and loss on every evaluation slice of `task`, and the mean accuracy over slices."""
    results = {}
    for eval_slice, totals in slice_totals(eval_step, params, rest, task, batches):
        results[f"eval/accuracy/{eval_slice.name}"] = float(totals["correct"] / max(totals["count"], 1))
        results[f"eval/loss/{eval_slice.name}"] = float(totals["loss_sum"] / max(totals["count"], 1))
    accuracies = [v for k, v in results.items() if k.startswith("eval/accuracy/")]
    results["eval/accuracy/mean"] = float(np.mean(accuracies))
    return results
