"""Multi-query associative recall (MQAR), generated as Zoology (arXiv 2312.04927) generates it.

One example of length T with kv pairs, vocabulary V:
- keys drawn without replacement from [1, V/2), values from [V/2, V); the context is k1 v1 k2 v2 ... (2 kv tokens);
- after the context, each key is asked once more at an even offset 2 * gap, the gaps drawn without replacement
  from [0, (T - 2 kv) / 2) with p(gap = i - 1) proportional to a * i^(a - 1) (power_a = a = 0.01: heavy on short
  gaps, with a long tail);
- the token after each query is its value: that is the only place the loss and accuracy count;
- every other position after the context is a random token from [0, V) (Zoology's random_non_queries).
Inputs and targets are the sequence shifted by one, as for a language model.

Batches are a pure function of (seed, step, process index), so a restarted run sees the same data.

`fork_mqar_batch` is the layout of the adaptive-decay fork (`data.layout = "fork"`, docs/loglinear.md section 6):
the kv block first, then random tokens from [1, V), then all kv queries packed at the end, each key once in a
random order, each followed by a random token (the answer is a target only).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# The RAM-Net paper's evaluation suite: (kv pairs, sequence length).
EVAL_SUITE = ((4, 64), (8, 64), (16, 64), (32, 128), (64, 256), (128, 512), (256, 1024))


class Batch(NamedTuple):
    inputs: np.ndarray  # int32 [batch, time]
    targets: np.ndarray  # int32 [batch, time]
    loss_mask: np.ndarray  # bool [batch, time]: True exactly at the query positions


def check_setting(num_kv_pairs: int, seq_len: int, vocab_size: int) -> None:
    """Zoology's constraints, as errors that name the value and the rule."""
    if num_kv_pairs < 1:
        raise ValueError(f"num_kv_pairs: must be >= 1, got {num_kv_pairs}")
    if seq_len % 2:
        raise ValueError(f"seq_len: must be even (queries sit at even offsets), got {seq_len}")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(f"num_kv_pairs: 4 * kv must be <= seq_len, got kv={num_kv_pairs}, seq_len={seq_len}")
    if vocab_size <= seq_len:
        raise ValueError(f"vocab_size: must be > seq_len, got vocab_size={vocab_size}, seq_len={seq_len}")
    if vocab_size // 2 - 1 < num_kv_pairs:
        raise ValueError(f"vocab_size: {vocab_size} gives {vocab_size // 2 - 1} keys, fewer than kv={num_kv_pairs}")


def gap_probabilities(space: int, power_a: float) -> np.ndarray:
    """p(gap = i - 1) proportional to a * i^(a - 1), i = 1..space."""
    i = np.arange(1, space + 1, dtype=np.float64)
    p = power_a * i ** (power_a - 1)
    return p / p.sum()


def batch_rng(seed: int, step: int, process_index: int = 0) -> np.random.Generator:
    """The generator for one (seed, step, process) batch: independent streams, reproducible after a restart."""
    return np.random.default_rng([seed, step, process_index])


def _choose_without_replacement(rng, batch_size: int, population: int, count: int, log_p=None) -> np.ndarray:
    """`count` distinct indices in [0, population) per row, in a random order. Without log_p every subset and
    order is equally likely: the `count` smallest of i.i.d. uniform scores. With log_p, weighted successive
    sampling: the Gumbel top-k trick gives exactly the distribution of numpy's choice(replace=False, p=p)."""
    if log_p is None:
        # numpy's Gumbel draw is -log(-log(1 - u)) of the same uniform u that random() returns, decreasing in u, so
        # the `count` smallest uniforms are the `count` largest Gumbel scores: the same indices in the same order
        # as the Gumbel top-k this used to take (tests/test_mqar.py), at a sixth of the cost (no logarithms). At
        # vocabulary 8192 those two draws over 4095 keys per row were most of a batch's cost: 0.032 s per 256 rows
        # (length 64-256) with Gumbel scores, 0.013-0.015 s now, on a 2-core CPU (2026-12-03).
        return _smallest_in_order(rng.random(size=(batch_size, population)), count)
    scores = -(rng.gumbel(size=(batch_size, population)) + log_p)
    return _smallest_in_order(scores, count)


