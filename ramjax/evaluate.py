"""`ramjax eval --workdir DIR [--split validation] [--max_windows N]`: language-model evaluation of a run.

Loads the run's config (workdir/config.json) and its newest checkpoint, reads the split with the run's
tokenizer, and reports loss (nats per token), perplexity, bits per byte (the summed loss in bits over the bytes
of text the targets stand for, so tokenizers compare), and the loss at each position of the context window: the
curve that shows whether a model uses long context. Writes workdir/eval_<split>.json and eval_<split>.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from ramjax.errors import ConfigError
from ramjax.train.step import token_nll


def per_token_nll(graphdef, params, rest, batch):
    model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))  # rest's Variables rebuilt in this trace
    nll = token_nll(model(batch["inputs"], batch["positions"]), batch["targets"])
    return jnp.where(batch["loss_mask"], nll, 0.0)


def evaluate_run(workdir: str, split: str = "validation", max_windows: int = 0) -> dict:
    from ramjax.train import sharding
    from ramjax.train.trainer import _abstract, make_task, restore_state

    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise ConfigError(f"--workdir {workdir}: no config.json (not a ramjax train workdir)")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if config.task != "lm":
        raise ConfigError(f"{workdir}: task {config.task!r}; `ramjax eval` evaluates language models (task 'lm')")
    if split not in ("train", "validation"):
        raise ConfigError(f"--split: train or validation, got {split!r}")
    config.mesh.rules = tuple((name, tuple(a) if isinstance(a, list) else a) for name, a in config.mesh.rules)
    if max_windows:
        config.data.eval_examples = max_windows
    task = make_task(config, eval_split=split)
    state, meta = restore_state(config, workdir)
    mesh = sharding.make_mesh(config.mesh)
    build, _, _, graphdef, *_ = _abstract(config, mesh)
    rest = nnx.split(build(), nnx.Param, ...)[2]  # the fixed buffers (CAPE head masks) come from the config
    run = jax.jit(lambda params, rest, batch: per_token_nll(graphdef, params, rest, batch))
    seq_len = task.seq_len
    loss_sum, count, by_position, windows = 0.0, 0, np.zeros(seq_len), 0
    for batch in tqdm(task.eval_batches(), desc=f"eval {split}", unit="batch",
                      total=-(-min(task.num_windows(split), config.data.eval_examples or 10**12) //
                              config.data.eval_batch_size)):
        nll = np.asarray(run(state["params"], rest, {k: jnp.asarray(v) for k, v in batch._asdict().items()}))
        rows = batch.loss_mask[:, 0]
        loss_sum += float(nll.sum())
        count += int(batch.loss_mask.sum())
        by_position += nll[rows].sum(axis=0)
        windows += int(rows.sum())
    nbytes = int(task.eval_bytes(windows).sum())
    loss = loss_sum / max(count, 1)
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


def plot_per_position(result: dict, path: str) -> str | None:
    try:
        import matplotlib
    except ImportError:
        print("ramjax eval: matplotlib is not installed, so no plot (the JSON has the per-position loss)")
        return None

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
    parser.add_argument("--split", default="validation", choices=("validation", "train"))
    parser.add_argument("--max_windows", type=int, default=0, help="evaluate at most this many windows (0: the "
                        "config's data.eval_examples; set it larger to cover more of the split)")
    args = parser.parse_args(argv)
    try:
        evaluate_run(args.workdir, args.split, args.max_windows)
    except ConfigError as error:
        raise SystemExit(f"ramjax eval: {error}") from None
