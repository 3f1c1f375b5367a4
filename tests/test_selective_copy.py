"""The selective-copying generator: the layout the task promises, its targets and mask, and determinism."""

import numpy as np
import pytest

from ramjax.data.mqar import mqar_batch
from ramjax.data.selective_copy import MARKER, NOISE, batch_rng, selective_copy_batch

SETTING = {"batch_size": 128, "seq_len": 96, "num_tokens": 16, "vocab_size": 20}


def test_shapes_and_dtypes_match_mqar():
    batch = selective_copy_batch(batch_rng(0, 0), **SETTING)
    assert batch.inputs.shape == batch.targets.shape == batch.loss_mask.shape == (128, 96)
    assert batch.inputs.dtype == batch.targets.dtype == np.int32 and batch.loss_mask.dtype == bool
    mqar = mqar_batch(batch_rng(0, 0), batch_size=128, seq_len=96, num_kv_pairs=16, vocab_size=8192)
    assert [(a.shape, a.dtype) for a in batch] == [(a.shape, a.dtype) for a in mqar]


def test_layout_targets_and_mask():
    batch = selective_copy_batch(batch_rng(1, 0), **SETTING)
    n, context = 16, 96 - 16
    ctx = batch.inputs[:, :context]
    # Context: exactly n data tokens from [2, V) (noise 0 elsewhere, no markers); then n markers.
    assert np.all((ctx == NOISE) | (ctx >= 2)) and ctx.max() < 20
    assert np.all((ctx >= 2).sum(axis=1) == n)
    assert np.all(batch.inputs[:, context:] == MARKER)
    # The loss counts exactly at the markers, where the targets are the data tokens in context order.
    assert np.all(batch.loss_mask.sum(axis=1) == n)
    assert not batch.loss_mask[:, :context].any() and batch.loss_mask[:, context:].all()
    for row in range(128):
        data = ctx[row][ctx[row] != NOISE]
        np.testing.assert_array_equal(batch.targets[row][batch.loss_mask[row]], data)
    # Targets outside the mask are the filler 0, as in MQAR (the answers never appear in the inputs: markers do).
    assert np.all(batch.targets[~batch.loss_mask] == 0)


def test_data_tokens_and_positions_are_spread():
    batch = selective_copy_batch(batch_rng(2, 0), batch_size=2000, seq_len=24, num_tokens=4, vocab_size=6)
    data = batch.targets[batch.loss_mask]
    counts = np.bincount(data, minlength=6)[2:]
    assert counts.min() > 0.9 * counts.mean(), "uniform over [2, V), drawn with replacement"
    assert any(len(set(row)) < 4 for row in batch.targets[:, -4:]), "repeats happen (with replacement)"
    occupied = (batch.inputs[:, :20] != NOISE).mean(axis=0)
    np.testing.assert_allclose(occupied, 4 / 20, atol=0.04)


def test_tight_setting_fills_the_context():
    batch = selective_copy_batch(batch_rng(0, 0), batch_size=8, seq_len=10, num_tokens=5, vocab_size=3)
    assert np.all(batch.inputs[:, :5] == 2) and np.all(batch.targets[batch.loss_mask] == 2)


def test_deterministic_per_seed_step_and_process():
    a = selective_copy_batch(batch_rng(3, 17, 0), **SETTING)
    b = selective_copy_batch(batch_rng(3, 17, 0), **SETTING)
    c = selective_copy_batch(batch_rng(3, 18, 0), **SETTING)
    d = selective_copy_batch(batch_rng(3, 17, 1), **SETTING)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.inputs, c.inputs) and not np.array_equal(a.targets, c.targets)
    assert not np.array_equal(a.inputs, d.inputs)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"seq_len": 64, "num_tokens": 0, "vocab_size": 10}, "num_tokens: must be >= 1"),
        ({"seq_len": 31, "num_tokens": 16, "vocab_size": 10}, "seq_len: must be >= 2 \\* num_tokens"),
        ({"seq_len": 64, "num_tokens": 4, "vocab_size": 2}, "vocab_size: must be >= 3"),
    ],
)
def test_rejects_bad_settings(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        selective_copy_batch(batch_rng(0, 0), batch_size=1, **kwargs)
