"""Benchmark grid for log-linear attention (experiments/bench_loglinear.py).

  python experiments/bench_loglinear.py --config configs/bench_loglinear.py:anchors   # GPU, with fla as peer
  python experiments/bench_loglinear.py --config configs/bench_loglinear.py:cpu       # a smoke run
"""

import ml_collections


def get_config(variant: str = "anchors") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.num_heads = 16
    config.head_dim = 64
    config.dtype = "bfloat16"  # inputs; the op accumulates in fp32
    config.chunk_sizes = (64,)
    config.bases = ("mamba2",)  # and/or "gated_delta"
    config.peer = "fla"  # "fla" times fla's chunk_log_linear_attn in the same run; "" for none
    config.timing_iters = 30
    config.check_against_peer = True  # also compare our output with fla's on the first shape
    config.results_file = "experiments/results/loglinear_gpu.md"
    # (batch, seq_len): the anchor shapes fla and cuDNN were timed at (kernels/README.md)
    config.cases = ((8, 4096), (2, 16384), (1, 65536))
    if variant == "cpu":
        config.num_heads, config.head_dim = 2, 16
        config.cases = ((1, 256), (1, 1024))
        config.peer = ""
        config.check_against_peer = False
        config.timing_iters = 3
        config.bases = ("mamba2", "gated_delta")
        config.results_file = "experiments/results/loglinear_cpu.md"
    elif variant != "anchors":
        raise ValueError(f"configs/bench_loglinear.py: unknown variant {variant!r}; known: 'anchors', 'cpu'")
    return config
