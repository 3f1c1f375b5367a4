"""RAM-Net's read/write overlap metrics: a constructed case with a known answer, the model's per-layer codes, and
the metrics in a training run's log."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ramjax.models import LanguageModel
from ramjax.train.address_metrics import address_metrics, retrieval_positions
from ramjax.train.trainer import train
from tiny import tiny_config


def test_constructed_case_has_the_known_overlap_and_mass():
    # One row: k1=5 v1=40 k2=6 v2=41, then the queries 6 (value at position 4) and 5 (value at position 2).
    inputs = np.array([[5, 40, 6, 41, 9, 6, 3, 5]])
    loss_mask = np.zeros_like(inputs, bool)
    loss_mask[0, [5, 7]] = True
    rows, queries, values = retrieval_positions(inputs, loss_mask)
    np.testing.assert_array_equal(queries, [5, 7])
    np.testing.assert_array_equal(values, [3, 1])

    batch, time, heads, k = 1, 8, 2, 2
    read_idx = np.full((batch, time, heads, k), 99)
    write_idx = np.full((batch, time, heads, k), 50)
    read_val = np.full((batch, time, heads, k), 0.25)
    write_val = np.full((batch, time, heads, k), 0.5)
    write_idx[0, 3] = [[1, 2], [3, 4]]  # the value of query 5 was written to slots {1, 2} (head 0), {3, 4} (head 1)
    read_idx[0, 5] = [[2, 7], [8, 9]]  # head 0 meets, head 1 does not
    write_idx[0, 1] = [[10, 11], [12, 13]]
    read_idx[0, 7] = [[11, 0], [13, 12]]  # both heads meet
    codes = [((read_idx, read_val), (write_idx, write_val))]
    metrics = address_metrics(codes, inputs, loss_mask)
    assert metrics["addressing/layer0/read_write_overlap"] == 0.75  # 3 of 4 (query, head) pairs
    assert metrics["addressing/layer0/read_mass"] == 0.5 and metrics["addressing/layer0/write_mass"] == 1.0


def test_model_returns_every_ramnet_layers_codes_scanned_or_not():
    config = tiny_config("ramnet", num_layers=2)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
    num_slots = config.model.ramnet.factor_size ** config.model.ramnet.num_factors
    for scan in (True, False):
        config.model.scan_layers = scan
        model = LanguageModel(config.model, rngs=nnx.Rngs(0))
        codes = model.ramnet_addresses(tokens)
        assert len(codes) == 2
        for (read_idx, read_val), (write_idx, write_val) in codes:
            assert read_idx.shape == write_val.shape == (2, 16, 2, config.model.ramnet.top_k)
            assert 0 <= int(read_idx.min()) and int(write_idx.max()) < num_slots
        assert not np.array_equal(np.asarray(codes[0][1][1]), np.asarray(codes[1][1][1])), "layers differ"
    # Unscanned, each layer's codes are what its mixer computes from that layer's input.
    x = model.embed(tokens)
    for layer, group in enumerate(model.groups):
        block = group.blocks[0]
        (read_idx, read_val), (write_idx, write_val) = block.mixer.addresses(block.mixer_norm(x), positions)
        np.testing.assert_array_equal(np.asarray(read_idx), np.asarray(codes[layer][0][0]))
        np.testing.assert_allclose(np.asarray(write_val), np.asarray(codes[layer][1][1]), rtol=1e-6)
        x = block(x, positions)
    # A model without RAM-Net layers has none.
    config.model.pattern = "attention"
    assert LanguageModel(config.model, rngs=nnx.Rngs(0)).ramnet_addresses(tokens) == []


# slow: ~20 s on 2 cores (two training runs); the metrics themselves and the model's codes are the fast tests above.
@pytest.mark.slow
def test_training_logs_the_overlap_with_each_evaluation(tmp_path):
    config = tiny_config("ramnet", steps=2)
    train(config, str(tmp_path))
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    logged = [line for line in lines if "addressing/layer0/read_write_overlap" in line]
    assert logged and logged[-1]["step"] == 2
    for layer in range(config.model.num_layers):
        assert 0.0 <= logged[-1][f"addressing/layer{layer}/read_write_overlap"] <= 1.0
        assert 0.0 < logged[-1][f"addressing/layer{layer}/read_mass"] <= 1.0 + 1e-6
    config.train.address_metrics = False
    train(config, str(tmp_path / "off"))
    assert not any("addressing" in k for line in open(tmp_path / "off" / "metrics.jsonl") for k in json.loads(line))
    jax.clear_caches()
