"""The trainer's task interface: settings strings, the "pad" and "cycle" mixtures, determinism by (seed, step),
fixed evaluation batches, and errors that name the config field."""

import numpy as np
import pytest
from tiny import tiny_config

from ramjax.data import mqar, selective_copy
from ramjax.data.mqar import batch_rng
from ramjax.data.tasks import SyntheticTask, parse_settings


def data_config(**overrides):
    d = tiny_config().data
    for name, value in overrides.items():
        d[name] = value
    return d


def test_parse_settings():
    assert parse_settings("data.train_settings", "4:64") == [(4, 64)]
    assert parse_settings("data.train_settings", " 4:64, 8:128 ,16:256") == [(4, 64), (8, 128), (16, 256)]


@pytest.mark.parametrize("text", ["", "4", "4-64", "4:64:2", "a:64", "4:64,", "-4:64", "4.5:64", "4:64;8:64"])
@pytest.mark.parametrize("field", ["data.train_settings", "data.eval_settings"])
def test_parse_settings_rejects_bad_strings(field, text):
    with pytest.raises(ValueError, match=field) as error:
        parse_settings(field, text)
    assert repr(text) in str(error.value)


def test_pad_mixture_holds_every_setting_padded_to_the_longest():
    d = data_config(train_settings="2:16,4:32,3:24", mixture="pad", batch_size=8, seed=5)
    task = SyntheticTask("mqar", d)
    batch = task.train_batch(7)
    assert task.max_train_len == 32
    for field in batch:
        assert field.shape == (8, 32)
    # Rows per setting: batch_size // 3 each, the remainder to the first settings: 3, 3, 2 rows, in order.
    rng = batch_rng(5, 7)
    row = 0
    for (kv, seq_len), rows in zip([(2, 16), (4, 32), (3, 24)], [3, 3, 2]):
        # The reference: the same generator, drawn setting by setting.
        part = mqar.mqar_batch(rng, batch_size=rows, seq_len=seq_len, num_kv_pairs=kv, vocab_size=d.vocab_size,
                               power_a=d.power_a)
        chunk = slice(row, row + rows)
        np.testing.assert_array_equal(batch.inputs[chunk, :seq_len], part.inputs)
        np.testing.assert_array_equal(batch.targets[chunk, :seq_len], part.targets)
        np.testing.assert_array_equal(batch.loss_mask[chunk, :seq_len], part.loss_mask)
        assert np.all(batch.inputs[chunk, seq_len:] == 0) and np.all(batch.targets[chunk, seq_len:] == 0)
        assert not batch.loss_mask[chunk, seq_len:].any()
        assert np.all(batch.loss_mask[chunk].sum(axis=1) == kv)
        row += rows
    assert row == 8


def test_pad_mixture_needs_a_row_per_setting():
    with pytest.raises(ValueError, match="data.batch_size"):
        SyntheticTask("mqar", data_config(train_settings="2:16,4:32,3:24", mixture="pad", batch_size=2))


def test_cycle_mixture_rotates_the_setting_with_the_step():
    settings = [(2, 16), (4, 32), (3, 24)]
    task = SyntheticTask("mqar", data_config(train_settings="2:16,4:32,3:24", mixture="cycle", batch_size=8))
    for step in range(7):
        kv, seq_len = settings[step % 3]
        batch = task.train_batch(step)
        assert batch.inputs.shape == batch.loss_mask.shape == (8, seq_len)
        assert np.all(batch.loss_mask.sum(axis=1) == kv)


@pytest.mark.parametrize("mixture", ["pad", "cycle"])
def test_train_batches_are_a_function_of_seed_and_step(mixture):
    def batch(seed, step):
        return SyntheticTask("mqar", data_config(mixture=mixture, seed=seed)).train_batch(step)

    a, again, other_step, other_seed = batch(0, 3), batch(0, 3), batch(0, 5), batch(1, 3)
    for x, y in zip(a, again):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.inputs, other_step.inputs)
    assert not np.array_equal(a.inputs, other_seed.inputs)
    assert not np.array_equal(batch(0, 0).inputs, batch(0, 2 if mixture == "cycle" else 1).inputs)


