"""experiments/mqar_gap_accuracy.py: MQAR accuracy by the distance between a query and its key."""

import importlib.util
import pathlib

import numpy as np

from ramjax.data.mqar import batch_rng, mqar_batch
from ramjax.train.trainer import train
from tiny import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mqar_gap_accuracy", ROOT / "experiments" / "mqar_gap_accuracy.py")
gap = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gap)


def test_distances_on_a_constructed_example():
    # k1 v1 k2 v2 | filler, then k2 asked at position 6 and k1 at position 10 (the loss counts at the queries).
    inputs = np.array([[5, 40, 7, 41, 3, 9, 7, 2, 1, 8, 5, 0]])
    mask = np.zeros_like(inputs, bool)
    mask[0, [6, 10]] = True
    distance = gap.query_distances(inputs, mask, num_kv_pairs=2)
    assert distance[0, 6] == 6 - 2 and distance[0, 10] == 10 - 0
    assert not distance[~mask].any()


def test_distances_of_generated_batches_are_even_and_inside_the_sequence():
    batch = mqar_batch(batch_rng(0, 0), batch_size=64, seq_len=64, num_kv_pairs=8, vocab_size=256)
    distance = gap.query_distances(batch.inputs, batch.loss_mask, 8)[batch.loss_mask]
    assert np.all(distance % 2 == 0) and distance.min() >= 2 and distance.max() < 64


def test_table_of_a_trained_multi_seed_run(tmp_path):
    """Bins that cover every query: shares sum to 1 and the share-weighted accuracies to the overall one."""
    config = tiny_config("ramnet", steps=2)
    config.train.num_seeds = 2
    train(config, str(tmp_path / "run"))
    table = gap.gap_table(str(tmp_path / "run"), "4:32", 40, [1, 8, 16, 32])
    assert table["seeds"] == 2
    shares = [share for _, _, share, _ in table["rows"]]
    assert abs(sum(shares) - 1) < 1e-9
    weighted = sum(share * acc for _, _, share, acc in table["rows"] if share)
    assert abs(weighted - table["accuracy"]) < 1e-6
    by_residue = gap.gap_table(str(tmp_path / "run"), "4:32", 40, list(range(5)), modulo=4)
    assert by_residue["accuracy"] == table["accuracy"]
    assert [share for _, _, share, _ in by_residue["rows"]][1::2] == [0, 0]  # distances are even