def _smallest_in_order(scores: np.ndarray, count: int) -> np.ndarray:
    """Each row's `count` smallest scores' indices in increasing order of score, as a stable full sort gives
    them, at a partition's cost (rows of 4096 keys; ties have probability zero)."""
    if count >= scores.shape[1]:
        return np.argsort(scores, axis=1, kind="stable")[:, :count]
    best = np.argpartition(scores, count - 1, axis=1)[:, :count]
    order = np.argsort(np.take_along_axis(scores, best, axis=1), axis=1, kind="stable")
    return np.take_along_axis(best, order, axis=1)


def mqar_batch(
    rng: np.random.Generator,
    *,
    batch_size: int,
    seq_len: int,
    num_kv_pairs: int,
    vocab_size: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> Batch:
    check_setting(num_kv_pairs, seq_len, vocab_size)
    context = 2 * num_kv_pairs
    key_vocab = vocab_size // 2
    keys = 1 + _choose_without_replacement(rng, batch_size, key_vocab - 1, num_kv_pairs)
    values = key_vocab + _choose_without_replacement(rng, batch_size, vocab_size - key_vocab, num_kv_pairs)

    space = (seq_len - context) // 2
    gaps = _choose_without_replacement(
        rng, batch_size, space, num_kv_pairs, log_p=np.log(gap_probabilities(space, power_a))
    )
    sequence = np.zeros((batch_size, seq_len + 1), np.int64)
    sequence[:, 0:context:2] = keys
    sequence[:, 1:context:2] = values
    query_at = context + 2 * gaps
    np.put_along_axis(sequence, query_at, keys, axis=1)
    labels = np.full((batch_size, seq_len + 1), -1, np.int64)
    np.put_along_axis(labels, query_at + 1, values, axis=1)

    inputs, targets = sequence[:, :-1], labels[:, 1:]
    if random_non_queries:
        filler = rng.integers(0, vocab_size, size=inputs.shape)
        is_filler = np.zeros(inputs.shape, bool)
        is_filler[:, context:] = True
        np.put_along_axis(is_filler, query_at, False, axis=1)
        inputs = np.where(is_filler, filler, inputs)
    loss_mask = targets >= 0
    return Batch(inputs.astype(np.int32), np.where(loss_mask, targets, 0).astype(np.int32), loss_mask)


def check_fork_setting(num_kv_pairs: int, seq_len: int, vocab_size: int) -> None:
    """The fork layout's constraints: the kv block and the packed queries (2 kv tokens each) fit in the sequence,
    and there are enough keys."""
    if num_kv_pairs < 1:
        raise ValueError(f"num_kv_pairs: must be >= 1, got {num_kv_pairs}")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(f"num_kv_pairs: 4 * kv must be <= seq_len (kv block and queries), got kv={num_kv_pairs}, "
                         f"seq_len={seq_len}")
    if vocab_size // 2 - 1 < num_kv_pairs:
        raise ValueError(f"vocab_size: {vocab_size} gives {vocab_size // 2 - 1} keys, fewer than kv={num_kv_pairs}")


def fork_mqar_batch(rng: np.random.Generator, *, batch_size: int, seq_len: int, num_kv_pairs: int,
                    vocab_size: int) -> Batch:
    """MQAR as the fork lays it out: positions [0, 2 kv) hold k1 v1 ... (keys from [1, V/2), values from [V/2, V),
    distinct within a row); positions from T - 2 kv hold the queries, every key once in a random order, at even
    offsets; every other position is a random token from [1, V). The loss counts at the queries only."""
    check_fork_setting(num_kv_pairs, seq_len, vocab_size)
    kv, key_vocab = num_kv_pairs, vocab_size // 2
    keys = 1 + _choose_without_replacement(rng, batch_size, key_vocab - 1, kv)
    values = key_vocab + _choose_without_replacement(rng, batch_size, vocab_size - key_vocab, kv)
    order = np.argsort(rng.random((batch_size, kv)), axis=1)  # the order in which the keys are asked

    inputs = rng.integers(1, vocab_size, size=(batch_size, seq_len))
    inputs[:, 0:2 * kv:2] = keys
    inputs[:, 1:2 * kv:2] = values
    query_at = seq_len - 2 * kv + 2 * np.arange(kv)
    inputs[:, query_at] = np.take_along_axis(keys, order, axis=1)
    targets = np.zeros((batch_size, seq_len), np.int64)
    targets[:, query_at] = np.take_along_axis(values, order, axis=1)  # the query's value: predicted at the query
    loss_mask = np.zeros((batch_size, seq_len), bool)
    loss_mask[:, query_at] = True
    return Batch(inputs.astype(np.int32), targets.astype(np.int32), loss_mask)
