"""`ramjax train --config configs/mqar.py:VARIANT --workdir DIR`: the training run, top to bottom.

    train()  =  _prepare (config checks, mesh, model, jitted steps)
             -> _resume  (the newest good checkpoint, or a fresh state; a finished run returns its summary)
             -> _loop    (train steps, logs, evaluations, checkpoints; SIGTERM and Ctrl-C save and stop)
             -> _finish  (the last checkpoint, summary.json)

Rerunning the same command with the same workdir resumes from the newest checkpoint: parameters, optimizer
state, step and data position (synthetic tasks: batches are a function of (data.seed, step); language models:
each process's data-iterator state is in the checkpoint, see _TrainData), so an interrupted run ends where an
uninterrupted one would. The workdir holds config.json (written once; deliberate changes go to amendments.jsonl,
see run_record.py), metrics.jsonl, tensorboard/, checkpoints/ and, at the end, summary.json (never overwritten:
rerunning a finished run prints where it is).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from ramjax.data import lm_pipeline
from ramjax.data.tasks import BatchesAhead, prefetch_threads
from ramjax.errors import ConfigError
from ramjax.models.state_size import recurrent_state_size
from ramjax.timing import environment
from ramjax.train import factor_schedule, multi_seed, preemption, run_record, sharding, top_k_schedule
from ramjax.train.address_metrics import address_metrics
from ramjax.train.checkpoint import Checkpoints
from ramjax.train.evaluation import Batches, evaluate
from ramjax.train.metrics import MetricsLog, read_metrics
from ramjax.train.profiling import ProfileWindow
from ramjax.train.setup import (ModelSpec, abstract_model, check_run_config, check_train_config,
                                early_stop_accuracy, initialisers, jit_train_step, loss_chunk_tokens, make_task,
                                with_shardings)
from ramjax.train.step import make_eval_step

# Train steps dispatched ahead of the device at most. JAX returns from a step as soon as it is queued; without a
# bound the host queued up to a log interval of steps (100 on MQAR), and a SIGTERM waited for all of them to run
# before it could save (seen: configs/adaptive_decay.py:mqar,ours with 8 seeds on 2 CPU cores, still running queued
# steps 30 s after SIGTERM; on a GPU shared by 12 such runs the sweep's kill, 90 s after its SIGTERM, came
# first), and the progress bar counted steps queued, not done. Two keep the device busy while the host prepares
# the next one.
MAX_STEPS_IN_FLIGHT = 2


class _Run(NamedTuple):
    """What `_prepare` builds from the config: everything the loop needs except the train state."""
    config: Any
    workdir: str
    is_main: bool
    task: Any
    mesh: jax.sharding.Mesh
    spec: ModelSpec
    state_sharding: Any
    rest_sharding: Any
    batches: Batches
    train_steps: "_TrainSteps"
    eval_step: Callable
    address_step: Callable | None  # RAM-Net's read/write overlap on MQAR (train.address_metrics), else None
    profiler: ProfileWindow
    num_params: int


class _Outcome(NamedTuple):
    """What the loop leaves for `_finish`."""
    state: Any
    start: int
    end: int  # the last step trained: num_steps, or the step an early stop ended at
    last_metrics: dict
    best_eval: dict  # the evaluation with the highest mean accuracy, with its step
    last_eval: dict
    nonfinite_steps: list
    train_seconds: float


def train(config, workdir: str, *, devices=None, amend: bool = False, restart: bool = False) -> dict:
    """Train (or resume) the run in `workdir`; returns the summary written to workdir/summary.json.

    `amend`: resume even though result-changing config fields differ from the run's record, recording the
    changes in amendments.jsonl (ramjax/train/run_record.py). `restart`: when the workdir has checkpoints but
    none restores, start over from step 0 instead of refusing (the old metrics.jsonl is kept beside it)."""
    wall_start = time.time()
    _check_workdir(workdir)
    run = _prepare(config, workdir, devices)
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints,
                              every=config.train.checkpoint_every)
    finished, state, start = _resume(run, checkpoints, amend=amend, restart=restart)
    if finished is not None:
        checkpoints.close()
        return finished
    outcome = _loop(run, checkpoints, state, start)
    return _finish(run, checkpoints, outcome, wall_start)


# --- prepare: config checks, mesh, model, jitted steps ------------------------------------------------------

def _prepare(config, workdir: str, devices) -> _Run:
    try:
        check_run_config(config)  # what needs no mesh, as `ramjax sweep` checks it; then what does
        num_seeds = multi_seed.num_seeds(config)
        task = make_task(config)
        mesh = sharding.make_mesh(config.mesh, devices)
        batch_sh = sharding.batch_sharding(config.mesh.rules, mesh)
        check_train_config(config, task, sharding.num_shards(batch_sh))
        profiler = ProfileWindow(config.train.get("profile_steps", (0, 0)), os.path.join(workdir, "profile"))
        spec = abstract_model(config, mesh)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    state_sh = sharding.tree_shardings(spec.abstract_state, config.mesh.rules, mesh)
    rest_sh = sharding.tree_shardings(spec.abstract_rest, config.mesh.rules, mesh)
    replicated = sharding.replicated(mesh)
    eval_fn = make_eval_step(spec.graphdef, loss_chunk_tokens=loss_chunk_tokens(config))
    address_fn = lambda params, rest, inputs: nnx.merge(spec.graphdef, params, rest).ramnet_addresses(inputs)  # noqa: E731
    batches, train_batch_sh = Batches(batch_sh), batch_sh
    if num_seeds > 1:  # params and opt_state [seed, ...], train batches [seed, batch, time]
        task = multi_seed.SeedTask(config, num_seeds)
        spec = spec._replace(abstract_state=multi_seed.stack_abstract_state(spec.abstract_state, num_seeds))
        state_sh = multi_seed.stack_state_shardings(state_sh)
        batches = multi_seed.SeedBatches(batches)
        train_batch_sh = batches.sharding
        eval_fn, address_fn = multi_seed.vmap_eval_step(eval_fn), multi_seed.vmap_address_step(address_fn)
    eval_step = jax.jit(eval_fn, in_shardings=(state_sh["params"], rest_sh, batch_sh), out_shardings=replicated)
    address_step = None
    if config.train.get("address_metrics", False) and config.task == "mqar" and "ramnet" in config.model.pattern:
        address_step = jax.jit(address_fn, in_shardings=(state_sh["params"], rest_sh, train_batch_sh),
                               out_shardings=replicated)
    return _Run(config=config, workdir=workdir, is_main=jax.process_index() == 0, task=task, mesh=mesh, spec=spec,
                state_sharding=state_sh, rest_sharding=rest_sh, batches=batches,
                train_steps=_TrainSteps(config, spec, state_sh, rest_sh, train_batch_sh, mesh, num_seeds),
                eval_step=eval_step, address_step=address_step, profiler=profiler,
                num_params=int(sum(x.size for x in jax.tree.leaves(spec.abstract_params))))


class _TrainSteps:
    """One jitted train step per (top-K, active factors) pair that RAM-Net's training schedules use (one step
    without a schedule), compiled when first needed; evaluation always runs the model's own K and all factors."""

    def __init__(self, config, spec: ModelSpec, state_sh, rest_sh, batch_sh, mesh, num_seeds: int = 1):
        self.config, self.spec, self.num_seeds = config, spec, num_seeds
        self.shardings = (state_sh, rest_sh, batch_sh, mesh)
        self.compiled = {}

    def __call__(self, step: int):
        config, spec = self.config, self.spec
        model_k, num_factors = config.model.ramnet.top_k, config.model.ramnet.num_factors
        k = top_k_schedule.top_k_at(step, top_k_schedule.start_k(config), model_k,
                                    config.train.get("ramnet_top_k_anneal_steps", 0))
        active = factor_schedule.factors_at(step, factor_schedule.start_factors(config), num_factors,
                                            config.train.get("ramnet_factors_grow_steps", 0))
        if (k, active) not in self.compiled:
            graphdef = spec.graphdef
            if k != model_k or active != num_factors:
                model = nnx.merge(spec.graphdef, spec.abstract_params, spec.abstract_rest)
                model = factor_schedule.with_factors(top_k_schedule.with_top_k(model, k), active)
                graphdef = nnx.split(model, nnx.Param, ...)[0]
            self.compiled[k, active] = jit_train_step(config, graphdef, spec.tx, spec.schedule, *self.shardings,
                                                      num_seeds=self.num_seeds)
        return self.compiled[k, active]


