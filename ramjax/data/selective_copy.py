"""Selective copying (Mamba, arXiv 2312.00752, section 4.1.1): copy the data tokens out of noise, in order.

Unlike plain copying, the data tokens sit at random positions in the context, so a time-invariant model cannot
find them by their offsets alone: it must select by content, which is what this task measures.

One example of length T with N tokens to copy, vocabulary V:
- a context of T - N positions: N data tokens drawn uniformly, with replacement, from [2, V), at N distinct
  random positions (in increasing order); every other context position is the noise token 0;
- then N copies of the marker token 1; at the i-th marker the model must emit the i-th data token of the context,
  and those are the only places the loss and accuracy count.
Inputs and targets are built as for MQAR (ramjax.data.mqar): a sequence one longer than T, inputs its first T
positions and targets the labels shifted by one, so both tasks give Batches of the same shapes [batch, T]. As in
MQAR, the answers are targets only: they never appear in the inputs.

Batches are a pure function of (seed, step, process index), through `batch_rng`, so a restarted run sees the
same data.

`fork_selective_copy_batch` is the adaptive-decay fork's variant (`data.layout = "fork"`, docs/loglinear.md
section 6): N distinct data tokens from [3, 66) among random noise tokens from [67, V) in the first T - N - 1
positions, a separator (1), then N blanks (2); the separator and the first N - 1 blanks predict the data tokens in
order.
"""

from __future__ import annotations

import numpy as np

from ramjax.data.mqar import Batch, batch_rng

__all__ = ["FIRST_DATA_TOKEN", "FORK_BLANK", "FORK_DATA_TOKENS", "FORK_FIRST_NOISE", "FORK_SEPARATOR", "MARKER",
           "NOISE", "Batch", "batch_rng", "check_fork_setting", "check_setting", "fork_selective_copy_batch",
           "selective_copy_batch"]

NOISE = 0  # fills the context between the data tokens
MARKER = 1  # asks for the next data token
FIRST_DATA_TOKEN = 2

# The fork's vocabulary: separator, blank, 63 data tokens [3, 66), noise tokens from 67 to the vocabulary's end.
FORK_SEPARATOR = 1
FORK_BLANK = 2
FORK_DATA_TOKENS = (3, 66)
FORK_FIRST_NOISE = 67


def check_setting(num_tokens: int, seq_len: int, vocab_size: int) -> None:
    """The task's constraints, as errors that name the value and the rule."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens: must be >= 1, got {num_tokens}")
    if seq_len < 2 * num_tokens:
        raise ValueError(
            f"seq_len: must be >= 2 * num_tokens (a context of seq_len - num_tokens positions holds the "
            f"num_tokens data tokens, then num_tokens markers), got seq_len={seq_len}, num_tokens={num_tokens}"
        )
    if vocab_size < FIRST_DATA_TOKEN + 1:
        raise ValueError(
            f"vocab_size: must be >= 3 (noise {NOISE}, marker {MARKER}, data tokens from {FIRST_DATA_TOKEN}), "
            f"got {vocab_size}"
        )


def selective_copy_batch(
    rng: np.random.Generator,
    *,
    batch_size: int,
    seq_len: int,
    num_tokens: int,
    vocab_size: int,
) -> Batch:
    check_setting(num_tokens, seq_len, vocab_size)
    context = seq_len - num_tokens
    tokens = rng.integers(FIRST_DATA_TOKEN, vocab_size, size=(batch_size, num_tokens))
    # Distinct positions: the first num_tokens of a random permutation of the context, per row, sorted.
    positions = np.sort(np.argsort(rng.random((batch_size, context)), axis=1)[:, :num_tokens], axis=1)

    sequence = np.full((batch_size, seq_len + 1), NOISE, np.int64)
    np.put_along_axis(sequence, positions, tokens, axis=1)
    sequence[:, context:seq_len] = MARKER
    labels = np.full((batch_size, seq_len + 1), -1, np.int64)
    labels[:, context + 1 : seq_len + 1] = tokens  # the label after the i-th marker: shifted, the marker's target

    inputs, targets = sequence[:, :-1], labels[:, 1:]
    loss_mask = targets >= 0
    return Batch(inputs.astype(np.int32), np.where(loss_mask, targets, 0).astype(np.int32), loss_mask)


def check_fork_setting(num_tokens: int, seq_len: int, vocab_size: int) -> None:
    """The fork layout's constraints, as errors that name the value and the rule."""
    data_count = FORK_DATA_TOKENS[1] - FORK_DATA_TOKENS[0]
    if not 1 <= num_tokens <= data_count:
        raise ValueError(f"num_tokens: must be in [1, {data_count}] (distinct data tokens), got {num_tokens}")
    if seq_len < 2 * num_tokens + 1:
        raise ValueError(f"seq_len: must be >= 2 * num_tokens + 1 (the input phase, a separator, the blanks), got "
                         f"seq_len={seq_len}, num_tokens={num_tokens}")
    if vocab_size <= FORK_FIRST_NOISE:
        raise ValueError(f"vocab_size: must be > {FORK_FIRST_NOISE} (noise tokens from {FORK_FIRST_NOISE}), got "
                         f"{vocab_size}")


def fork_selective_copy_batch(rng: np.random.Generator, *, batch_size: int, seq_len: int, num_tokens: int,
                              vocab_size: int) -> Batch:
    check_fork_setting(num_tokens, seq_len, vocab_size)
    input_len = seq_len - num_tokens - 1
    data_count = FORK_DATA_TOKENS[1] - FORK_DATA_TOKENS[0]
    tokens = FORK_DATA_TOKENS[0] + np.argsort(rng.random((batch_size, data_count)), axis=1)[:, :num_tokens]
    positions = np.sort(np.argsort(rng.random((batch_size, input_len)), axis=1)[:, :num_tokens], axis=1)

    inputs = np.full((batch_size, seq_len), FORK_BLANK, np.int64)
    inputs[:, :input_len] = rng.integers(FORK_FIRST_NOISE, vocab_size, size=(batch_size, input_len))
    np.put_along_axis(inputs, positions, tokens, axis=1)
    inputs[:, input_len] = FORK_SEPARATOR
    targets = np.zeros((batch_size, seq_len), np.int64)
    targets[:, input_len:seq_len - 1] = tokens  # the separator and each blank but the last predict the next token
    loss_mask = np.zeros((batch_size, seq_len), bool)
    loss_mask[:, input_len:seq_len - 1] = True
    return Batch(inputs.astype(np.int32), targets.astype(np.int32), loss_mask)
