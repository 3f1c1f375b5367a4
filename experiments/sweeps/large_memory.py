"""Issue 16's targets: RAM-Net at K = 8 with M = 1024, 4096, 65536 and 2^20 slots (U 5, 6, 8, 10 with d_p 4), 3 seeds,
in the fig4 regime with the top-K annealing on (its default there: 32 -> 16 -> 8 over 500 steps); then the U
ablation at M = 1024 (U 1, 2, 5, 10 with d_p 1024, 32, 4, 2), 3 seeds.

  ramjax sweep --config configs/mqar.py:ramnet,fig4 --sweep experiments/sweeps/large_memory.py \
      --workdir runs/large_memory --max-parallel 8

Target (issue 16): mean accuracy >= 0.9 at M = 1024, 4096 and 65536 for every seed; M = 2^20 reported. d_v stays 64
(the state grows with M; the fixed-budget comparison is experiments/sweeps/fig4_ramnet_ablations.py).
"""

from ramjax.sweep import product, values, zipped

PLOT = {"x": "model.ramnet.num_factors", "y": ["eval/accuracy/mean"], "series": ["model.ramnet.factor_size"]}


# What these runs trained with when their results were recorded: the top-K anneal 32 -> 8 over 500 steps, then
# the fig4 default. The factor schedule has since replaced it as the default (configs/mqar.py).
BASE = {"train.ramnet_top_k_start": 32, "train.ramnet_top_k_anneal_steps": 500, "train.ramnet_factors_start": 0}


def get_sweep():
    seeds = zipped(values("train.init_seed", [0, 1, 2]), values("data.seed", [0, 1, 2]))
    over_m = zipped(values("model.ramnet.num_factors", [5, 6, 8, 10]), values("model.ramnet.factor_size", [4, 4, 4, 4]))
    over_u = zipped(values("model.ramnet.num_factors", [1, 2, 10]), values("model.ramnet.factor_size", [1024, 32, 2]))
    return product(over_m, seeds) + product(over_u, seeds)
