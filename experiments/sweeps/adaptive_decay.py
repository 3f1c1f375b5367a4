"""Adaptive Fenwick decay on MQAR: fixed / linear / mlp_softplus / mlp_softmax lambda, kv 4-32, two seeds.

  ramjax sweep --config configs/mqar.py:loglinear_mamba2 --sweep experiments/sweeps/adaptive_decay.py \
      --workdir runs/adaptive_decay --max-parallel 4 \
      --config.data.train_settings=4:128,8:128,16:128,32:128 --config.data.eval_settings=4:128,8:128,16:128,32:128,32:256

Length generalisation: trained at length 128, evaluated at 256 (the last eval setting). The claims to test:
mlp_softplus >= linear, most at kv = 32 (published 99.6 vs 60.9) and in length generalisation (33.2 vs 3.3).
"""

from ramjax.sweep import product, values

PLOT = {"x": "model.loglinear.mode", "y": ["eval/accuracy/kv32_len128", "eval/accuracy/kv32_len256"],
        "series": ["train.init_seed"], "best_over": ["optim.learning_rate"]}


def get_sweep():
    return product(values("model.loglinear.mode", ["fixed", "linear", "mlp_softplus", "mlp_softmax"]),
                   values("train.init_seed", [0, 1]),  # two seeds fit one device call
                   values("optim.learning_rate", [1e-2, 3e-3]))
