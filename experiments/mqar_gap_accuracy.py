"""MQAR accuracy of trained runs by the distance between each query and the key it asks about.

A model that recalls by content answers a query whatever the distance to its key; one that reads from a fixed
position offset (for example RAM-Net with CAPE's relative addresses in the recall layer) answers mostly the
queries that sit close to their keys. MQAR's gaps are heavy on short distances (Zoology's power law), so the mean
accuracy alone cannot tell the two apart.

  python experiments/mqar_gap_accuracy.py WORKDIR [WORKDIR ...] [--setting 8:64] [--examples 1000]
      [--bins 1,4,8,16,32,64,1024 | --modulo 8] [--results FILE.md]

Each run is evaluated with its newest checkpoint (every seed of a train.num_seeds run) on `--examples` MQAR
examples of `--setting` ("kv:length") drawn from the run's data.eval_seed; a query's distance is its position
minus its key's position in the key-value block. The table gives, per distance bin [low, high), the share of the
queries in that bin and the accuracy there (the mean over seeds), then the overall accuracy. `--modulo N` bins
by the distance modulo N instead: RAM-Net's CAPE shifts a flat slot index by the position, so a recall layer with
CAPE can favour distances of one residue modulo the factor size d_p.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ramjax.data.mqar import batch_rng, mqar_batch  # noqa: E402
from ramjax.data.tasks import parse_settings  # noqa: E402
from ramjax.errors import ConfigError  # noqa: E402
from ramjax.train import multi_seed  # noqa: E402
from ramjax.train.setup import load_model, load_run_config  # noqa: E402


def query_distances(inputs: np.ndarray, loss_mask: np.ndarray, num_kv_pairs: int) -> np.ndarray:
    """For every counted position (a query's answer is predicted there), the distance in tokens from the key's
    place in the key-value block (positions 0, 2, ..., 2 kv - 2) to the query: [rows, time], 0 elsewhere."""
    keys = inputs[:, 0:2 * num_kv_pairs:2]
    key_index = np.argmax(inputs[:, :, None] == keys[:, None, :], axis=-1)  # [rows, time]: first matching key
    positions = np.arange(inputs.shape[1])[None, :]
    return np.where(loss_mask, positions - 2 * key_index, 0)


def correct_per_query(model, batch, batch_size: int) -> np.ndarray:
    """1 where the model's argmax is the target, per position, over the batch in slices of batch_size rows."""
    graphdef, state = nnx.split(model)
    apply = jax.jit(lambda state, tokens, positions: jnp.argmax(nnx.merge(graphdef, state)(tokens, positions), -1))
    out = []
    for start in range(0, batch.inputs.shape[0], batch_size):
        tokens = jnp.asarray(batch.inputs[start:start + batch_size])
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        out.append(np.asarray(apply(state, tokens, positions)) == batch.targets[start:start + batch_size])
    return np.concatenate(out)


def gap_table(workdir: str, setting: str, examples: int, bins: list[int], modulo: int = 0,
              batch_size: int = 250) -> dict:
    """Per bin [low, high) of the distance (of the distance modulo `modulo` when it is > 0): (low, high, share of
    the queries, accuracy); and the overall accuracy."""
    config = load_run_config(workdir)
    if config.task != "mqar":
        raise ConfigError(f"{workdir}: task {config.task!r}; this counts MQAR query distances only")
    [(kv, length)] = parse_settings("--setting", setting)
    batch = mqar_batch(batch_rng(config.data.eval_seed, 0), batch_size=examples, seq_len=length, num_kv_pairs=kv,
                       vocab_size=config.data.vocab_size, power_a=config.data.power_a)
    distance = query_distances(batch.inputs, batch.loss_mask, kv)
    if modulo:
        distance = distance % modulo
    n = multi_seed.num_seeds(config)
    correct = np.mean([correct_per_query(load_model(workdir, seed=None if n == 1 else i), batch, batch_size)
                       for i in range(n)], axis=0)
    queries = batch.loss_mask
    rows = []
    for low, high in zip(bins[:-1], bins[1:]):
        chosen = queries & (distance >= low) & (distance < high)
        count = int(chosen.sum())
        rows.append((low, high, count / queries.sum(), float(correct[chosen].mean()) if count else float("nan")))
    return {"workdir": workdir, "seeds": n, "rows": rows, "accuracy": float(correct[queries].mean())}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--setting", default="8:64", help="kv:length of the examples (default 8:64)")
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--bins", default="1,4,8,16,32,64,1024", help="distance bin edges, increasing")
    parser.add_argument("--modulo", type=int, default=0, help="bin by the distance modulo this (one bin a residue)")
    parser.add_argument("--results", help="also write the table (Markdown) to this file")
    args = parser.parse_args(argv)
    bins = [int(b) for b in args.bins.split(",")]
    if args.modulo < 0:
        raise SystemExit(f"--modulo: must be >= 1 (or 0: --bins), got {args.modulo}")
    if args.modulo:
        bins = list(range(args.modulo + 1))
    elif len(bins) < 2 or bins != sorted(set(bins)) or bins[0] < 1:
        raise SystemExit(f"--bins: at least two increasing edges >= 1, got {args.bins!r}")
    if args.examples < 1:
        raise SystemExit(f"--examples: must be >= 1, got {args.examples}")
    tables = [gap_table(w, args.setting, args.examples, bins, args.modulo) for w in args.workdirs]
    name = (lambda lo, hi: f"distance = {lo} mod {args.modulo}") if args.modulo else \
        (lambda lo, hi: f"distance {lo}-{hi - 1}")
    header = "| run | seeds | " + " | ".join(name(lo, hi) for lo, hi in zip(bins[:-1], bins[1:])) + " | all |"
    lines = [f"MQAR accuracy by query-key distance, setting {args.setting}, {args.examples} examples "
             f"(cells: accuracy, share of the queries)", "", header, "|" + "---|" * (len(bins) + 2)]
    for t in tables:
        cells = [f"{acc:.3f} ({share:.2f})" if share else "-" for _, _, share, acc in t["rows"]]
        lines.append(f"| {t['workdir']} | {t['seeds']} | " + " | ".join(cells) + f" | {t['accuracy']:.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.results:
        with open(args.results, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