# --- resume: the newest good checkpoint, or a fresh state ---------------------------------------------------

def _resume(run: _Run, checkpoints: Checkpoints, *, amend: bool, restart: bool):
    """(summary, None, None) for a run that already finished; else (None, state, first step)."""
    config, workdir, is_main = run.config, run.workdir, run.is_main
    current = json.loads(config.to_json_best_effort())
    if getattr(run.task, "provenance", None) is not None:  # language models: which corpus, split and tokenizer
        current["data_provenance"] = run.task.provenance
    latest = checkpoints.latest_step()
    inert = factor_schedule.inert_fields(config) + top_k_schedule.inert_fields(config)
    def record():
        run_record.check_and_record(workdir, current, step=latest or 0, amend=amend, write=is_main, inert=inert)

    if not amend:
        record()  # a changed config is refused with its list of differences, the usual message
    if latest is not None:  # before --amend records anything: sizes that changed cannot resume
        _check_shapes(workdir, checkpoints.shape_changes(latest, run.spec.abstract_state), latest)
    if amend:
        record()
    summary_path = os.path.join(workdir, "summary.json")
    finished = _read_json(summary_path)
    num_steps = config.train.num_steps
    if finished is not None and latest == finished.get("steps") and (
            latest == num_steps or (finished.get("stopped_early") and early_stop_accuracy(config) > 0)):
        if is_main:
            print(f"ramjax train: {workdir} already finished ({latest} steps); its summary is "
                  f"{summary_path} (left as it was)")
            unapplied = run_record.neutral_changes(workdir, current)
            if unapplied:  # e.g. a new eval_every: nothing trains, so nothing of it happens; say so
                listed = "; ".join(f"{field} {a!r} -> {b!r}" for field, (a, b) in unapplied.items())
                print(f"ramjax train: not applied to the finished run: {listed} (`ramjax eval --workdir {workdir}` "
                      "evaluates it again; --amend with more train.num_steps trains on)")
        return finished, None, None
    restored = None
    if latest is not None:
        restored = checkpoints.restore_newest_good(with_shardings(run.spec.abstract_state, run.state_sharding),
                                                   log=print if is_main else None)
    corrupt = checkpoints.corrupt_dirs()
    if restored is None and corrupt:  # checkpoints were written, and none restores
        if not restart:
            raise ConfigError(f"no checkpoint in {workdir}/checkpoints restores (moved aside: "
                              f"{', '.join(corrupt)}); rerun with --restart to train from step 0 in this workdir, "
                              "or use a new --workdir")
        if is_main:
            _start_over(workdir, corrupt)
    if restored is not None:
        state, meta = restored
        start = int(meta["step"])
        if is_main:
            print(f"ramjax train: resuming {workdir} from step {start} (data position {meta['data_step']})")
    else:
        init_state, _ = initialisers(run.spec.build, run.spec.tx, multi_seed.init_seeds(config))
        state = jax.jit(init_state, out_shardings=run.state_sharding)()
        start = 0
    if is_main:
        if finished is not None:  # a finished run extended by --amend: its first summary stays on record
            _move_aside(summary_path, f"steps{finished.get('steps')}")
        if hasattr(run.task, "tokenizer"):
            run.task.tokenizer.save(workdir)  # evaluation reads the text with the tokenizer training used
    return None, state, start


