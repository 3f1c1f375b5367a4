"""`ramjax train --config configs/mqar.py:VARIANT --workdir DIR`: the training loop, top to bottom.

Rerunning the same command with the same workdir resumes from the newest checkpoint: parameters, optimizer
state, step and data position (batches are a function of (data.seed, step)), so an interrupted run ends where an
uninterrupted one would. The workdir holds config.json (written once; deliberate changes go to amendments.jsonl,
see run_record.py), metrics.jsonl, tensorboard/, checkpoints/ and, at the end, summary.json (never overwritten:
rerunning a finished run prints where it is).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from ramjax.data.tasks import SyntheticTask
from ramjax.errors import ConfigError
from ramjax.models.state_size import recurrent_state_size
from ramjax.train.address_metrics import address_metrics
from ramjax.timing import environment
from ramjax.train import run_record, sharding, top_k_schedule
from ramjax.train.checkpoint import Checkpoints
from ramjax.train.metrics import MetricsLog
from ramjax.train.setup import (abstract_model, check_model_config, initialisers, jit_train_step, make_task,
                                with_shardings)
from ramjax.train.step import make_eval_step


def check_config(config, task, batch_shards: int) -> None:
    d, t = config.data, config.train
    if config.model.vocab_size < d.vocab_size:
        raise ConfigError(f"model.vocab_size ({config.model.vocab_size}) must be >= data.vocab_size ({d.vocab_size})")
    for field in ("num_steps", "log_every", "eval_every"):
        if not isinstance(t[field], int) or t[field] < 1:
            raise ConfigError(f"train.{field}: must be a positive integer, got {t[field]!r}")
    if t.get("on_nonfinite", "skip") not in ("skip", "stop"):
        raise ConfigError(f"train.on_nonfinite: must be 'skip' or 'stop', got {t.on_nonfinite!r}")
    shards = math.lcm(batch_shards, jax.process_count())
    if not isinstance(d.batch_size, int) or d.batch_size < 1 or d.batch_size % shards:
        raise ConfigError(f"data.batch_size: must be a positive multiple of the {batch_shards} batch shards and "
                          f"the {jax.process_count()} processes, got {d.batch_size}")
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


def _install_sigterm(flag: list):
    """SIGTERM (the preemption signal) appends to `flag`; the loop then saves and exits 0. Returns the previous
    handler, or None where no handler can be installed (not the main thread)."""
    try:
        return signal.signal(signal.SIGTERM, lambda signum, frame: flag.append(signum))
    except ValueError:
        return None


def _any_process(flag: bool) -> bool:
    """Whether `flag` is set in any process. Every process must call this at the same step: with several
    processes it is a host all-gather (a SIGTERM reaches the processes of a job at slightly different times, and
    they must stop, save and exit at the same step, or one waits forever in a collective the others left)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def _record_nonfinite_batch(workdir: str, task: SyntheticTask, step: int) -> str:
    """Writes the batch of a non-finite step to workdir/nonfinite/step_N.npz; returns where, for the log."""
    directory = os.path.join(workdir, "nonfinite")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"step_{step}.npz")
    np.savez(path, **task.train_batch(step)._asdict())
    return f", saved to {path}"


class Batches:
    """Global batches as sharded jax.Arrays; each process contributes its own rows."""

    def __init__(self, batch_sharding):
        self.sharding = batch_sharding

    def put(self, batch) -> dict:
        rows = batch.inputs.shape[0] // jax.process_count()
        start = jax.process_index() * rows
        return {field: jax.make_array_from_process_local_data(self.sharding, np.asarray(value[start:start + rows]))
                for field, value in batch._asdict().items()}


