"""From a config to the model, its train state and the jitted train step, and back from a workdir to a trained
model: what `ramjax train`, `ramjax eval`, `ramjax generate` and the benchmarks share (docs/design.md, "From a
config to a sharded train step").

  spec = abstract_model(config, mesh)          # builder, optimizer, graphdef, abstract params / state
  setup = train_setup(config)                  # the jitted train step exactly as `ramjax train` runs it
  state, meta = restore_state(config, workdir) # a checkpoint, placed on config.mesh
  model = load_model(workdir)                  # the trained LanguageModel of a run
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ramjax.data.tasks import SyntheticTask, parse_settings, prefetch_threads
from ramjax.errors import ConfigError
from ramjax.models import LanguageModel, config_check
from ramjax.train import factor_schedule, multi_seed, sharding, top_k_schedule
from ramjax.train.checkpoint import Checkpoints
from ramjax.train.optim import learning_rate_schedule, make_optimizer
from ramjax.train.step import make_train_step


def make_task(config, **kwargs):
    """The task of `config.task`: a synthetic one (mqar, selective_copy) or language modelling (lm)."""
    if config.task == "lm":
        from ramjax.data.lm import LMTask

        if jax.process_count() == 1:
            return LMTask(config.data, **kwargs)
        # Several processes of one run share data_dir: process 0 prepares the dataset and tokenizer (as
        # `ramjax prepare` would) while the others wait, so they never build the same files at once.
        from jax.experimental import multihost_utils

        task = None
        if jax.process_index() == 0:
            task = LMTask(config.data, **kwargs)
            for split in ("train", "validation"):
                task.source(split)
        multihost_utils.sync_global_devices("ramjax: LM data prepared")
        return task if task is not None else LMTask(config.data, **kwargs)
    return SyntheticTask(config.task, config.data)


def check_train_config(config, task, batch_shards: int, *, process_count: int | None = None) -> None:
    """The training and data fields a run needs, for `batch_shards` shards of the batch; rounds
    data.eval_batch_size up to the shards (evaluation results do not depend on it). `process_count`: None for
    this run's (jax.process_count(), which starts JAX's backends), or a number when checking a config away from
    its run (check_run_config)."""
    d, t = config.data, config.train
    processes = jax.process_count() if process_count is None else process_count
    if config.model.vocab_size < d.vocab_size:
        raise ConfigError(f"model.vocab_size ({config.model.vocab_size}) must be >= data.vocab_size ({d.vocab_size})")
    # The checkpoint fields are checked again by Checkpoints, but only once the model is built: here they fail
    # at once, with the others.
    for field in ("num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        if isinstance(t[field], bool) or not isinstance(t[field], int) or t[field] < 1:
            raise ConfigError(f"train.{field}: must be a positive integer, got {t[field]!r}")
    if t.get("on_nonfinite", "skip") not in ("skip", "stop"):
        raise ConfigError(f"train.on_nonfinite: must be 'skip' or 'stop', got {t.on_nonfinite!r}")
    shards = math.lcm(batch_shards, processes)
    if not isinstance(d.batch_size, int) or d.batch_size < 1 or d.batch_size % shards:
        raise ConfigError(f"data.batch_size: must be a positive multiple of the {batch_shards} batch shards and "
                          f"the {processes} processes, got {d.batch_size}")
    microbatches(config, shards)
    loss_chunk_tokens(config)
    if not isinstance(d.eval_batch_size, int) or d.eval_batch_size < 1:
        raise ConfigError(f"data.eval_batch_size: must be a positive integer, got {d.eval_batch_size!r}")
    if d.eval_batch_size % shards:
        # Evaluation pads its last batch with rows that count nothing, so any batch size gives the same numbers:
        # round up to the shards rather than refuse (the defaults then run on 1, 2, 4 or 8 devices).
        rounded = -(-d.eval_batch_size // shards) * shards
        if jax.process_index() == 0:
            print(f"ramjax train: data.eval_batch_size {d.eval_batch_size} -> {rounded} (a multiple of the "
                  f"{shards} batch shards; evaluation results do not depend on it)")
        d.eval_batch_size = rounded


def early_stop_accuracy(config) -> float:
    """train.early_stop_accuracy, checked: stop once the mean evaluation accuracy reaches it (0: never)."""
    value = config.train.get("early_stop_accuracy", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"train.early_stop_accuracy: must be in [0, 1] (0: no early stop), got {value!r}")
    return float(value)


def check_run_config(config) -> None:
    """The checks of a run's config that need no mesh (the model, task, train, schedule and optimizer fields):
    `ramjax train` makes them first (trainer.py's _prepare, before its mesh-dependent ones), and `ramjax sweep` on
    every run of a grid before it starts any. It starts no JAX backend (the sweep's own process must not take GPU memory from
    its runs) and reads no dataset, so batch sizes are checked for one process and one batch shard (each run checks
    them again on its mesh), and a language model's data fields when its run prepares the data."""
    multi_seed.num_seeds(config)
    check_model_config(config)
    if config.task != "lm":  # SyntheticTask checks the data fields; LMTask would prepare the dataset
        make_task(config)
    check_train_config(config, None, 1, process_count=1)
    top_k_schedule.check(config)
    factor_schedule.check(config)
    early_stop_accuracy(config)
    prefetch_threads(config.data)
    # The optimizer and schedule check their fields when made (abstract_model makes them the same way).
    learning_rate_schedule(config.optim, config.train.num_steps)
    make_optimizer(config.optim, config.train.num_steps)


def loss_chunk_tokens(config) -> int:
    """train.loss_chunk_tokens (0 when absent: the whole batch's logits at once), checked."""
    n = config.train.get("loss_chunk_tokens", 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"train.loss_chunk_tokens: must be an integer >= 0 (0: the whole batch's logits at once; "
                          f"N: the LM head and loss over chunks of N positions), got {n!r}")
    return n


def microbatches(config, batch_shards: int) -> int:
    """train.microbatches (1 when absent), checked against data.batch_size and the batch's shards."""
    n, batch_size = config.train.get("microbatches", 1), config.data.batch_size
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"train.microbatches: must be a positive integer (1: the whole batch in one pass), got {n!r}")
    if batch_size % (n * batch_shards):
        raise ConfigError(f"train.microbatches = {n}: data.batch_size ({batch_size}) must split into {n} equal "
                          f"slices, each a multiple of the {batch_shards} batch shards: a multiple of "
                          f"{n * batch_shards}")
    return n


