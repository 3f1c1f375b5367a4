"""How well RAM-Net's read addresses find what was written, on recall tasks (MQAR): the barrier to learning.

A query at position t asks for the value of a key seen earlier in the context (key at p, value at p + 1). The
value is written at p + 1 (the write address there sees the key through the short conv or CAPE), so the query
can only retrieve it if the K slots it reads at t meet the K slots written at p + 1. Per RAM-Net layer:

  addressing/layer{i}/read_write_overlap  the share of (query, head) pairs whose read slots meet the write slots
                                          of the value they must retrieve (at initialisation about K^2 / M);
  addressing/layer{i}/read_mass           the mean top-K probability mass kept by the reads at the queries;
  addressing/layer{i}/write_mass          the same for the writes at the value positions.

Queries are the loss positions; their key is the input token there, and the value position is one after the
key's first occurrence. Queries whose key does not occur earlier (none in MQAR) are skipped.
"""

from __future__ import annotations

import numpy as np


def retrieval_positions(inputs: np.ndarray, loss_mask: np.ndarray):
    """(rows, query positions, value positions) of every query whose key occurs before it, as int arrays."""
    inputs, loss_mask = np.asarray(inputs), np.asarray(loss_mask, bool)
    rows, queries = np.nonzero(loss_mask)
    keys = inputs[rows, queries]
    seq_len = inputs.shape[1]
    earlier = (inputs[rows] == keys[:, None]) & (np.arange(seq_len)[None, :] < queries[:, None])
    found = earlier.any(axis=1)
    first = np.argmax(earlier, axis=1)  # the first earlier occurrence: the key's place in the context
    values = first + 1
    keep = found & (values < seq_len)
    return rows[keep], queries[keep], values[keep]


def read_write_overlap(read_idx, write_idx, rows, queries, values) -> float:
    """The share of (query, head) pairs whose read slots at the query meet the write slots at the value position.
    read_idx, write_idx: `[batch, time, heads, K]`."""
    read = np.asarray(read_idx)[rows, queries]  # [queries, heads, K]
    written = np.asarray(write_idx)[rows, values]
    meets = (read[..., :, None] == written[..., None, :]).any(axis=(-2, -1))
    return float(meets.mean()) if meets.size else float("nan")


def address_metrics(layer_codes, inputs, loss_mask) -> dict:
    """The metrics of the module docstring from `LanguageModel.ramnet_addresses` output and the batch."""
    rows, queries, values = retrieval_positions(inputs, loss_mask)
    metrics = {}
    for layer, ((read_idx, read_val), (write_idx, write_val)) in enumerate(layer_codes):
        prefix = f"addressing/layer{layer}"
        metrics[f"{prefix}/read_write_overlap"] = read_write_overlap(read_idx, write_idx, rows, queries, values)
        if rows.size:
            metrics[f"{prefix}/read_mass"] = float(np.asarray(read_val)[rows, queries].sum(-1).mean())
            metrics[f"{prefix}/write_mass"] = float(np.asarray(write_val)[rows, values].sum(-1).mean())
    return metrics
