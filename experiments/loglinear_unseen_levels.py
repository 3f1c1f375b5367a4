"""Log-linear models at lengths they never trained on: MQAR accuracy by the Fenwick level of each query's key,
with the level weights as trained and with the levels that training never reached switched off.

Level l >= 1 of query t holds the positions that agree with t above bit l - 1 and differ at bit l - 1
(docs/loglinear.md section 1), so training on sequences of at most T tokens reaches levels 0 .. bit_length(T - 1)
only: the loss never touches lambda of a higher level (its bucket is empty). A longer sequence fills those levels,
and the model reads them with weights nobody trained. This script measures what that does:

  python experiments/loglinear_unseen_levels.py WORKDIR [--settings 16:64,16:128,16:256] [--examples 500]
      [--trained-length N] [--results FILE.md]

For each setting ("kv:length", MQAR examples from the run's data.eval_seed), the accuracy over the queries whose
key sits at a level training reached and over those at an unseen level: with the trained model; with lambda of
every unseen level set to 0 (a query whose key sits there then cannot be answered through the log-linear layers:
do the others change?); and with every unseen level given lambda of the highest trained level (could the model
answer them if those weights were sensible?). Also the mean lambda of each level over the first setting's
tokens, per layer: the trained levels' against the unseen ones'. --trained-length defaults to the longest length
of the run's data.train_settings. Seed 0 of a train.num_seeds run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository: ramjax
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # experiments/: the sibling script below

from mqar_gap_accuracy import correct_per_query  # noqa: E402
from ramjax.data.mqar import batch_rng, mqar_batch  # noqa: E402
from ramjax.data.tasks import parse_settings  # noqa: E402
from ramjax.errors import ConfigError  # noqa: E402
from ramjax.layers.fenwick_decay import FenwickDecay, tie_levels  # noqa: E402
from ramjax.models.mixers import parse_pattern  # noqa: E402
from ramjax.ops.loglinear.fenwick import level_index, num_levels  # noqa: E402
from ramjax.train import multi_seed  # noqa: E402
from ramjax.train.setup import load_model, load_run_config  # noqa: E402


def key_levels(inputs: np.ndarray, loss_mask: np.ndarray, num_kv_pairs: int) -> np.ndarray:
    """For every counted (query) position, the level holding its key-value pair: the value token's position (key
    at 2 i, value at 2 i + 1 in the key-value block), where the pair's key and value meet; -1 elsewhere."""
    keys = inputs[:, 0:2 * num_kv_pairs:2]
    key_index = np.argmax(inputs[:, :, None] == keys[:, None, :], axis=-1)
    positions = np.broadcast_to(np.arange(inputs.shape[1])[None, :], inputs.shape)
    return np.where(loss_mask, np.asarray(level_index(positions, 2 * key_index + 1)), -1)


@contextlib.contextmanager
def level_weights_patched(unseen: int | None = None, how: str = "off", record: list | None = None):
    """While active, every FenwickDecay's lambda at levels >= `unseen` is set to 0 (how "off") or to lambda of
    level unseen - 1, the highest trained one (how "copy"), and its mean over batch and time ([heads, L]) is
    appended to `record` (host callbacks, in layer order), for models traced inside it."""
    original = FenwickDecay.__call__

    def patched(self, x):
        weights = original(self, x)
        if unseen is not None and how == "copy":
            weights = tie_levels(weights, unseen - 1)  # model.loglinear.tie_levels_above's own mechanism
        elif unseen is not None:
            weights = jnp.where(jnp.arange(weights.shape[-1]) < unseen, weights, 0.0)
        if record is not None:
            jax.debug.callback(lambda w: record.append(np.asarray(w)), weights.mean(axis=(0, 1)), ordered=True)
        return weights

    FenwickDecay.__call__ = patched
    try:
        yield
    finally:
        FenwickDecay.__call__ = original


