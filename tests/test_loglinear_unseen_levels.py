"""experiments/loglinear_unseen_levels.py: log-linear MQAR accuracy by the Fenwick level of each query's key,
with the levels training never reached switched off."""

import importlib.util
import pathlib

import numpy as np

from ramjax.data.mqar import batch_rng, mqar_batch
from ramjax.train.trainer import train
from tiny import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("loglinear_unseen_levels",
                                               ROOT / "experiments" / "loglinear_unseen_levels.py")
unseen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(unseen)


def test_key_levels_on_a_constructed_example():
    # k1 v1 k2 v2 | filler, then k2 asked at position 6 (its value at 3: 6 xor 3 = 5, level 3) and k1 at 8
    # (value at 1: 8 xor 1 = 9, level 4).
    inputs = np.array([[5, 40, 7, 41, 3, 9, 7, 2, 5, 0]])
    mask = np.zeros_like(inputs, bool)
    mask[0, [6, 8]] = True
    levels = unseen.key_levels(inputs, mask, num_kv_pairs=2)
    assert levels[0, 6] == 3 and levels[0, 8] == 4
    assert np.all(levels[~mask] == -1)


def test_keys_within_the_trained_length_sit_at_trained_levels():
    batch = mqar_batch(batch_rng(0, 0), batch_size=32, seq_len=64, num_kv_pairs=8, vocab_size=256)
    levels = unseen.key_levels(batch.inputs, batch.loss_mask, 8)[batch.loss_mask]
    assert levels.min() >= 1 and levels.max() < unseen.num_levels(64)


def test_table_of_a_trained_run(tmp_path):
    """Trained on length <= 32 (levels 0-5): at length 32 no query's key is at an unseen level and switching the
    unseen levels off changes nothing; at 48 some are; one lambda row per log-linear layer."""
    config = tiny_config("loglinear_mamba2", steps=2)
    train(config, str(tmp_path / "run"))
    table = unseen.unseen_level_table(str(tmp_path / "run"), "4:32,4:48", examples=24, batch_size=8)
    assert table["trained_length"] == 32 and table["first_unseen_level"] == 6
    at_32, at_48 = table["rows"]
    assert at_32["share_unseen"] == 0 and at_32["trained"][2] == at_32["off"][2] == at_32["copied"][2]
    assert np.isnan(at_32["trained"][1])
    assert 0 < at_48["share_unseen"] < 1
    assert len(table["lambda_per_layer"]) == config.model.num_layers
    assert table["lambda_per_layer"][0].shape == (config.model.loglinear.num_levels,)
    assert "| 4:48 |" in unseen.markdown(table)


def test_the_patch_switches_off_or_copies_the_unseen_levels_and_is_undone():
    import jax
    from flax import nnx

    from ramjax.layers.fenwick_decay import FenwickDecay

    decay = FenwickDecay(8, 2, 5, "linear", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 8))
    plain = np.asarray(decay(x))
    record = []
    with unseen.level_weights_patched(3, "off", record=record):
        off = np.asarray(decay(x))
    jax.effects_barrier()
    with unseen.level_weights_patched(3, "copy"):
        copied = np.asarray(decay(x))
    np.testing.assert_array_equal(off[..., :3], plain[..., :3])
    assert not off[..., 3:].any()
    np.testing.assert_array_equal(copied[..., 3:], np.repeat(plain[..., 2:3], 2, axis=-1))
    np.testing.assert_allclose(record[0], off.mean(axis=(0, 1)), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(decay(x)), plain)  # the class is as it was
