"""Many seeds in one program: `train.num_seeds = N` trains N independent copies of a small model in one jitted
step, a vmap of the ordinary train step over the parameters, the optimizer state and the batch.

Seed i (0 <= i < N) initialises with train.init_seed + i and draws its batches from data.seed + i, so seed i of a
vmapped run is the single run with those two seeds (tests/test_multi_seed.py). With num_seeds = 1 (the default)
nothing here is used and a run is exactly what it was before the field existed.

With N > 1 the train state's "params" and "opt_state" get a leading seed axis of size N (replicated: the seed
axis is not sharded; every other dimension keeps its sharding); the step counter stays one scalar. Checkpoints
hold that stacked state, so a run resumes as any other. The model's other variables (fixed buffers) do not depend
on the seed and are shared. Evaluation runs every seed on the same evaluation batches.

Logged metrics: train/NAME is the mean over seeds, train/NAME/std the standard deviation (population, ddof 0:
the "mean +- std" of the papers we compare with) and train/NAME/seed_i each seed's value; train/finite is 1 only
if every seed's step was finite (a seed whose step is not finite keeps its state, as a single run does). The
evaluation logs eval/accuracy/SLICE/seed_i (and loss), the mean over seeds under the usual names with /std
beside them, eval/accuracy/mean/seed_i (each seed's mean over slices) and eval/accuracy/mean/min (the worst
seed: train.early_stop_accuracy stops a run when every seed has reached it). summary.json adds num_seeds, the
seeds, and each seed's best evaluation with the mean +- std of those.

Only synthetic tasks (mqar, selective_copy): their batches are a function of (data.seed, step).
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ramjax.data.tasks import Batch, SyntheticTask
from ramjax.errors import ConfigError
from ramjax.train.evaluation import slice_totals
from ramjax.train.metrics import best_per_seed

STACKED = ("params", "opt_state")  # the state entries with a seed axis; "step" is shared


def num_seeds(config) -> int:
    """train.num_seeds, checked (1 when the field is absent)."""
    n = config.train.get("num_seeds", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"train.num_seeds: must be a positive integer (1: one model, as before), got {n!r}")
    if n > 1 and config.task not in ("mqar", "selective_copy"):
        raise ConfigError(f"train.num_seeds = {n}: many seeds in one program need a synthetic task (mqar, "
                          f"selective_copy), whose batches are a function of (data.seed, step); task is "
                          f"{config.task!r}: set train.num_seeds = 1")
    return n


def init_seeds(config) -> tuple[int, ...] | None:
    """The init seeds of a multi-seed run (train.init_seed + i), or None for a single run."""
    n = num_seeds(config)
    return None if n == 1 else tuple(config.train.init_seed + i for i in range(n))


def data_seeds(config) -> tuple[int, ...]:
    return tuple(config.data.seed + i for i in range(num_seeds(config)))


# --- the stacked state and its shardings --------------------------------------------------------------------

def stack_abstract_state(abstract_state, n: int):
    """The abstract train state with a leading seed axis of size n on params and opt_state."""
    stack = lambda s: jax.ShapeDtypeStruct((n, *s.shape), s.dtype)  # noqa: E731
    return {key: jax.tree.map(stack, value) if key in STACKED else value for key, value in abstract_state.items()}


def with_seed_axis(sharding: NamedSharding) -> NamedSharding:
    """The sharding of an array with one more leading dimension, the seed axis, unsharded."""
    return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))


def stack_state_shardings(state_sh):
    """Shardings of the stacked state from those of one seed's state."""
    return {key: jax.tree.map(with_seed_axis, value) if key in STACKED else value for key, value in state_sh.items()}


def state_axes():
    """vmap axes of the train state: params and opt_state over seeds, the step counter shared."""
    return {"params": 0, "opt_state": 0, "step": None}


# --- the vmapped steps --------------------------------------------------------------------------------------

def summarise(metrics: dict, n: int) -> dict:
    """Per-seed metrics [n] -> scalars: mean, /std and /seed_i of each; learning_rate once; finite = all."""
    out = {}
    for name, value in metrics.items():
        if name == "learning_rate":  # the same schedule for every seed
            out[name] = value[0]
            continue
        out[name] = jnp.min(value) if name == "finite" else jnp.mean(value)
        if name != "finite":
            out[f"{name}/std"] = jnp.std(value)
        for i in range(n):
            out[f"{name}/seed_{i}"] = value[i]
    return out


