"""Issue 16: which training method lets RAM-Net learn MQAR with K = 8 at M = 1024 (the fig4 regime), 3 seeds.

  ramjax sweep --config configs/mqar.py:ramnet,fig4 --sweep experiments/sweeps/topk_method.py \
      --workdir runs/topk_method --max-parallel 4

Methods: the plain model; training with a larger top-K halved down to the model's K over the first half or 70%
of the steps (train.ramnet_top_k_start / ramnet_top_k_anneal_steps; evaluation always uses K = 8); a bias on
W_q and W_k; both. Add --config.model.ramnet.num_factors=6 (M 4096) or 8 (M 65536) for the larger memories.
"""

from ramjax.sweep import product, values, zipped

PLOT = {"x": "train.init_seed", "y": ["eval/accuracy/mean"],
        "series": ["train.ramnet_top_k_start", "model.ramnet.qk_bias"]}


# The top-K anneal alone, as when these runs were recorded (the factor schedule is now configs/mqar.py's default).
BASE = {"train.ramnet_factors_start": 0}


def get_sweep():
    methods = (zipped(values("train.ramnet_top_k_start", [0, 32, 64, 0, 32]),
                      values("train.ramnet_top_k_anneal_steps", [0, 500, 700, 0, 500]),
                      values("model.ramnet.qk_bias", [False, False, False, True, True])))
    seeds = zipped(values("train.init_seed", [0, 1, 2]), values("data.seed", [0, 1, 2]))
    return product(methods, seeds)