def _check_shapes(workdir: str, changes: list[str] | None, step: int) -> None:
    """Refuse a resume whose parameters or optimizer state differ in shape from the checkpoint's (a changed
    model size, pattern or optimizer): restoring would fail on every checkpoint, which would then look corrupt."""
    if changes:
        shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
        raise ConfigError(f"{workdir}'s checkpoint at step {step} holds a state of other shapes than this config "
                          f"builds ({shown}): a run cannot change its model's sizes, not even with --amend; rerun "
                          "with the recorded config (config.json) or use a new --workdir")


def _start_over(workdir: str, corrupt: list) -> None:
    """--restart with no checkpoint that restores: the old metrics and checkpoints are kept out of the way."""
    _move_aside(os.path.join(workdir, "metrics.jsonl"), "before-restart")
    for name in corrupt:  # kept for inspection, out of the way of the next resume
        os.makedirs(os.path.join(workdir, "corrupt-checkpoints"), exist_ok=True)
        os.replace(os.path.join(workdir, "checkpoints", name), os.path.join(workdir, "corrupt-checkpoints", name))
    print(f"ramjax train: --restart: no checkpoint restores; training {workdir} from step 0 (the earlier "
          "metrics.jsonl is kept as metrics.jsonl.before-restart-TIME, the checkpoints in corrupt-checkpoints/)")


# --- the loop ------------------------------------------------------------------------------------------------