def vmap_train_step(train_step, n: int):
    """(stacked state, rest, stacked batch) -> (stacked state, summarised scalar metrics)."""
    vmapped = jax.vmap(train_step, in_axes=(state_axes(), None, 0), out_axes=(state_axes(), 0))

    def step(state, rest, batch):
        state, metrics = vmapped(state, rest, batch)
        return state, summarise(metrics, n)

    return step


def vmap_eval_step(eval_step):
    """(stacked params, rest, one batch) -> per-seed totals [n]: every seed on the same evaluation batch."""
    return jax.vmap(eval_step, in_axes=(0, None, None))


def vmap_address_step(address_step):
    """(stacked params, rest, stacked inputs) -> each seed's addresses on its own batch."""
    return jax.vmap(address_step, in_axes=(0, None, 0))


# --- data ---------------------------------------------------------------------------------------------------

class SeedTask:
    """The task of a multi-seed run: train_batch(step) stacks the batches of data.seed + i, i < n ([n, batch,
    time] per field); everything else (evaluation batches, settings) is the task of data.seed."""

    def __init__(self, config, n: int):
        self.base = SyntheticTask(config.task, config.data)
        self.tasks = [self.base]
        for i in range(1, n):
            data = copy.deepcopy(config.data)
            data.seed = config.data.seed + i
            self.tasks.append(SyntheticTask(config.task, data))

    def train_batch(self, step: int) -> Batch:
        batches = [task.train_batch(step) for task in self.tasks]
        return Batch(*(np.stack(fields) for fields in zip(*batches)))

    def __getattr__(self, name):
        return getattr(self.base, name)


class SeedBatches:
    """Places stacked train batches [seed, batch, time] (the seed axis unsharded, the batch axis as in a single
    run) and ordinary evaluation batches [batch, time]; each process contributes its own rows."""

    def __init__(self, batches):
        self.plain = batches
        self.sharding = with_seed_axis(batches.sharding)

    def put(self, batch) -> dict:
        if np.ndim(batch.inputs) == 2:
            return self.plain.put(batch)
        rows = batch.inputs.shape[1] // jax.process_count()
        start = jax.process_index() * rows
        return {field: jax.make_array_from_process_local_data(self.sharding,
                                                              np.asarray(value[:, start:start + rows]))
                for field, value in batch._asdict().items()}


# --- evaluation and the summary -----------------------------------------------------------------------------

def evaluate(eval_step, params, rest, task, batches, n: int) -> dict:
    """Every seed's accuracy and loss on every evaluation slice, and their mean / std over seeds."""
    per_seed = {}  # name -> [n]
    for eval_slice, totals in slice_totals(eval_step, params, rest, task, batches):
        count = np.maximum(totals["count"], 1)
        per_seed[f"eval/accuracy/{eval_slice.name}"] = totals["correct"] / count
        per_seed[f"eval/loss/{eval_slice.name}"] = totals["loss_sum"] / count
    per_seed["eval/accuracy/mean"] = np.mean([v for k, v in per_seed.items() if k.startswith("eval/accuracy/")],
                                             axis=0)
    results = {}
    for name, values in per_seed.items():
        values = np.asarray(values, np.float64)
        results[name] = float(np.mean(values))
        results[f"{name}/std"] = float(np.std(values))
        results.update({f"{name}/seed_{i}": float(values[i]) for i in range(n)})
    results["eval/accuracy/mean/min"] = float(np.min(per_seed["eval/accuracy/mean"]))
    return results


def summary_fields(config, workdir: str) -> dict:
    """What summary.json adds for a multi-seed run."""
    n = num_seeds(config)
    best = best_per_seed(workdir, n)
    accuracies = [b["accuracy"] for b in best if b["step"] is not None]
    return {
        "num_seeds": n,
        "init_seeds": list(init_seeds(config)),
        "data_seeds": list(data_seeds(config)),
        "best_eval_per_seed": best,
        "best_accuracy_mean": float(np.mean(accuracies)) if accuracies else None,
        "best_accuracy_std": float(np.std(accuracies)) if accuracies else None,
    }
