"""RAM-Net Figure 4: ablations over U (U = 1 is a flat softmax over M) and over M at a fixed state budget.

  ramjax sweep --config configs/mqar.py:ramnet --sweep experiments/sweeps/fig4_ramnet_ablations.py \
      --workdir runs/fig4 --max-parallel 3

Rows 0-3: M = 1024 slots reached with U = 1, 2, 5, 10 factors (d_p = 1024, 32, 4, 2). Rows 4-6: the state
budget heads x M x d_v fixed at 4 x 65536 while M goes 256, 1024, 4096 (d_v 256, 64, 16).
"""

from ramjax.sweep import values, zipped

PLOT = {"x": "run", "y": ["eval/accuracy/mean"], "series": []}


# What these runs trained with when their results were recorded: neither the top-K anneal nor the factor schedule
# (the factor schedule is now configs/mqar.py's default).
BASE = {"train.ramnet_top_k_start": 0, "train.ramnet_factors_start": 0}


def get_sweep():
    over_u = zipped(values("model.ramnet.num_factors", [1, 2, 5, 10]),
                    values("model.ramnet.factor_size", [1024, 32, 4, 2]),
                    values("model.ramnet.d_v", [64, 64, 64, 64]))
    over_m = zipped(values("model.ramnet.num_factors", [4, 5, 6]),
                    values("model.ramnet.factor_size", [4, 4, 4]),
                    values("model.ramnet.d_v", [256, 64, 16]))
    return over_u + over_m