def _loop(run: _Run, checkpoints: Checkpoints, state, start: int) -> _Outcome:
    config, task, t = run.config, run.task, run.config.train
    num_steps = t.num_steps
    rest = jax.jit(initialisers(run.spec.build, run.spec.tx)[1], out_shardings=run.rest_sharding)()
    metrics_log = MetricsLog(run.workdir, enabled=run.is_main, resumed_from=start)
    tokens_per_step = config.data.batch_size * (task.max_train_len if config.data.get("mixture", "pad") == "pad" else
                                                float(np.mean([n for _, n in task.train_settings])))
    if run.is_main:
        print(f"ramjax train: {config.model.pattern} model, {run.num_params:,} parameters, mesh "
              f"{dict(run.mesh.shape)}, steps {start}..{num_steps}, workdir {run.workdir}")
    progress = tqdm(total=num_steps, initial=start, disable=not (t.progress and run.is_main), unit="step",
                    dynamic_ncols=True, desc="train")
    data = _TrainData(run, checkpoints, start)
    nonfinite = _NonfiniteSteps(run, metrics_log, progress, data)
    throughput = _Throughput(tokens_per_step)
    last_metrics, last_eval, best_eval = {}, {}, {}
    early_stop = early_stop_accuracy(config)
    end = num_steps
    preempted = []
    previous_handler = preemption.install_sigterm_flag(preempted)
    keep_ignoring_sigterm = False
    done = start  # the steps completed so far
    in_flight = collections.deque()  # the metrics of the steps dispatched and perhaps not yet run
    if _evaluate_on_resume(run, start):
        last_eval = _evaluate_and_log(run, state, rest, start - 1, metrics_log, progress, checkpoints)
        best_eval = {"step": start, **last_eval}
    try:
        for step in range(start, num_steps):
            run.profiler.before(step)
            state, metrics = run.train_steps(step)(state, rest, data.put(step))
            run.profiler.after(step + 1, metrics)
            in_flight.append(metrics)
            if len(in_flight) > MAX_STEPS_IN_FLIGHT:
                jax.block_until_ready(in_flight.popleft())
            done = step + 1
            throughput.count_step()
            nonfinite.add(step, metrics)
            # "stop" checks every step (a sync per step); "skip" checks at each log and before each checkpoint.
            if t.get("on_nonfinite", "skip") == "stop" or done % t.log_every == 0 or checkpoints.is_save_step(done):
                if nonfinite.check() and t.get("on_nonfinite", "skip") == "stop":
                    _stop_on_nonfinite(progress, checkpoints, step)
            if done % t.log_every == 0 or done == num_steps:
                last_metrics = throughput.metrics(jax.device_get(metrics))
                metrics_log.write(done, {f"train/{k}": v for k, v in last_metrics.items()})
                progress.set_postfix(loss=f"{last_metrics['loss']:.3f}", acc=f"{last_metrics['accuracy']:.3f}",
                                     tok_s=f"{last_metrics['tokens_per_s']:.0f}")
            # The checkpoint first (it saves in the background): a failure in the evaluation then loses nothing
            # trained, and the resumed run evaluates this step first (_evaluate_on_resume).
            checkpoints.save(done, state, _meta(config, done))
            stop_early = False
            if done % t.eval_every == 0 or done == num_steps:
                last_eval = _evaluate_and_log(run, state, rest, step, metrics_log, progress, checkpoints)
                if last_eval["eval/accuracy/mean"] > best_eval.get("eval/accuracy/mean", -1.0):
                    best_eval = {"step": done, **last_eval}
                # (train.num_seeds > 1: when every seed has reached it)
                stop_early = 0 < early_stop <= last_eval.get("eval/accuracy/mean/min",
                                                             last_eval["eval/accuracy/mean"]) and done < num_steps
            progress.update(1)
            if stop_early:
                end = done
                if run.is_main:
                    progress.write(f"ramjax train: eval accuracy mean {last_eval['eval/accuracy/mean']:.4f} >= "
                                   f"train.early_stop_accuracy {early_stop} at step {done}: stopping early")
                break
            if done % t.log_every == 0:
                throughput.restart_interval()
            if preemption.any_process(bool(preempted)):
                keep_ignoring_sigterm = jax.process_count() > 1
                _stop_on_sigterm(run, progress, checkpoints, nonfinite, state, done, by_us=bool(preempted))
    except KeyboardInterrupt:
        _stop_on_interrupt(run, progress, checkpoints, state, done, start)
    except Exception as error:
        # A SIGTERM reaches the whole process group: a compiler child (ptxas during an evaluation's first
        # compile) dies of it and the step fails before the loop reaches its SIGTERM check. Keep what was trained.
        if not preempted or jax.process_count() > 1 or done == start:
            raise
        _stop_on_failure_after_sigterm(run, progress, checkpoints, state, done, error)
    finally:
        run.profiler.stop()
        if previous_handler is not None and not keep_ignoring_sigterm:
            signal.signal(signal.SIGTERM, previous_handler)
    progress.close()
    nonfinite.check()
    if checkpoints.latest_step() != end:
        checkpoints.save(end, state, _meta(config, end), force=True)
    checkpoints.wait()
    data.close()
    metrics_log.close()
    if not last_eval and start >= num_steps:
        last_eval = _evaluate(run, state["params"], rest)
    best_eval = _best_eval(run.workdir, best_eval or ({"step": end, **last_eval} if last_eval else {}))
    return _Outcome(state=state, start=start, end=end, last_metrics=last_metrics, best_eval=best_eval,
                    last_eval=last_eval, nonfinite_steps=nonfinite.steps, train_seconds=throughput.train_seconds)


