"""Recurrent state sizes by mixer, as the figures' x-axis counts them."""

from tiny import MQAR

from ramjax.models.state_size import recurrent_state_size


def test_state_sizes_of_the_default_models():
    cfg = MQAR.model_config()  # d_model 128, 4 heads, 2 layers
    cfg.pattern = "ramnet"
    assert recurrent_state_size(cfg, 1024) == 2 * 4 * 4**5 * 65
    cfg.pattern = "attention"
    assert recurrent_state_size(cfg, 1024) == 2 * 2 * 1024 * 128
    cfg.pattern = "gated_deltanet"
    assert recurrent_state_size(cfg, 1024) == 2 * 4 * 32 * 64
    cfg.pattern = "mamba2"
    assert recurrent_state_size(cfg, 1024) == 2 * 4 * 64 * 64
    cfg.pattern = "gla"
    assert recurrent_state_size(cfg, 1024) == 2 * 4 * 16 * 32
    cfg.pattern = "loglinear"
    assert recurrent_state_size(cfg, 1024) == 2 * 15 * 4 * 64 * 64
    cfg.pattern = "ramnet,attention"
    assert recurrent_state_size(cfg, 64) == 4 * 4**5 * 65 + 2 * 64 * 128