def test_eval_batches_are_fixed_and_full_size():
    d = data_config(eval_settings="2:16,4:32", eval_examples=20, eval_batch_size=8)
    task = SyntheticTask("mqar", d)
    assert [s.name for s in task.eval_slices] == ["kv2_len16", "kv4_len32"]
    first = {s.name: list(task.eval_batches(s)) for s in task.eval_slices}
    for eval_slice in task.eval_slices:
        batches = first[eval_slice.name]
        assert len(batches) == 3  # 20 examples in whole batches of 8, the last padded with 4 uncounted rows
        for i, batch in enumerate(batches):
            assert batch.inputs.shape == (8, eval_slice.seq_len)
            counted = batch.loss_mask.sum(axis=1)
            real = 4 if i == 2 else 8
            assert np.all(counted[:real] == eval_slice.count) and np.all(counted[real:] == 0)
        assert not np.array_equal(batches[0].inputs, batches[1].inputs)
        # The same batches on every call, and in a task with another training seed.
        for again in (task.eval_batches(eval_slice),
                      SyntheticTask("mqar", data_config(eval_settings="2:16,4:32", eval_examples=20,
                                                        eval_batch_size=8, seed=9)).eval_batches(eval_slice)):
            for x, y in zip(batches, again, strict=True):
                np.testing.assert_array_equal(x.inputs, y.inputs)
                np.testing.assert_array_equal(x.targets, y.targets)


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(train_settings="2:16,9:32"), "data.train_settings"),  # 4 * 9 > 32
        (dict(eval_settings="2:16,9:32"), "data.eval_settings"),
        (dict(train_settings="0:16"), "data.train_settings"),
        (dict(train_settings="2:15"), "data.train_settings"),  # odd length
        (dict(train_settings="2:64"), "data.train_settings"),  # vocab 64 must exceed the length
        (dict(mixture="shuffle"), "data.mixture"),
    ],
)
def test_invalid_settings_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        SyntheticTask("mqar", data_config(**overrides))


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="task"):
        SyntheticTask("copying", data_config())


@pytest.mark.parametrize("mixture", ["pad", "cycle"])
def test_selective_copy_through_the_same_interface(mixture):
    d = data_config(train_settings="4:16,8:32", eval_settings="4:16", mixture=mixture, eval_examples=8,
                    eval_batch_size=8)
    task = SyntheticTask("selective_copy", d)
    assert [s.name for s in task.eval_slices] == ["tokens4_len16"]
    batch = task.train_batch(1)
    counts = batch.loss_mask.sum(axis=1)
    if mixture == "pad":
        assert batch.inputs.shape == (8, 32)
        assert list(counts) == [4] * 4 + [8] * 4
        assert not batch.loss_mask[:4, 16:].any()
    else:
        assert batch.inputs.shape == (8, 32) and np.all(counts == 8)  # step 1: the second setting
    # Markers ask for the data tokens: the inputs at the loss positions are the marker.
    assert np.all(batch.inputs[batch.loss_mask] == selective_copy.MARKER)
    (eval_batch,) = task.eval_batches(task.eval_slices[0])
    assert eval_batch.inputs.shape == (8, 16) and np.all(eval_batch.loss_mask.sum(axis=1) == 4)
    with pytest.raises(ValueError, match="data.train_settings"):
        SyntheticTask("selective_copy", data_config(train_settings="9:16"))  # 2 * 9 > 16


def test_eval_examples_do_not_depend_on_the_eval_batch_size():
    """The same examples (and the same counted rows) whatever eval_batch_size is, so evaluation does not change
    with the device count that batch size is rounded to."""
    from ramjax.configs import load_config
    from ramjax.data.tasks import SyntheticTask

    kept = []
    for size in (250, 96, 7):
        config = load_config("configs/mqar.py:cpu")
        config.data.eval_examples, config.data.eval_batch_size = 100, size
        task = SyntheticTask("mqar", config.data)
        batches = list(task.eval_batches(task.eval_slices[1]))
        assert all(b.inputs.shape[0] == size for b in batches)
        rows = np.concatenate([b.inputs[b.loss_mask.any(axis=1)] for b in batches])
        kept.append(rows)
    assert kept[0].shape[0] == 100
    assert all(np.array_equal(kept[0], other) for other in kept[1:])


def test_eval_batch_size_is_rounded_up_to_the_batch_shards(capsys):
    from ramjax.configs import load_config
    from ramjax.train.setup import check_train_config

    config = load_config("configs/mqar.py")
    config.data.eval_batch_size = 250
    check_train_config(config, None, 8)
    assert config.data.eval_batch_size == 256
    assert "data.eval_batch_size 250 -> 256" in capsys.readouterr().out


def test_batches_made_ahead_are_the_batches_of_their_steps():
    from ramjax.data.tasks import BatchesAhead

    task = SyntheticTask("mqar", tiny_config().data)
    for threads in (0, 1, 3):
        ahead = BatchesAhead(task.train_batch, num_steps=12, threads=threads)
        for step in [0, 1, 2, 7, 8, 3, 11]:  # in order, a jump forward, one back (the loop never asks so)
            got, want = ahead.get(step), task.train_batch(step)
            assert all(np.array_equal(a, b) for a, b in zip(got, want))
        assert all(s < 12 for s in ahead.pending)  # nothing made past the last step
        ahead.close()


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_prefetch_threads_must_be_a_count(value):
    from ramjax.data.tasks import prefetch_threads

    with pytest.raises(ValueError, match="data.prefetch_threads"):
        prefetch_threads({"prefetch_threads": value})