def _best_eval(workdir: str, this_session: dict) -> dict:
    """The best evaluation of the whole run: this session's, or one logged before a resume (metrics.jsonl)."""
    best = this_session
    for row in read_metrics(workdir):
        if row.get("eval/accuracy/mean", -1.0) > best.get("eval/accuracy/mean", -1.0):
            best = {"step": row["step"], **{k: v for k, v in row.items() if k.startswith("eval/")}}
    return best


def _meta(config, step: int) -> dict:
    """What a checkpoint records beside the state: the step and where the data stands (batches are a function of
    (data.seed, step); a language model's data position is the data item's iterator states, see _TrainData)."""
    return {"step": step, "data_step": step, "data_seed": config.data.seed, "init_seed": config.train.init_seed}


class _Throughput:
    """Tokens and steps per second over each logging interval, and the training seconds of this session."""

    def __init__(self, tokens_per_step: float):
        self.tokens_per_step = tokens_per_step
        self.train_seconds = 0.0
        self.restart_interval()

    def restart_interval(self) -> None:
        self.start, self.steps = time.time(), 0

    def count_step(self) -> None:
        self.steps += 1

    def metrics(self, step_metrics: dict) -> dict:
        elapsed = time.time() - self.start
        self.train_seconds += elapsed
        out = {name: float(value) for name, value in step_metrics.items()}
        out["tokens_per_s"] = self.steps * self.tokens_per_step / max(elapsed, 1e-9)
        out["steps_per_s"] = self.steps / max(elapsed, 1e-9)
        return out


class _NonfiniteSteps:
    """Steps whose update the train step skipped because the loss or gradient norm was not finite. The step's
    flag stays on the device until `check` (a host sync), which logs each such step and saves its batch.

    optax.apply_if_finite was considered for this and not taken: it tests only the updates (our metrics also
    report the loss), and it wraps the optimizer state, which would change every checkpoint's layout; the step
    keeps the old state with one jnp.where per leaf (ramjax/train/step.py)."""

    def __init__(self, run: _Run, metrics_log: MetricsLog, progress, data: "_TrainData"):
        self.run, self.metrics_log, self.progress, self.data = run, metrics_log, progress, data
        self.unchecked = []  # (step, metrics) not yet checked
        self.steps = []

    def add(self, step: int, metrics: dict) -> None:
        self.unchecked.append((step, {k: metrics[k] for k in ("finite", "loss", "grad_norm")}))

    def check(self) -> bool:
        """Logs every unchecked step whose update was skipped; True if there was one."""
        bad = [(s, m) for s, m in jax.device_get(self.unchecked) if not m["finite"]]
        self.unchecked.clear()
        run, seed = self.run, self.run.config.data.seed
        for step, m in bad:
            self.steps.append(step)
            saved = _save_batch(run.workdir, self.data, step) if run.is_main else ""
            self.metrics_log.write(step + 1, {"train/nonfinite_step": step, "train/nonfinite_loss": m["loss"],
                                              "train/nonfinite_grad_norm": m["grad_norm"]})
            if run.is_main:
                self.progress.write(f"ramjax train: step {step}: loss {m['loss']}, gradient norm {m['grad_norm']}: "
                                    f"not finite, the update was skipped; the batch is (data.seed {seed}, step "
                                    f"{step}){saved}")
        return bool(bad)


def _save_batch(workdir: str, data: "_TrainData", step: int) -> str:
    """Writes the batch of a non-finite step to workdir/nonfinite/step_N.npz (a streamed dataset on several
    processes: process 0's rows); returns where, for the log."""
    directory = os.path.join(workdir, "nonfinite")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"step_{step}.npz")
    np.savez(path, **data.host_batch(step)._asdict())
    return f", saved to {path}"


