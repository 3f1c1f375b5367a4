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
"""

from __future__ import annotations

import numpy as np

from ramjax.data.mqar import Batch, batch_rng

__all__ = ["FIRST_DATA_TOKEN", "MARKER", "NOISE", "Batch", "batch_rng", "check_setting", "selective_copy_batch"]

NOISE = 0  # fills the context between the data tokens
MARKER = 1  # asks for the next data token
FIRST_DATA_TOKEN = 2


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