def longest_sequence(config) -> int | None:
    """The longest sequence a run of `config` trains or evaluates on (None if the task does not say)."""
    d = config.data
    if config.task == "lm":
        return int(d.seq_len) if isinstance(d.get("seq_len"), int) and d.seq_len > 0 else None
    lengths = [n for field in ("train_settings", "eval_settings") for _, n in parse_settings(f"data.{field}", d[field])]
    return max(lengths) if lengths else None


def check_model_config(config) -> None:
    """`config.model` checked before anything is built (ramjax/models/config_check.py): one ConfigError naming
    the field."""
    config_check.check_model(config.model, longest_sequence(config))


def model_parts(config, mesh=None):
    """(graphdef, fixed buffers) of the model `config` describes: with a checkpoint's params, what evaluating a
    trained run needs (`nnx.merge(graphdef, params, rest)`)."""
    build, _, _, graphdef, *_ = abstract_model(config, mesh)
    return graphdef, nnx.split(build(), nnx.Param, ...)[2]


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying their target sharding: what Orbax restores into."""
    return jax.tree.map(
        lambda sh, sub: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), sub),
        shardings, abstract_tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


class ModelSpec(NamedTuple):
    """What a config's model and optimizer are, before any array exists."""
    build: Callable  # (seed=None) -> the LanguageModel with its initial parameters (train.init_seed, or `seed`)
    tx: Any  # the optax optimizer
    schedule: Callable  # step -> learning rate
    graphdef: Any  # nnx graph definition of the model
    abstract_params: Any  # ShapeDtypeStructs of the parameters
    abstract_rest: Any  # ... of the model's other variables (fixed buffers such as CAPE head masks)
    abstract_state: Any  # ... of the train state {"params", "opt_state", "step"}


