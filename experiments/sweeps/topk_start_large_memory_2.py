"""Issue 16, the step after experiments/sweeps/topk_start_large_memory.py (M 4096: start K 128 over 500 steps gave
0.982 / 0.990 / 0.561, mean 0.844; start 64 learned only with a 700-step anneal). Here, 3 seeds each, K = 8 at
evaluation (the fig4 regime of configs/mqar.py), one sweep per memory size because their runs need different
shares of the GPU (XLA_PYTHON_CLIENT_MEM_FRACTION applies to every run of a sweep):

  # M 4096 (U 6), start 128 over 700 steps: ~10 GiB a run
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.075 ramjax sweep --config configs/mqar.py:ramnet,fig4 \
      --sweep experiments/sweeps/topk_start_large_memory_2.py:4096 --workdir runs/topk_start_4096 --max-parallel 3
  # M 65536 (U 8), start 256 over 500 steps (or over 800: the argument 65536_long): over 20 GiB a run (one
  # allocation of 19.5 GiB was seen)
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.25 ramjax sweep --config configs/mqar.py:ramnet,fig4 \
      --sweep experiments/sweeps/topk_start_large_memory_2.py:65536 --workdir runs/topk_start_65536 --max-parallel 3

Results: experiments/results/large_memory.md.
"""

from ramjax.sweep import product, values, zipped

PLOT = {"x": "train.ramnet_top_k_start", "y": ["eval/accuracy/mean"], "series": ["model.ramnet.num_factors"]}


METHODS = {  # memory size -> (U, start K, anneal steps, training steps[, train.microbatches])
    "4096": (6, 128, 700, 1000),
    "65536": (8, 256, 500, 1000),
    # M 65536 at start 256 over 500 steps stayed at chance (3 of 3); at M 4096 a longer anneal (700 against 500)
    # took start 128 from 1 seed of 3 to 3 of 3, so the same start over 800 steps: 2 of 3 seeds learned (0.936,
    # 0.997; the third 0.043), both leaving chance while training K was still 64 or 32.
    "65536_long": (8, 256, 800, 1000),
    # Next: more steps at the large K (the onset came late) and more after the anneal.
    "65536_longer": (8, 256, 1000, 1500),
    # M = 2^20 (U 10): start 512 (K^2 / M = 1/4) over 1000 steps.
    "1048576": (10, 512, 1000, 1500),
    # 65536_longer gave 0.986 / 0.007 / 0.999: again 2 of 3 seeds, a different two. At M 4096, K^2 / M = 4 at the
    # start learned on 3 of 3 seeds where 1 learned on 2 of 3: so start 512 here (K^2 / M = 4). (First run,
    # 2026-12-01, in 4 microbatches: ~4 s a step, most of it the decoder's pairwise rank of the K = 512 beam, now
    # a sort above K = 32: ramjax/ops/addressing/decoder.py.)
    "65536_k512": (8, 512, 1000, 1500),
}


# The top-K anneal alone, as when these runs were recorded (the factor schedule is now configs/mqar.py's default).
BASE = {"train.ramnet_factors_start": 0}


def get_sweep(memory: str = "4096"):
    if memory not in METHODS:
        raise ValueError(f"topk_start_large_memory_2.py: unknown memory size {memory!r}; known: {sorted(METHODS)}")
    num_factors, start, anneal, steps, *microbatches = METHODS[memory]
    methods = zipped(values("model.ramnet.num_factors", [num_factors]), values("train.ramnet_top_k_start", [start]),
                     values("train.ramnet_top_k_anneal_steps", [anneal]), values("train.num_steps", [steps]),
                     *([values("train.microbatches", microbatches)] if microbatches else []))
    seeds = zipped(values("train.init_seed", [0, 1, 2]), values("data.seed", [0, 1, 2]))
    return product(methods, seeds)