class _TrainData:
    """The loop's training batches, on the mesh.

    Synthetic tasks: the global batch is a function of (data.seed, step); each process makes it and puts its
    rows (Batches.put). Streamed tasks (language models: the task has train_iterator): each process reads only
    its own rows from `task.train_iterator(process_index, process_count)` (Batches.put_local). The iterator's
    state before each recent step is kept: every checkpoint saves it (Checkpoints.track_data, one state per
    process), and a non-finite step's batch is read again from it. A resume sets the state saved with its
    checkpoint; onto another number of processes (or data.num_workers) it restarts at
    lm_pipeline.restart_document(every old process's state); a checkpoint without one (saved before the trainer
    kept it) is caught up by replaying the stream up to its step."""

    def __init__(self, run: _Run, checkpoints: Checkpoints, start: int):
        self.run, self.task = run, run.task
        self.iterator = None
        self.ahead = None
        self.states = {}  # step -> the iterator's state before that step's batch, for the last `keep` steps
        if not hasattr(self.task, "train_iterator"):
            self.ahead = BatchesAhead(self.task.train_batch, run.config.train.num_steps,
                                      prefetch_threads(run.config.data))
            return
        run.batches.check_rows_split_by_process(run.config.data.batch_size)
        t = run.config.train
        # A non-finite step is checked by the next log or checkpoint step at the latest; saves are of the
        # step just done (or, on SIGTERM or Ctrl-C, the last one completed).
        self.keep = max(t.log_every, t.checkpoint_every) + 2
        self.iterator = self._open(start, checkpoints.data_states(start) if start else None)
        self.states[start] = self.iterator.get_state()
        checkpoints.track_data(self.states.get)

    def _open(self, start: int, states: list | None):
        task, index, count = self.task, jax.process_index(), jax.process_count()
        log = print if self.run.is_main else (lambda *_: None)
        if not start:
            return task.train_iterator(index, count)
        if states is None:
            log(f"ramjax train: checkpoint step {start} holds no data-iterator state (saved before the trainer "
                f"kept one); replaying each process's data stream up to step {start} to resume (slow for many "
                "steps)")
            iterator = task.train_iterator(index, count)
            for _ in range(start):
                next(iterator)
            return iterator
        if len(states) == count:
            iterator = task.train_iterator(index, count, start=states[index]["layout"]["start"])
            if states[index]["layout"] == iterator.layout:
                iterator.set_state(states[index])
                return iterator
            iterator.close()
        document = lm_pipeline.restart_document(states)
        old = states[0]["layout"]
        log(f"ramjax train: the data iterator of checkpoint step {start} was saved by {len(states)} processes "
            f"(data.num_workers {old['num_workers']}, seed {old['seed']}, seq_len {old['seq_len']}); this run has "
            f"{count} (data.num_workers {self.task.num_workers}): reading on from global document {document}, the "
            "first one some old process had not finished (the few documents after it that some had read are read "
            "again; none is skipped)")
        return task.train_iterator(index, count, start=document)

    def put(self, step: int) -> dict:
        """The batch of `step` on the mesh (steps are asked for in order)."""
        if self.iterator is None:
            return self.run.batches.put(self.ahead.get(step))
        rows = next(self.iterator)
        self.states[step + 1] = self.iterator.get_state()
        self.states.pop(step + 1 - self.keep, None)
        return self.run.batches.put_local(rows)

    def host_batch(self, step: int):
        """The batch of a recent `step` as numpy arrays (a streamed dataset: this process's rows)."""
        if self.iterator is None:
            return self.task.train_batch(step)
        layout = self.iterator.layout
        again = self.task.train_iterator(layout["process_index"], layout["process_count"], start=layout["start"])
        try:
            again.set_state(self.states[step])
            return next(again)
        finally:
            again.close()

    def close(self) -> None:
        if self.iterator is not None:
            self.iterator.close()
        if self.ahead is not None:
            self.ahead.close()


def _evaluate(run: _Run, params, rest) -> dict:
    num_seeds = multi_seed.num_seeds(run.config)
    if num_seeds > 1:
        return multi_seed.evaluate(run.eval_step, params, rest, run.task, run.batches, num_seeds)
    return evaluate(run.eval_step, params, rest, run.task, run.batches)