def abstract_model(config, mesh=None) -> ModelSpec:
    """The model builder, optimizer, schedule, graphdef, and the abstract params, other variables and state.
    With a mesh, the model keeps its activations sharded over the batch axes of `config.mesh.rules`."""
    check_model_config(config)

    def build(seed=None):
        # `seed`: an int32 array (traced under vmap: train.num_seeds); the same parameters as nnx.Rngs(int(seed)).
        rngs = nnx.Rngs(config.train.init_seed if seed is None else jax.random.key(seed))
        return LanguageModel(config.model, rngs=rngs)

    tx = make_optimizer(config.optim, config.train.num_steps)
    schedule = learning_rate_schedule(config.optim, config.train.num_steps)
    abstract_model = nnx.eval_shape(build)
    if mesh is not None:
        # [batch, time, heads, ...] laid out by the same rules as everything else (heads not divisible by
        # their mesh axes stay whole, as the parameters do).
        per_head = sharding.logical_to_mesh(("batch", None, "heads"), (config.data.batch_size, 1,
                                                                       config.model.num_heads),
                                            config.mesh.rules, mesh, "per-head activations")
        abstract_model.shard_activations(mesh, per_head[0], per_head[2])
    graphdef, abstract_params, abstract_rest = nnx.split(abstract_model, nnx.Param, ...)
    abstract_state = {"params": abstract_params, "opt_state": jax.eval_shape(tx.init, abstract_params),
                      "step": jax.ShapeDtypeStruct((), jnp.int32)}
    return ModelSpec(build, tx, schedule, graphdef, abstract_params, abstract_rest, abstract_state)


def jit_train_step(config, graphdef, tx, schedule, state_sh, rest_sh, batch_sh, mesh, *, num_seeds: int = 1):
    """The train step as one jit with explicit shardings; the state's buffers are donated. `num_seeds` > 1: the
    step vmapped over seeds (ramjax/train/multi_seed.py; the shardings are then those of the stacked state and
    batch)."""
    shards = math.lcm(sharding.num_shards(batch_sh), jax.process_count())
    step = make_train_step(graphdef, tx, schedule, microbatches=microbatches(config, shards),
                           inject_nan_at_step=config.train.get("inject_nan_at_step", -1),
                           loss_chunk_tokens=loss_chunk_tokens(config))
    if num_seeds > 1:
        step = multi_seed.vmap_train_step(step, num_seeds)
    return jax.jit(step, in_shardings=(state_sh, rest_sh, batch_sh),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)


def initialisers(build, tx, init_seeds=None):
    """Functions (to jit with the state's and the other variables' shardings) that make the initial train state
    and the model's other variables from the model builder. `init_seeds` (a tuple, train.num_seeds > 1): the
    state of one model per seed, stacked on a leading axis (the step counter shared)."""
    def init_state():
        if init_seeds is not None:
            def one(seed):
                _, params, _ = nnx.split(build(seed), nnx.Param, ...)
                return {"params": params, "opt_state": tx.init(params)}

            stacked = jax.vmap(one)(jnp.asarray(init_seeds, jnp.int32))
            return {**stacked, "step": jnp.zeros((), jnp.int32)}
        _, params, _ = nnx.split(build(), nnx.Param, ...)
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    def init_rest():
        return nnx.split(build(), nnx.Param, ...)[2]

    return init_state, init_rest


class TrainSetup(NamedTuple):
    """The train step `ramjax train` runs for a config, on the mesh `config.mesh` makes of some devices."""
    mesh: jax.sharding.Mesh
    train_step: Callable  # jitted (state, rest, batch) -> (state, metrics); the state's buffers are donated
    init_state: Callable  # jitted () -> the initial train state, placed by its shardings
    init_rest: Callable  # jitted () -> the model's other variables (fixed buffers), placed
    abstract_state: Any  # ShapeDtypeStructs carrying their shardings (for train_step.lower)
    abstract_rest: Any
    batch_sharding: jax.sharding.Sharding  # of every batch field [batch, time]
    num_params: int


