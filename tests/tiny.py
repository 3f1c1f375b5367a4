"""Tiny configs for the model, data and training tests: configs/mqar.py with every size shrunk."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config_module(name="mqar"):
    spec = importlib.util.spec_from_file_location(f"configs_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MQAR = load_config_module("mqar")


def tiny_config(variant="ramnet", *, d_model=16, num_layers=2, steps=2):
    """configs/mqar.py:<variant>,cpu shrunk to seconds on one CPU core."""
    config = MQAR.get_config(f"{variant},cpu")
    d, m, t = config.data, config.model, config.train
    d.batch_size = 8
    d.vocab_size = m.vocab_size = 64
    d.train_settings = "2:16,4:32"
    d.eval_settings = "2:16,4:32"
    d.eval_examples = 16
    d.eval_batch_size = 8
    m.d_model, m.num_heads = d_model, 2
    m.num_layers = max(num_layers, len(m.pattern.split(",")))  # hybrid: one whole pattern
    m.ramnet.num_factors, m.ramnet.factor_size, m.ramnet.top_k, m.ramnet.d_v = 2, 4, 2, 8
    m.mamba2.head_dim, m.mamba2.d_state = 8, 8
    m.gla.gate_rank = 4
    m.gla.chunk_size = m.mamba2.chunk_size = m.gated_deltanet.chunk_size = 8
    m.loglinear.num_levels, m.loglinear.decay_hidden = 7, 8
    t.num_steps, t.log_every, t.eval_every, t.checkpoint_every = steps, 1, steps, steps
    t.progress = False
    config.optim.warmup_steps = 0
    return config