def _evaluate_on_resume(run: _Run, start: int) -> bool:
    """Whether a resumed run must first evaluate its starting step: an evaluation step whose checkpoint was saved
    but whose evaluation was never logged (it failed, or the process died in it). Every process must agree."""
    t = run.config.train
    due = 0 < start < t.num_steps and start % t.eval_every == 0
    missing = due and run.is_main and not any(row.get("step") == start and "eval/accuracy/mean" in row
                                              for row in read_metrics(run.workdir))
    return preemption.any_process(missing)


def _evaluate_and_log(run: _Run, state, rest, step: int, metrics_log: MetricsLog, progress,
                      checkpoints: Checkpoints) -> dict:
    done = step + 1
    try:
        results = _evaluate(run, state["params"], rest)
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        checkpoints.wait()
        latest = checkpoints.latest_step()
        kept = (f"the newest checkpoint is of step {latest}: rerun with --config.data.eval_batch_size=N to resume "
                f"there" if latest else "no checkpoint was saved yet")
        raise ConfigError(
            f"data.eval_batch_size = {run.config.data.eval_batch_size}: the evaluation at step {done} ran out of "
            f"device memory ({str(error).splitlines()[0][:200]}). Evaluation is not split into microbatches; a "
            f"smaller data.eval_batch_size evaluates the same examples in smaller batches (results do not depend "
            f"on it); {kept}.") from error
    metrics_log.write(done, results)
    if run.address_step is not None:  # on the batch this step trained on; diagnostics, not in the summary
        batch = run.task.train_batch(step)
        codes = jax.device_get(run.address_step(state["params"], rest, run.batches.put(batch)["inputs"]))
        num_seeds = multi_seed.num_seeds(run.config)
        if num_seeds == 1:
            metrics_log.write(done, address_metrics(codes, batch.inputs, batch.loss_mask))
        for i in range(num_seeds if num_seeds > 1 else 0):  # each seed on its own batch
            seed_codes = jax.tree.map(lambda x: x[i], codes)  # noqa: B023
            metrics_log.write(done, {f"{k}/seed_{i}": v for k, v in
                                     address_metrics(seed_codes, batch.inputs[i], batch.loss_mask[i]).items()})
    if run.is_main and multi_seed.num_seeds(run.config) > 1:
        n = multi_seed.num_seeds(run.config)
        progress.write(f"step {done}: eval accuracy mean over {n} seeds {results['eval/accuracy/mean']:.3f} +- "
                       f"{results['eval/accuracy/mean/std']:.3f}; per seed " +
                       " ".join(f"{results[f'eval/accuracy/mean/seed_{i}']:.3f}" for i in range(n)))
    elif run.is_main:
        progress.write(f"step {done}: eval accuracy mean {results['eval/accuracy/mean']:.3f} " +
                       " ".join(f"{k.split('/')[-1]}={v:.3f}" for k, v in results.items()
                                if k.startswith("eval/accuracy/") and not k.endswith("/mean")))
    return results


# --- the ways out of the loop besides its end --------------------------------------------------------------

def _stop_on_nonfinite(progress, checkpoints: Checkpoints, step: int):
    progress.close()
    checkpoints.wait()
    print(f"ramjax train: stopped at step {step} (train.on_nonfinite='stop'); the newest checkpoint "
          f"(step {checkpoints.latest_step()}) holds the last good state")
    raise SystemExit(3)


def _stop_on_sigterm(run: _Run, progress, checkpoints: Checkpoints, nonfinite: _NonfiniteSteps, state, done: int,
                     *, by_us: bool):
    """Every process saves the same step and exits 0; rerunning the command resumes."""
    progress.close()
    nonfinite.check()
    if checkpoints.latest_step() != done:
        checkpoints.save(done, state, _meta(run.config, done), force=True)
    checkpoints.wait()
    if jax.process_count() > 1:
        # Single-process runs restore the caller's handler (the loop's `finally`), so that a library caller's
        # later children are not left ignoring SIGTERM.
        preemption.ignore_sigterm()
    by = "" if by_us else " by another process of this run"
    print(f"ramjax train: SIGTERM received{by}; saved step {done} in {run.workdir} and stopped; rerun the command "
          "to resume")
    raise SystemExit(0)