def train_setup(config, *, devices=None) -> TrainSetup:
    """The model, optimizer, shardings and jitted train step exactly as `train` builds them, without a task or
    a workdir: for measuring the step (memory, throughput) on batches made elsewhere."""
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = config.mesh.rules
    build, tx, schedule, graphdef, abstract_params, abstract_rest, abstract_state = abstract_model(config, mesh)
    state_sh = sharding.tree_shardings(abstract_state, rules, mesh)
    rest_sh = sharding.tree_shardings(abstract_rest, rules, mesh)
    batch_sh = sharding.batch_sharding(rules, mesh)
    init_state, init_rest = initialisers(build, tx)
    return TrainSetup(
        mesh=mesh,
        train_step=jit_train_step(config, graphdef, tx, schedule, state_sh, rest_sh, batch_sh, mesh),
        init_state=jax.jit(init_state, out_shardings=state_sh),
        init_rest=jax.jit(init_rest, out_shardings=rest_sh),
        abstract_state=with_shardings(abstract_state, state_sh),
        abstract_rest=with_shardings(abstract_rest, rest_sh),
        batch_sharding=batch_sh,
        num_params=int(sum(x.size for x in jax.tree.leaves(abstract_params))))


def restore_state(config, workdir: str, *, devices=None, step: int | None = None):
    """(state, meta) of checkpoint `step` (default: the newest) in `workdir`, placed on the mesh that
    `config.mesh` makes of `devices`: whatever mesh the checkpoint was written from. For inspecting a run or
    checking a move to another machine; `ramjax train` itself restores the same way when it resumes."""
    mesh = sharding.make_mesh(config.mesh, devices)
    *_, abstract_state = abstract_model(config)
    state_sh = sharding.tree_shardings(abstract_state, config.mesh.rules, mesh)
    n = multi_seed.num_seeds(config)
    if n > 1:  # params and opt_state [seed, ...]
        abstract_state = multi_seed.stack_abstract_state(abstract_state, n)
        state_sh = multi_seed.stack_state_shardings(state_sh)
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints,
                              every=config.train.checkpoint_every)
    try:
        step = checkpoints.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"{workdir}: no checkpoint to restore")
        return checkpoints.restore(step, with_shardings(abstract_state, state_sh))
    finally:
        checkpoints.close()


def step_memory(config, *, devices=None) -> dict:
    """Per-device bytes of the compiled train step on the mesh `config.mesh` makes of `devices`, from XLA's
    memory analysis: its arguments (parameters, optimizer state, batch), outputs and temporaries, and the
    parameter + optimizer-state bytes one device holds (from the shardings: what FSDP divides)."""
    task = make_task(config)
    setup = train_setup(config, devices=devices)
    if hasattr(task, "train_iterator"):  # a streamed dataset: its first batch, all rows in one process
        iterator = task.train_iterator()
        example, _ = next(iterator), iterator.close()
    else:
        example = task.train_batch(0)
    batch = {name: jax.ShapeDtypeStruct(np.shape(value), np.asarray(value).dtype, sharding=setup.batch_sharding)
             for name, value in example._asdict().items()}
    state = setup.abstract_state
    analysis = setup.train_step.lower(state, setup.abstract_rest, batch).compile().memory_analysis()
    held = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))
    return {"mesh": dict(setup.mesh.shape), "argument_bytes": analysis.argument_size_in_bytes,
            "output_bytes": analysis.output_size_in_bytes, "temp_bytes": analysis.temp_size_in_bytes,
            "state_bytes_per_device": held}


def load_run_config(workdir: str):
    """The config a `ramjax train` run recorded in workdir/config.json."""
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise ConfigError(f"--workdir {workdir}: no config.json (not a ramjax train workdir)")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if "mesh" in config:
        config.mesh.rules = tuple((name, tuple(a) if isinstance(a, list) else a) for name, a in config.mesh.rules)
    return config


def load_model(workdir: str, step: int | None = None, seed: int | None = None) -> LanguageModel:
    """The model of a `ramjax train` workdir with the parameters of checkpoint `step` (default: the newest), on
    the default devices; of a train.num_seeds run, the model of seed index `seed`."""
    config = load_run_config(workdir)
    state, _ = restore_state(config, workdir, step=step)
    graphdef, rest = model_parts(config, sharding.make_mesh(config.mesh))
    if multi_seed.num_seeds(config) > 1:
        if seed is None:
            raise ConfigError(f"{workdir}: a run of train.num_seeds = {config.train.num_seeds}; say which seed "
                              "(0-based index) to load")
        return nnx.merge(graphdef, jax.tree.map(lambda x: x[seed], state["params"]), rest)
    return nnx.merge(graphdef, state["params"], rest)
