"""MQAR accuracy against model width for RAM-Net and two baselines (a small Figure-3-style sweep).

  ramjax sweep --config configs/mqar.py:ramnet --sweep configs/sweeps/mqar_width.py --max-parallel 3
  ramjax sweep --config configs/mqar.py:ramnet,cpu --sweep configs/sweeps/mqar_width.py --dry-run
"""

from ramjax.sweep import product, values

PLOT = {"x": "model.d_model", "y": ["eval/accuracy/mean"], "series": ["model.pattern"]}


def get_sweep():
    return product(
        values("model.pattern", ["ramnet", "attention", "gated_deltanet"]),
        values("model.d_model", [64, 128, 256]),
    )