def unseen_level_table(workdir: str, settings: str, examples: int, trained_length: int = 0,
                       batch_size: int = 250) -> dict:
    config = load_run_config(workdir)
    if config.task != "mqar":
        raise ConfigError(f"{workdir}: task {config.task!r}; this counts MQAR queries only")
    if "loglinear" not in config.model.pattern:
        raise ConfigError(f"{workdir}: model.pattern {config.model.pattern!r} has no log-linear layer")
    if not trained_length:
        trained_length = max(length for _, length in parse_settings("data.train_settings",
                                                                     config.data.train_settings))
    unseen = num_levels(trained_length)  # levels 0 .. num_levels - 1 cover every pair below trained_length
    model = load_model(workdir, seed=None if multi_seed.num_seeds(config) == 1 else 0)
    rows, lambdas = [], None
    for kv, length in parse_settings("--settings", settings):
        try:
            batch = mqar_batch(batch_rng(config.data.eval_seed, 0), batch_size=examples, seq_len=length,
                               num_kv_pairs=kv, vocab_size=config.data.vocab_size, power_a=config.data.power_a)
        except ValueError as error:
            raise ConfigError(f"--settings {kv}:{length}: {error}") from None
        levels = key_levels(batch.inputs, batch.loss_mask, kv)
        record = [] if lambdas is None else None
        with level_weights_patched(record=record):
            trained = correct_per_query(model, batch, batch_size)
        with level_weights_patched(unseen, "off"):
            off = correct_per_query(model, batch, batch_size)
        with level_weights_patched(unseen, "copy"):
            copied = correct_per_query(model, batch, batch_size)
        if record is not None:
            lambdas = record
        seen_q, unseen_q = batch.loss_mask & (levels < unseen), batch.loss_mask & (levels >= unseen)
        cell = lambda correct, chosen: float(correct[chosen].mean()) if chosen.any() else float("nan")  # noqa: E731
        rows.append({"setting": f"{kv}:{length}", "share_unseen": float(unseen_q.sum() / batch.loss_mask.sum()),
                     "trained": (cell(trained, seen_q), cell(trained, unseen_q), cell(trained, batch.loss_mask)),
                     "off": (cell(off, seen_q), cell(off, unseen_q), cell(off, batch.loss_mask)),
                     "copied": (cell(copied, seen_q), cell(copied, unseen_q), cell(copied, batch.loss_mask))})
    # The callbacks ran once per layer per batch slice: keep the first slice's layers (the trace's order).
    layers = parse_pattern(config.model.pattern, config.model.num_layers).count("loglinear")
    per_layer = [w.mean(axis=0) for w in lambdas[:layers]]  # [L] per layer, the mean over heads
    return {"workdir": workdir, "trained_length": trained_length, "first_unseen_level": unseen, "rows": rows,
            "lambda_per_layer": per_layer}


def markdown(table: dict) -> str:
    unseen = table["first_unseen_level"]
    lines = [f"{table['workdir']}: trained up to length {table['trained_length']} (levels 0-{unseen - 1}); "
             f"accuracy over the queries whose key is at a trained level / an unseen level / all", "",
             "| setting | queries at unseen levels | as trained | unseen levels' lambda = 0 | unseen levels take "
             "the top trained level's lambda |", "|---|---|---|---|---|"]
    fmt = lambda acc: " / ".join("-" if np.isnan(a) else f"{a:.3f}" for a in acc)  # noqa: E731
    for row in table["rows"]:
        lines.append(f"| {row['setting']} | {row['share_unseen']:.2f} | {fmt(row['trained'])} | {fmt(row['off'])} | "
                     f"{fmt(row['copied'])} |")
    lines += ["", "Mean lambda per level (over the first setting's tokens and the heads), per log-linear layer:", "",
              "| layer | " + " | ".join(f"level {l}" for l in range(len(table["lambda_per_layer"][0]))) + " |",
              "|---|" + "---|" * len(table["lambda_per_layer"][0])]
    for i, weights in enumerate(table["lambda_per_layer"]):
        lines.append(f"| {i} | " + " | ".join(f"{w:.3f}" for w in weights) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir")
    parser.add_argument("--settings", default="16:64,16:128,16:256", help="kv:length list (default 16:64,16:128,16:256)")
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--trained-length", type=int, default=0,
                        help="the longest training length (default: from the run's data.train_settings)")
    parser.add_argument("--results", help="also write the table (Markdown) to this file")
    args = parser.parse_args(argv)
    if args.examples < 1:
        raise SystemExit(f"--examples: must be >= 1, got {args.examples}")
    if args.trained_length < 0:
        raise SystemExit(f"--trained-length: must be >= 1 (or 0: from the run's config), got {args.trained_length}")
    try:
        text = markdown(unseen_level_table(args.workdir, args.settings, args.examples, args.trained_length))
    except ConfigError as error:
        raise SystemExit(f"loglinear_unseen_levels.py: {error}") from None
    print(text)
    if args.results:
        with open(args.results, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
