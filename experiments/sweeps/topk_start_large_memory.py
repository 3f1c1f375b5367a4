"""Issue 16, next step after experiments/results/large_memory.md: at M = 4096 and 65536 the K 32 -> 8 schedule
stayed at chance (K^2 / M = 0.25 and 0.016 at the start, where the M = 1024 runs that learned had 1.0). Does a
start K that keeps K^2 / M near 1 (K ~ sqrt(M)) carry the method to larger memories? 3 seeds each.

  ramjax sweep --config configs/mqar.py:ramnet,fig4 --sweep experiments/sweeps/topk_start_large_memory.py \
      --workdir runs/topk_start_large_memory --max-parallel 12

M 4096 (U 6): start 64 and 128 annealed over 500 steps, and 64 over 700; M 65536 (U 8): start 256 over 500.
The decoder is XLA at these sizes (decoder_impl auto: U x K > 64), which compiles in seconds. Results:
experiments/results/large_memory.md (M 4096: start 128 -> mean 0.844). The M 65536 runs need about 20 GiB each
(K 256, U 8): with 12 at once on one H200 they ran out of memory; run them at most 4 at a time.
"""

from ramjax.sweep import product, values, zipped

PLOT = {"x": "train.ramnet_top_k_start", "y": ["eval/accuracy/mean"], "series": ["model.ramnet.num_factors"]}


# The top-K anneal alone, as when these runs were recorded (the factor schedule is now configs/mqar.py's default).
BASE = {"train.ramnet_factors_start": 0}


def get_sweep():
    methods = zipped(values("model.ramnet.num_factors", [6, 6, 6, 8]),
                     values("train.ramnet_top_k_start", [64, 128, 64, 256]),
                     values("train.ramnet_top_k_anneal_steps", [500, 500, 700, 500]))
    seeds = zipped(values("train.init_seed", [0, 1, 2]), values("data.seed", [0, 1, 2]))
    return product(methods, seeds)
