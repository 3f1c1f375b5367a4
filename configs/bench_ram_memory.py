"""Benchmark grid for the RAM-Net memory op (experiments/bench_ram_memory.py).

  python experiments/bench_ram_memory.py --config configs/bench_ram_memory.py:cpu
  python experiments/bench_ram_memory.py --config configs/bench_ram_memory.py:anchors   # GPU anchor shapes
"""

import ml_collections


def get_config(variant: str = "cpu") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_heads = 4
    config.num_factors = 5  # U
    config.top_k = 8
    config.d_v = 64
    config.gamma = 1.0
    config.eps = 1e-6
    config.grad_eps = 1e-3
    config.cape = True
    config.timing_iters = 5
    # Each case: (batch, seq_len, factor_size); M = factor_size ** num_factors.
    # The dense reference stores T x M x d_v per (batch, head) for its backward pass; it runs only where
    # batch * heads * T * M * d_v stays under dense_max_elements.
    config.dense_max_elements = 2**29
    config.impls = ("dense", "scan")
    config.v_dtype = "float32"  # the values written; the state is fp32 whatever this is
    config.peers = False  # also time the anchors' peers, the decoder, and print the target ratios
    config.layer_cases = ()  # (batch, seq_len) for whole-layer timings (RAM-Net per layer_impls vs attention)
    config.layer_impls = ("scan",)
    config.results_file = "experiments/results/ram_memory_cpu.md"
    if variant == "cpu":
        config.cases = ((1, 512, 2), (1, 512, 3), (1, 512, 4), (1, 2048, 2), (1, 2048, 3), (1, 2048, 4), (1, 2048, 16))
    elif variant == "anchors":
        config.num_heads = 16
        config.timing_iters = 30
        config.cases = ((8, 4096, 4), (2, 16384, 4), (1, 65536, 4), (2, 16384, 16))
        config.impls = ("scan", "pallas")
        config.v_dtype = "bfloat16"
        config.peers = True
        config.layer_cases = ((2, 16384), (1, 65536))
        config.layer_impls = ("scan", "pallas")
        config.results_file = "experiments/results/ram_memory_gpu.md"
    else:
        raise ValueError(f"configs/bench_ram_memory.py: unknown variant {variant!r}; known: 'cpu', 'anchors'")
    return config
