"""Adaptive Fenwick decay on selective copying: fixed / linear / mlp_softplus / mlp_softmax lambda.

  ramjax sweep --config configs/mqar.py:loglinear_mamba2 --sweep experiments/sweeps/adaptive_decay_selective_copy.py \
      --workdir runs/adaptive_decay_copy --max-parallel 4 --config.task=selective_copy \
      --config.data.train_settings=16:256 --config.data.eval_settings=16:256,16:512

Selective copying (16 tokens scattered in noise, copied after a marker): trained at length 256, evaluated at 256
and 512 (length generalisation).
"""

from ramjax.sweep import values

PLOT = {"x": "model.loglinear.mode", "y": ["eval/accuracy/tokens16_len256", "eval/accuracy/tokens16_len512"], "series": []}


def get_sweep():
    return values("model.loglinear.mode", ["fixed", "linear", "mlp_softplus", "mlp_softmax"])
