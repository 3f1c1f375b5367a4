"""The RAM-Net memory demo: random queries, keys and values through the address decoder and PDMA.

  ramjax demo --config configs/demo.py                     # the default below, about a minute on 2 CPU cores
  ramjax demo --config configs/demo.py:large_memory        # M = 2^20 slots, scan path only
  ramjax demo --config configs/demo.py --config.seq_len=1024
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.batch = 2
    config.seq_len = 512
    config.num_heads = 4
    config.num_factors = 5  # U
    config.factor_size = 4  # d_p, so M = d_p ** U = 1024 slots per head
    config.top_k = 8  # K
    config.d_v = 64
    config.gamma = 1.0
    config.eps = 1e-6
    config.grad_eps = 1e-3
    config.cape = True  # cyclic address positional embedding on reads and writes
    config.impls = ("dense", "scan")  # the first is the reference the others are checked against
    config.timing_iters = 5

    if variant == "large_memory":
        config.factor_size = 16  # M = 16 ** 5 = 2 ** 20: only the scan path can hold this
        config.impls = ("scan",)
    elif variant:
        raise ValueError(f"configs/demo.py: unknown variant {variant!r}; known: 'large_memory'")
    return config
