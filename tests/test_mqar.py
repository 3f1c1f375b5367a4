"""The MQAR generator: Zoology's layout and statistics, and determinism."""

import numpy as np
import pytest

from ramjax.data.mqar import EVAL_SUITE, batch_rng, gap_probabilities, mqar_batch

SETTING = dict(batch_size=256, seq_len=128, num_kv_pairs=16, vocab_size=8192)


def test_layout_ranges_and_distinctness():
    batch = mqar_batch(batch_rng(0, 0), **SETTING)
    kv, vocab = 16, 8192
    assert batch.inputs.shape == batch.targets.shape == batch.loss_mask.shape == (256, 128)
    keys, values = batch.inputs[:, 0 : 2 * kv : 2], batch.inputs[:, 1 : 2 * kv : 2]
    assert keys.min() >= 1 and keys.max() < vocab // 2
    assert values.min() >= vocab // 2 and values.max() < vocab
    assert all(len(set(row)) == kv for row in keys) and all(len(set(row)) == kv for row in values)
    # Exactly one query per key, after the context, at an even offset; the target there is the key's value.
    assert np.all(batch.loss_mask.sum(axis=1) == kv)
    assert not batch.loss_mask[:, : 2 * kv].any()
    for row in range(256):
        positions = np.nonzero(batch.loss_mask[row])[0]
        assert np.all((positions - 2 * kv) % 2 == 0)
        pairs = dict(zip(keys[row], values[row]))
        assert sorted(batch.inputs[row, positions]) == sorted(pairs)
        for p in positions:
            assert batch.targets[row, p] == pairs[batch.inputs[row, p]]


def test_deterministic_per_seed_step_and_process():
    a = mqar_batch(batch_rng(3, 17, 0), **SETTING)
    b = mqar_batch(batch_rng(3, 17, 0), **SETTING)
    c = mqar_batch(batch_rng(3, 18, 0), **SETTING)
    d = mqar_batch(batch_rng(3, 17, 1), **SETTING)
    np.testing.assert_array_equal(a.inputs, b.inputs)
    assert not np.array_equal(a.inputs, c.inputs) and not np.array_equal(a.inputs, d.inputs)


def test_gap_distribution_follows_the_power_law():
    # With one pair, the gap of the single query is drawn from p exactly.
    space = (64 - 2) // 2
    batch = mqar_batch(batch_rng(1, 0), batch_size=20000, seq_len=64, num_kv_pairs=1, vocab_size=128)
    gaps = (np.nonzero(batch.loss_mask)[1] - 2) // 2
    empirical = np.bincount(gaps, minlength=space) / len(gaps)
    p = gap_probabilities(space, 0.01)
    assert 0.5 * np.abs(empirical - p).sum() < 0.03, "total variation distance"
    # p(i) ~ i^(a - 1): decreasing, with p(1) / p(space) = space^(1 - a).
    assert np.all(np.diff(p) < 0)
    np.testing.assert_allclose(p[0] / p[-1], space ** (1 - 0.01), rtol=1e-9)


def test_eval_suite_settings_are_valid():
    for kv, seq_len in EVAL_SUITE:
        batch = mqar_batch(batch_rng(0, 0), batch_size=2, seq_len=seq_len, num_kv_pairs=kv, vocab_size=8192)
        assert batch.loss_mask.sum() == 2 * kv


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(seq_len=64, num_kv_pairs=17, vocab_size=8192), "4 \\* kv must be <= seq_len"),
        (dict(seq_len=64, num_kv_pairs=4, vocab_size=64), "vocab_size: must be > seq_len"),
        (dict(seq_len=63, num_kv_pairs=4, vocab_size=8192), "seq_len: must be even"),
    ],
)
def test_rejects_bad_settings(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        mqar_batch(batch_rng(0, 0), batch_size=1, **kwargs)


def test_partitioned_choice_equals_the_full_sort_of_gumbel_scores():
    """The first `count` of a stable descending argsort of the Gumbel scores (plus log p) of the same generator,
    row by row and in order: the sampler partitions instead of sorting whole rows, and without weights it ranks
    the uniforms those Gumbel scores are made from (smallest first), so batches are what they were when it drew
    Gumbel scores for keys and values too."""
    from ramjax.data.mqar import _choose_without_replacement

    for population, count, weighted in ((4095, 37, False), (4095, 256, False), (101, 100, True), (7, 7, False),
                                        (50, 1, True)):
        log_p = np.log(gap_probabilities(population, 0.01)) if weighted else None
        got = _choose_without_replacement(np.random.default_rng(3), 9, population, count, log_p)
        scores = np.random.default_rng(3).gumbel(size=(9, population)) + (0 if log_p is None else log_p)
        assert np.array_equal(got, np.argsort(-scores, axis=1, kind="stable")[:, :count])


def test_uniform_choice_is_uniform_over_indices_and_positions():
    """Without weights every index is equally likely in every position of the chosen list (what Zoology's
    np.random.choice(replace=False) gives): counts over 20000 rows within 5 standard deviations."""
    from ramjax.data.mqar import _choose_without_replacement

    rows, population, count = 20000, 13, 5
    got = _choose_without_replacement(np.random.default_rng(0), rows, population, count)
    assert all(len(set(row)) == count for row in got[:200])
    expected = rows / population
    for position in range(count):
        counts = np.bincount(got[:, position], minlength=population)
        assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected)), (position, counts)
