"""The throwaway-sized grid that chose the MQAR cpu defaults (results: experiments/results/mqar_tuning.md, run on
the GPU machine for speed). Every run is configs/mqar.py:cpu at learning rate 3e-3 (what rounds 1-2 ran at; runs
that differ say so) with its own fields:

  ramjax sweep --config configs/mqar.py:cpu --sweep experiments/sweeps/tune_mqar_cpu.py --workdir /tmp/tune \
      --config.optim.learning_rate=3e-3 --config.train.num_steps=1000 --config.train.eval_every=250 \
      --config.train.progress=False

The table (results.md in the sweep directory) gives each run's accuracy per slice (kv8_len64 was the one
compared) and the runs' metrics.jsonl every evaluation.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs"))
import mqar  # noqa: E402


def _flat(config, prefix=""):
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _from_cpu(variant: str) -> dict:
    """The fields that turn configs/mqar.py:cpu into configs/mqar.py:VARIANT (the command line's learning rate,
    steps and evaluation interval kept)."""
    cpu, other = _flat(mqar.get_config("cpu")), _flat(mqar.get_config(variant))
    kept = ("optim.learning_rate", "train.num_steps", "train.eval_every", "train.progress")
    return {field: value for field, value in other.items() if cpu[field] != value and field not in kept}


H4A1 = {"model.num_heads": 4, "model.ramnet.alpha_init": 1.0}
SMALL_DATA = {"data.batch_size": 64, "data.vocab_size": 256, "model.vocab_size": 256,
              "data.train_settings": "4:64,8:64,16:64", "data.mixture": "pad", "data.eval_settings": "4:64,8:64,16:64",
              "data.eval_examples": 500}


def get_sweep():
    return [
        {"model.pattern": "attention"},
        {},
        H4A1,
        {**H4A1, "model.ramnet.top_k": 2, "model.ramnet.factor_size": 16, "model.ramnet.d_v": 16},
        {"model.num_heads": 4, "model.ramnet.num_factors": 3, "model.ramnet.factor_size": 4},
        {**H4A1, "model.ramnet.cape": "4,0"},
        {**_from_cpu("ramnet"), **H4A1, "model.ramnet.short_conv": 4, **SMALL_DATA},  # d_model 128
        {"model.pattern": "gla"},
        {"model.pattern": "mamba2"},
        {"model.pattern": "gated_deltanet"},
        {"model.pattern": "loglinear"},
        {**H4A1, "train.num_steps": 5000},
        {"model.ramnet.short_conv": 4},
        {**H4A1, "model.ramnet.short_conv": 4},
        {**H4A1, "model.ramnet.short_conv": 4, "model.ramnet.cape": "none"},
        {**H4A1, "model.ramnet.short_conv": 4, "model.ramnet.num_factors": 3},
        # Round 2, from the cpu default (4 heads, alpha 1, short conv 4, CAPE none): learning faster in fewer steps.
        {},  # the cpu default of round 2 (now configs/mqar.py:cpu itself, the second run)
        {"optim.learning_rate": 5e-3},
        {"optim.learning_rate": 1e-2},
        {"model.ramnet.top_k": 2},
        {"data.batch_size": 32},
        {"model.num_heads": 2},
        {"optim.weight_decay": 0.0},
        {"optim.learning_rate": 5e-3, "optim.warmup_steps": 50},
        # Round 3: the new cpu default (lr 1e-2, 500 steps) over seeds.
        *[{"train.init_seed": seed, "data.seed": seed, "train.num_steps": 500, "optim.learning_rate": 1e-2}
          for seed in range(4)],
        {**H4A1, "model.ramnet.output_norm": True},
    ]