def _stop_on_failure_after_sigterm(run: _Run, progress, checkpoints: Checkpoints, state, done: int,
                                   error: Exception):
    """A single-process run that failed after a SIGTERM arrived: save the last completed step (unless a train step
    had already donated the state's buffers) and exit 0 as on SIGTERM, naming the error."""
    progress.close()
    completed = _save_last_completed(run, checkpoints, state)
    saved = (f"kept the newest checkpoint (step {checkpoints.latest_step()})" if completed is None
             else f"saved step {completed}")
    print(f"ramjax train: SIGTERM received, then the run failed after step {done} ({type(error).__name__}: "
          f"{str(error).strip().splitlines()[0] if str(error).strip() else 'no message'}); {saved} in "
          f"{run.workdir} and stopped; rerun the command to resume")
    raise SystemExit(0) from None


def _stop_on_interrupt(run: _Run, progress, checkpoints: Checkpoints, state, done: int, start: int):
    """Ctrl-C: keep what was trained, and exit 130."""
    progress.close()
    if done == start:
        # Before the first step finished (while it compiles): nothing new to save. Leave at once: an XLA
        # compilation cut short can crash the interpreter's normal shutdown (seen: exit -11).
        checkpoints.wait()
        latest = checkpoints.latest_step()
        print(f"\nramjax train: interrupted before step {start + 1} finished; nothing new to save"
              + (f" (the newest checkpoint is step {latest})" if latest else ""), flush=True)
        sys.stderr.flush()
        os._exit(130)
    completed = _save_last_completed(run, checkpoints, state)
    if completed is None:
        print(f"\nramjax train: interrupted inside a step; the newest checkpoint (step {checkpoints.latest_step()}) "
              f"in {run.workdir} is kept; rerun the command to resume")
        raise SystemExit(130) from None
    print(f"\nramjax train: interrupted; saved step {completed} in {run.workdir}; rerun the command to resume")
    raise SystemExit(130) from None


def _save_last_completed(run: _Run, checkpoints: Checkpoints, state) -> int | None:
    """Saves `state`, the state after the last completed step, unless already saved, and waits for the save; its step,
    or None where a train step had already donated the state's buffers (a stop inside a step: the newest checkpoint
    is all there is)."""
    if any(leaf.is_deleted() for leaf in jax.tree.leaves(state)):
        checkpoints.wait()
        return None
    completed = int(jax.device_get(state["step"]))
    if checkpoints.latest_step() != completed:  # not saved already (a stop just after a checkpoint)
        checkpoints.save(completed, state, _meta(run.config, completed), force=True)
    checkpoints.wait()
    return completed


# --- finish: summary.json ------------------------------------------------------------------------------------

def _finish(run: _Run, checkpoints: Checkpoints, outcome: _Outcome, wall_start: float) -> dict:
    checkpoints.close()
    config, num_steps = run.config, outcome.end
    summary = {
        "status": "finished",
        "workdir": os.path.abspath(run.workdir),
        "model": config.model.pattern,
        "parameters": run.num_params,
        "state_size": recurrent_state_size(config.model, max(n for _, n in run.task.eval_settings)),
        "steps": num_steps,
        "resumed_from": outcome.start,
        "train": outcome.last_metrics,
        "nonfinite_steps": outcome.nonfinite_steps,
        "eval": outcome.last_eval,
        "best_eval": outcome.best_eval,
        "stopped_early": outcome.end < config.train.num_steps,
        "wall_s": time.time() - wall_start,
        "train_s_this_session": outcome.train_seconds,
        "environment": environment(),
        "command": " ".join(sys.argv),
    }
    if multi_seed.num_seeds(config) > 1:  # per-seed best evaluations and their mean +- std (multi_seed.py)
        summary.update(multi_seed.summary_fields(config, run.workdir))
    if run.is_main:
        with open(os.path.join(run.workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"ramjax train: finished {num_steps} steps in {summary['wall_s']:.0f} s; eval accuracy mean "
              f"{outcome.last_eval.get('eval/accuracy/mean', float('nan')):.3f}; summary {run.workdir}/summary.json")
    return summary


# --- the workdir ---------------------------------------------------------------------------------------------

def _read_json(path: str):
    """The JSON in `path`, or None if it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _move_aside(path: str, tag: str) -> None:
    if os.path.exists(path):
        os.replace(path, f"{path}.{tag}-{int(time.time())}")


def _check_workdir(workdir: str) -> None:
    """Creates the workdir, or says in one line why it cannot be used."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir}: exists and is not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--workdir {workdir}: cannot create it ({error.strerror})") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir {workdir}: not writable")


def main(config, workdir: str | None = None, *, amend: bool = False, restart: bool = False) -> None:
    if not workdir:
        raise ConfigError("--workdir is required: the directory for checkpoints, metrics and the summary "
                          "(rerun with the same --workdir to resume)")
    train(config, workdir, amend=amend, restart=restart)