def evaluate(eval_step, params, rest, task: SyntheticTask, batches: Batches) -> dict:
    """Accuracy and loss on every evaluation slice, and the mean accuracy over slices."""
    results = {}
    for eval_slice in task.eval_slices:
        totals = None
        for batch in task.eval_batches(eval_slice):
            out = eval_step(params, rest, batches.put(batch))
            totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        totals = jax.device_get(totals)
        results[f"eval/accuracy/{eval_slice.name}"] = float(totals["correct"] / max(totals["count"], 1))
        results[f"eval/loss/{eval_slice.name}"] = float(totals["loss_sum"] / max(totals["count"], 1))
    accuracies = [v for k, v in results.items() if k.startswith("eval/accuracy/")]
    results["eval/accuracy/mean"] = float(np.mean(accuracies))
    return results


def train(config, workdir: str, *, devices=None, amend: bool = False, restart: bool = False) -> dict:
    """Train (or resume) the run in `workdir`; returns the summary written to workdir/summary.json.

    `amend`: resume even though result-changing config fields differ from the run's record, recording the
    changes in amendments.jsonl (ramjax/train/run_record.py). `restart`: when the workdir has checkpoints but
    none restores, start over from step 0 instead of refusing (the old metrics.jsonl is kept beside it)."""
    wall_start = time.time()
    is_main = jax.process_index() == 0
    _check_workdir(workdir)
    try:
        check_model_config(config)
        task = make_task(config)
        mesh = sharding.make_mesh(config.mesh, devices)
        rules = config.mesh.rules
        batch_sh = sharding.batch_sharding(rules, mesh)
        check_config(config, task, sharding.num_shards(batch_sh))
        top_k_schedule.check(config)
        profiler = _ProfileWindow(config.train.get("profile_steps", (0, 0)), os.path.join(workdir, "profile"))
        num_steps = config.train.num_steps
        build, tx, schedule, graphdef, abstract_params, abstract_rest, abstract_state = abstract_model(config, mesh)
    except ValueError as error:
        raise ConfigError(str(error)) from None

    state_sh = sharding.tree_shardings(abstract_state, rules, mesh)
    rest_sh = sharding.tree_shardings(abstract_rest, rules, mesh)
    replicated = sharding.replicated(mesh)

    init_state, init_rest = initialisers(build, tx)
    # One compiled train step per K the RAM-Net top-K schedule uses (one, without a schedule); evaluation always
    # runs the model's own K.
    model_k = config.model.ramnet.top_k
    train_steps = {}

    def train_step_for(step: int):
        k = top_k_schedule.top_k_at(step, top_k_schedule.start_k(config), model_k,
                                    config.train.get("ramnet_top_k_anneal_steps", 0))
        if k not in train_steps:
            step_graphdef = graphdef
            if k != model_k:
                model = top_k_schedule.with_top_k(nnx.merge(graphdef, abstract_params, abstract_rest), k)
                step_graphdef = nnx.split(model, nnx.Param, ...)[0]
            train_steps[k] = jit_train_step(config, step_graphdef, tx, schedule, state_sh, rest_sh, batch_sh, mesh)
        return train_steps[k]

    eval_step = jax.jit(make_eval_step(graphdef), in_shardings=(state_sh["params"], rest_sh, batch_sh),
                        out_shardings=replicated)
    rest = jax.jit(init_rest, out_shardings=rest_sh)()
    # RAM-Net's read/write overlap on recall (ramjax/train/address_metrics.py), logged with each evaluation.
    address_step = None
    if config.train.get("address_metrics", False) and config.task == "mqar" and "ramnet" in config.model.pattern:
        address_step = jax.jit(lambda params, rest, inputs: nnx.merge(graphdef, params, rest).ramnet_addresses(inputs),
                               in_shardings=(state_sh["params"], rest_sh, batch_sh), out_shardings=replicated)

    # --- state: resume from the newest checkpoint, or initialise -------------------------------------------
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints,
                              every=config.train.checkpoint_every)
    current = json.loads(config.to_json_best_effort())
    if getattr(task, "provenance", None) is not None:  # language models: which corpus, split and tokenizer
        current["data_provenance"] = task.provenance
    latest = checkpoints.latest_step()
    run_record.check_and_record(workdir, current, step=latest or 0, amend=amend, write=is_main)
    summary_path = os.path.join(workdir, "summary.json")
    finished = _read_json(summary_path)
    if finished is not None and latest == num_steps and finished.get("steps") == num_steps:
        if is_main:
            print(f"ramjax train: {workdir} already finished its {num_steps} steps; its summary is "
                  f"{summary_path} (left as it was)")
        checkpoints.close()
        return finished
    restored = None
    if latest is not None:
        restored = checkpoints.restore_newest_good(with_shardings(abstract_state, state_sh),
                                                   log=print if is_main else None)
    corrupt = checkpoints.corrupt_dirs()
    if restored is None and corrupt:  # checkpoints were written, and none restores
        if not restart:
            raise ConfigError(f"no checkpoint in {workdir}/checkpoints restores (moved aside: "
                              f"{', '.join(corrupt)}); rerun with --restart to train from step 0 in this workdir, "
                              "or use a new --workdir")
        if is_main:
            _move_aside(os.path.join(workdir, "metrics.jsonl"), "before-restart")
            for name in corrupt:  # kept for inspection, out of the way of the next resume
                os.makedirs(os.path.join(workdir, "corrupt-checkpoints"), exist_ok=True)
                os.replace(os.path.join(workdir, "checkpoints", name),
                           os.path.join(workdir, "corrupt-checkpoints", name))
            print(f"ramjax train: --restart: no checkpoint restores; training {workdir} from step 0 (the "
                  "earlier metrics.jsonl is kept as metrics.jsonl.before-restart-TIME, the checkpoints in "
                  "corrupt-checkpoints/)")
    if restored is not None:
        state, meta = restored
        start = int(meta["step"])
        if is_main:
            print(f"ramjax train: resuming {workdir} from step {start} (data position {meta['data_step']})")
    else:
        state = jax.jit(init_state, out_shardings=state_sh)()
        start = 0
    if is_main:
        if finished is not None:  # a finished run extended by --amend: its first summary stays on record
            _move_aside(summary_path, f"steps{finished.get('steps')}")
        if hasattr(task, "tokenizer"):
            task.tokenizer.save(workdir)  # evaluation reads the text with the tokenizer training used

    # --- the loop ------------------------------------------------------------------------------------------
    metrics_log = MetricsLog(workdir, enabled=is_main, resumed_from=start)
    batches = Batches(batch_sh)
    t = config.train
    tokens_per_step = config.data.batch_size * (task.max_train_len if config.data.get("mixture", "pad") == "pad" else
                                                float(np.mean([n for _, n in task.train_settings])))
    last_metrics, last_eval = {}, {}
    n_params = int(sum(x.size for x in jax.tree.leaves(abstract_params)))
    if is_main:
        print(f"ramjax train: {config.model.pattern} model, {n_params:,} parameters, mesh "
              f"{dict(mesh.shape)}, steps {start}..{num_steps}, workdir {workdir}")
    progress = tqdm(total=num_steps, initial=start, disable=not (t.progress and is_main), unit="step",
                    dynamic_ncols=True, desc="train")
    step, interval_start, interval_steps, train_seconds = start, time.time(), 0, 0.0

    def meta_for(step):
        return {"step": step, "data_step": step, "data_seed": config.data.seed,
                "init_seed": config.train.init_seed}

    on_nonfinite = t.get("on_nonfinite", "skip")
    unchecked = []  # (step, metrics) not yet checked for a non-finite loss
    nonfinite_steps = []

    def check_finite():
        """Logs every unchecked step whose update was skipped as non-finite; True if there was one."""
        bad = [(s, m) for s, m in jax.device_get(unchecked) if not m["finite"]]
        unchecked.clear()
        for bad_step, m in bad:
            nonfinite_steps.append(bad_step)
            record = _record_nonfinite_batch(workdir, task, bad_step) if is_main else ""
            metrics_log.write(bad_step + 1, {"train/nonfinite_step": bad_step, "train/nonfinite_loss": m["loss"],
                                             "train/nonfinite_grad_norm": m["grad_norm"]})
            if is_main:
                progress.write(f"ramjax train: step {bad_step}: loss {m['loss']}, gradient norm {m['grad_norm']}: "
                               f"not finite, the update was skipped; the batch is (data.seed "
                               f"{config.data.seed}, step {bad_step}){record}")
        return bool(bad)

    preempted = []
    previous_handler = _install_sigterm(preempted)
    ignore_sigterm_from_now = False
    done = start  # the steps completed so far
    try:
        for step in range(start, num_steps):
            profiler.before(step)
            state, metrics = train_step_for(step)(state, rest, batches.put(task.train_batch(step)))
            profiler.after(step + 1, metrics)
            interval_steps += 1
            done = step + 1
            unchecked.append((step, {k: metrics[k] for k in ("finite", "loss", "grad_norm")}))
            # "stop" checks every step (a sync per step); "skip" checks at each log and before each checkpoint.
            if (on_nonfinite == "stop" or done % t.log_every == 0 or checkpoints.is_save_step(done)) and \
                    check_finite() and on_nonfinite == "stop":
                progress.close()
                checkpoints.wait()
                print(f"ramjax train: stopped at step {step} (train.on_nonfinite='stop'); the newest checkpoint "
                      f"(step {checkpoints.latest_step()}) holds the last good state")
                raise SystemExit(3)
            if done % t.log_every == 0 or done == num_steps:
                metrics = jax.device_get(metrics)
                elapsed = time.time() - interval_start
                train_seconds += elapsed
                last_metrics = {name: float(value) for name, value in metrics.items()}
                last_metrics["tokens_per_s"] = interval_steps * tokens_per_step / max(elapsed, 1e-9)
                last_metrics["steps_per_s"] = interval_steps / max(elapsed, 1e-9)
                metrics_log.write(done, {f"train/{k}": v for k, v in last_metrics.items()})
                progress.set_postfix(loss=f"{last_metrics['loss']:.3f}", acc=f"{last_metrics['accuracy']:.3f}",
                                     tok_s=f"{last_metrics['tokens_per_s']:.0f}")
            if done % t.eval_every == 0 or done == num_steps:
                last_eval = evaluate(eval_step, state["params"], rest, task, batches)
                metrics_log.write(done, last_eval)
                if address_step is not None:  # on the batch this step trained on; diagnostics, not in the summary
                    batch = task.train_batch(step)
                    codes = jax.device_get(address_step(state["params"], rest, batches.put(batch)["inputs"]))
                    metrics_log.write(done, address_metrics(codes, batch.inputs, batch.loss_mask))
                if is_main:
                    progress.write(f"step {done}: eval accuracy mean {last_eval['eval/accuracy/mean']:.3f} " +
                                   " ".join(f"{k.split('/')[-1]}={v:.3f}" for k, v in last_eval.items()
                                            if k.startswith("eval/accuracy/") and not k.endswith("/mean")))
            checkpoints.save(done, state, meta_for(done))
            progress.update(1)
            if done % t.log_every == 0:
                interval_start, interval_steps = time.time(), 0
            if _any_process(bool(preempted)):
                progress.close()
                check_finite()
                if checkpoints.latest_step() != done:
                    checkpoints.save(done, state, meta_for(done), force=True)
                checkpoints.wait()
                by = "" if preempted else " by another process of this run"
                if jax.process_count() > 1:
                    # From here to exit a second SIGTERM (a scheduler signalling every process, or repeating
                    # itself) must not kill the process while the distributed runtime shuts down (seen: exit -15
                    # after the save): ignore it, and leave it ignored (`finally`). Single-process runs restore
                    # the caller's handler, so that a library caller's later children are not left ignoring it.
                    ignore_sigterm_from_now = True
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)
                print(f"ramjax train: SIGTERM received{by}; saved step {done} in {workdir} and stopped; rerun the "
                      f"command to resume")
                raise SystemExit(0)
    except KeyboardInterrupt:
        if done == start:
            # Ctrl-C before the first step finished (while it compiles): nothing new to save. Leave at once:
            # an XLA compilation cut short can crash the interpreter's normal shutdown (seen: exit -11).
            progress.close()
            checkpoints.wait()
            print(f"\nramjax train: interrupted before step {start + 1} finished; nothing new to save"
                  + (f" (the newest checkpoint is step {checkpoints.latest_step()})" if checkpoints.latest_step()
                     else ""), flush=True)
            sys.stderr.flush()
            os._exit(130)
        # Ctrl-C: keep what was trained. `state` is the state after the last completed step, unless the
        # interrupt came inside a train_step call after its buffers were donated: then the newest checkpoint is
        # all there is.
        progress.close()
        if any(leaf.is_deleted() for leaf in jax.tree.leaves(state)):
            checkpoints.wait()
            print(f"\nramjax train: interrupted inside a step; the newest checkpoint (step "
                  f"{checkpoints.latest_step()}) in {workdir} is kept; rerun the command to resume")
            raise SystemExit(130) from None
        completed = int(jax.device_get(state["step"]))
        if checkpoints.latest_step() != completed:  # not saved already (an interrupt just after a checkpoint)
            checkpoints.save(completed, state, meta_for(completed), force=True)
        checkpoints.wait()
        print(f"\nramjax train: interrupted; saved step {completed} in {workdir}; rerun the command to resume")
        raise SystemExit(130) from None
    finally:
        profiler.stop()
        if previous_handler is not None and not ignore_sigterm_from_now:
            signal.signal(signal.SIGTERM, previous_handler)
    progress.close()
    check_finite()
    if checkpoints.latest_step() != num_steps:
        checkpoints.save(num_steps, state, meta_for(num_steps), force=True)
    checkpoints.wait()
    checkpoints.close()
    metrics_log.close()

    if not last_eval and start >= num_steps:
        last_eval = evaluate(eval_step, state["params"], rest, task, batches)
    summary = {
        "status": "finished",
        "workdir": os.path.abspath(workdir),
        "model": config.model.pattern,
        "parameters": n_params,
        "state_size": recurrent_state_size(config.model, max(n for _, n in task.eval_settings)),
        "steps": num_steps,
        "resumed_from": start,
        "train": last_metrics,
        "nonfinite_steps": nonfinite_steps,
        "eval": last_eval,
        "wall_s": time.time() - wall_start,
        "train_s_this_session": train_seconds,
        "environment": environment(),
        "command": " ".join(sys.argv),
    }
    if is_main:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"ramjax train: finished {num_steps} steps in {summary['wall_s']:.0f} s; eval accuracy mean "
              f"{last_eval.get('eval/accuracy/mean', float('nan')):.3f}; summary {workdir}/summary.json")
    return summary


class _ProfileWindow:
    """Traces steps [start, stop) with jax.profiler into `directory` (train.profile_steps; (0, 0): none)."""

    def __init__(self, window, directory: str):
        window = tuple(window)
        if len(window) != 2 or not all(isinstance(w, int) and w >= 0 for w in window) or window[1] < window[0]:
            raise ConfigError(f"train.profile_steps: (start, stop) with 0 <= start <= stop, got {window!r}")
        self.start, self.stop_at = window
        self.directory, self.active = directory, False

    def before(self, step: int) -> None:
        if self.start < self.stop_at and step == self.start:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, done: int, outputs) -> None:
        if self.active and done >= self.stop_at:
            jax.block_until_ready(outputs)  # the traced steps' device work inside the window
            self.stop()
            if jax.process_index() == 0:
                print(f"ramjax train: steps {self.start}..{self.stop_at - 1} traced into {self.directory}")

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


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
