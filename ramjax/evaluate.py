"""`ramjax eval --workdir DIR`: evaluation of a trained run from its config and newest checkpoint.

Language models (task lm; `[--split validation] [--max_windows N]`): reads the split with the run's tokenizer
and reports loss (nats per token), perplexity, bits per byte (the summed loss in bits over the bytes of text the
targets stand for, so tokenizers compare), and the loss at each position of the context window: the curve that
shows whether a model uses long context. Writes workdir/eval_<split>.json and eval_<split>.png.

Synthetic tasks (mqar, selective_copy; `[--settings "kv:length,..."] [--examples N]`): accuracy on each
setting, by default the run's own evaluation settings; give settings it was not trained on (more pairs, longer
sequences) to measure length generalisation. The examples are the fixed evaluation draws of data.eval_seed.
Writes workdir/eval_<task>_<settings>.json. RAM-Net evaluates with the model's K (not a training schedule's).
`--tie-unseen-levels` (log-linear models): the Fenwick levels that the run's training lengths never filled take
lambda of the highest level they did (model.loglinear.tie_levels_above; docs/loglinear.md section 4); without it
those levels keep their initial weights. Its results go to eval_<task>_<settings>_tied.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from ramjax.errors import ConfigError, exit_with_usage_error
from ramjax.train.setup import load_run_config
from ramjax.train.step import token_nll


def per_token_nll(graphdef, params, rest, batch):
    model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))  # rest's Variables rebuilt in this trace
    nll = token_nll(model(batch["inputs"], batch["positions"]), batch["targets"])
    return jnp.where(batch["loss_mask"], nll, 0.0)


def tie_unseen_levels(config) -> int:
    """Sets model.loglinear.tie_levels_above of a synthetic-task run's config to the highest Fenwick level its
    training lengths reach (ceil(log2 T) for the longest T of data.train_settings) and returns it."""
    from ramjax.data.tasks import parse_settings
    from ramjax.ops.loglinear.fenwick import num_levels

    if "loglinear" not in config.model.pattern:
        raise ConfigError(f"--tie-unseen-levels: model.pattern {config.model.pattern!r} has no log-linear layer")
    longest = max(length for _, length in parse_settings("data.train_settings", config.data.train_settings))
    top = num_levels(longest) - 1
    if top >= config.model.loglinear.num_levels - 1:
        raise ConfigError(f"--tie-unseen-levels: training up to length {longest} already reaches every one of the "
                          f"model's {config.model.loglinear.num_levels} levels; none is unseen")
    config.model.loglinear.tie_levels_above = top
    return top


def evaluate_synthetic_run(workdir: str, settings: str = "", examples: int = 0, tie_levels: bool = False) -> dict:
    """Accuracy of a trained MQAR / selective-copying run on each of `settings` (default: its own); `tie_levels`:
    with the levels its training never filled tied to the highest one it did (tie_unseen_levels)."""
    from ramjax.data.tasks import SyntheticTask
    from ramjax.train import sharding
    from ramjax.train.step import make_eval_step
    from ramjax.train.evaluation import Batches, evaluate
    from ramjax.train import multi_seed
    from ramjax.train.setup import check_train_config, loss_chunk_tokens, model_parts, restore_state

    config = load_run_config(workdir)
    tied_above = tie_unseen_levels(config) if tie_levels else None
    if settings:
        config.data.eval_settings = settings
    if examples:
        if examples < 1:
            raise ConfigError(f"--examples: must be >= 1, got {examples}")
        config.data.eval_examples = examples
    try:
        task = SyntheticTask(config.task, config.data)
    except ValueError as error:
        raise ConfigError(str(error).replace("data.eval_settings", "--settings")) from None
    state, meta = restore_state(config, workdir)
    mesh = sharding.make_mesh(config.mesh)
    graphdef, rest = model_parts(config, mesh)
    num_seeds = multi_seed.num_seeds(config)
    eval_fn = make_eval_step(graphdef, loss_chunk_tokens=loss_chunk_tokens(config))
    eval_step = jax.jit(eval_fn if num_seeds == 1 else multi_seed.vmap_eval_step(eval_fn))
    batch_sharding = sharding.batch_sharding(config.mesh.rules, mesh)
    check_train_config(config, task, sharding.num_shards(batch_sharding))  # rounds eval_batch_size to the shards
    batches = Batches(batch_sharding)
    if num_seeds > 1:  # every seed of a train.num_seeds run; the lines below print the means over seeds
        results = multi_seed.evaluate(eval_step, state["params"], rest, task, batches, num_seeds)
    else:
        results = evaluate(eval_step, state["params"], rest, task, batches)
    result = {"workdir": os.path.abspath(workdir), "task": config.task, "step": int(meta["step"]),
              "model": config.model.pattern, "settings": config.data.eval_settings,
              "examples_per_setting": config.data.eval_examples, "eval_seed": config.data.eval_seed, **results}
    name = config.data.eval_settings.replace(":", "x").replace(",", "_")
    if tied_above is not None:
        result["tie_levels_above"] = tied_above
        name += "_tied"
    json_path = os.path.join(workdir, f"eval_{config.task}_{name}.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"ramjax eval: {config.task} at step {result['step']}, {config.data.eval_examples} examples per setting"
             + (f", levels above {tied_above} tied to it" if tied_above is not None else "") + ":"]
    lines += [f"  {k.split('/')[-1]:>16s}  accuracy {v:.3f}" for k, v in results.items()
              if k.startswith("eval/accuracy/") and not k.endswith("/mean") and k.count("/") == 2]
    lines.append(f"  {'mean':>16s}  accuracy {results['eval/accuracy/mean']:.3f}   ({json_path})")
    if num_seeds > 1:
        lines.append(f"  (means over {num_seeds} seeds; std {results['eval/accuracy/mean/std']:.3f}; per seed "
                     + " ".join(f"{results[f'eval/accuracy/mean/seed_{i}']:.3f}" for i in range(num_seeds)) + ")")
    print("\n".join(lines))
    return result


def evaluate_run(workdir: str, split: str = "validation", max_windows: int = 0) -> dict:
    from ramjax.train import sharding
    from ramjax.train.setup import make_task, model_parts, restore_state

    if max_windows < 0:
        raise ConfigError(f"--max_windows: 0 (the config's data.eval_examples) or a positive count, got {max_windows}")
    config = load_run_config(workdir)
    if config.task != "lm":
        raise ConfigError(f"{workdir}: task {config.task!r}: use --settings/--examples (synthetic tasks), not "
                          "--split/--max_windows")
    if split not in ("train", "validation"):
        raise ConfigError(f"--split: train or validation, got {split!r}")
    if max_windows:
        config.data.eval_examples = max_windows
    task = make_task(config, eval_split=split)
    state, meta = restore_state(config, workdir)
    mesh = sharding.make_mesh(config.mesh)
    graphdef, rest = model_parts(config, mesh)  # the fixed buffers (CAPE head masks) come from the config
    run = jax.jit(lambda params, rest, batch: per_token_nll(graphdef, params, rest, batch))
    seq_len = task.seq_len
    loss_sum, count, by_position, windows = 0.0, 0, np.zeros(seq_len), 0
    # The number of windows is known only once the split is read (eval_examples caps it).
    limit = config.data.eval_examples
    for batch in tqdm(task.eval_batches(), desc=f"eval {split}", unit="batch",
                      total=-(-limit // config.data.eval_batch_size) if limit > 0 else None):
        nll = np.asarray(run(state["params"], rest, {k: jnp.asarray(v) for k, v in batch._asdict().items()}))
        rows = batch.loss_mask[:, 0]
        loss_sum += float(nll.sum())
        count += int(batch.loss_mask.sum())
        by_position += nll[rows].sum(axis=0)
        windows += int(rows.sum())
    if count == 0:  # a loss of 0 over no tokens would read as a perfect model
        raise ConfigError(f"{workdir}: the {split} split has no tokens to score (its documents hold no text); "
                          "prepare the data from a corpus with text in both splits (data.corpus_dir)")
    nbytes = int(task.eval_bytes(windows).sum())
    loss = loss_sum / count
    result = {"workdir": os.path.abspath(workdir), "split": split, "step": int(meta["step"]),
              "model": config.model.pattern, "tokenizer": config.data.tokenizer, "windows": windows,
              "tokens": count, "bytes": nbytes, "loss": loss, "perplexity": math.exp(min(loss, 700)),
              "bits_per_byte": loss_sum / math.log(2) / max(nbytes, 1),
              "per_position_loss": (by_position / max(windows, 1)).tolist()}
    json_path = os.path.join(workdir, f"eval_{split}.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    result["plot"] = plot_per_position(result, os.path.join(workdir, f"eval_{split}.png"))
    print(f"ramjax eval: {split}: loss {loss:.4f} nats/token, perplexity {result['perplexity']:.2f}, "
          f"{result['bits_per_byte']:.4f} bits/byte over {windows} windows of {seq_len} ({nbytes:,} bytes); "
          f"{json_path}" + (f", {result['plot']}" if result["plot"] else ""))
    return result


def plot_per_position(result: dict, path: str) -> str:
    import matplotlib  # a dependency; imported here so that commands without plots do not load it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = np.asarray(result["per_position_loss"])
    positions = np.arange(1, len(losses) + 1)
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(positions, losses, linewidth=0.6, alpha=0.4, label="per position")
    window = max(1, len(losses) // 32)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    axes.plot(positions[window - 1:], smooth, linewidth=1.5, label=f"mean of {window}")
    axes.set_xscale("log")
    axes.set_xlabel("position in the context window")
    axes.set_ylabel("loss (nats/token)")
    axes.set_title(f"{result['model']} step {result['step']}: {result['bits_per_byte']:.3f} bits/byte")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ramjax eval", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--split", default=None, choices=("validation", "train"),
                        help="language models: the split to read (default validation)")
    parser.add_argument("--max_windows", type=int, default=0, help="evaluate at most this many windows (0: the "
                        "config's data.eval_examples; set it larger to cover more of the split)")
    parser.add_argument("--settings", default="", help="synthetic tasks: kv:length (or tokens:length) settings "
                        "to evaluate, e.g. 64:256,128:512 (default: the run's data.eval_settings)")
    parser.add_argument("--examples", type=int, default=0, help="synthetic tasks: examples per setting (default: "
                        "the run's data.eval_examples)")
    parser.add_argument("--tie-unseen-levels", action="store_true", help="synthetic tasks, log-linear models: the "
                        "Fenwick levels the training lengths never filled take lambda of the highest one they did")
    args = parser.parse_args(argv)
    try:
        task = load_run_config(args.workdir).task
        if task == "lm":
            if args.settings or args.examples or args.tie_unseen_levels:
                raise ConfigError("--settings/--examples/--tie-unseen-levels are for synthetic tasks; this run is a "
                                  "language model (evaluated at its training length, where no level is unseen)")
            evaluate_run(args.workdir, args.split or "validation", args.max_windows)
        else:
            if args.split is not None or args.max_windows:  # said so rather than ignored
                raise ConfigError(f"--split/--max_windows are for language models; this run's task is {task!r} "
                                  "(use --settings and --examples)")
            evaluate_synthetic_run(args.workdir, args.settings, args.examples, args.tie_unseen_levels)
    except ConfigError as error:
        exit_with_usage_error(f"ramjax eval: {error}")
