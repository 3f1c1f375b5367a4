"""The decoding benchmark (experiments/bench_decode.py): tokens/s and state bytes per sequence while generating.

  python experiments/bench_decode.py --config configs/bench_decode.py:gpu     # the table (one GPU)
  python experiments/bench_decode.py --config configs/bench_decode.py:cpu     # tiny, a minute on a laptop

Each row is the configs/lm.py model with the row's overrides, decoding at each (context, batch): the state is put
at position `context` (attention's KV cache filled that far) and `steps` tokens are decoded greedily in one
jitted loop.
"""

import ml_collections

TRANSFORMER = ("transformer", {"model.pattern": "attention"})
RAMNET = ("ramnet", {"model.pattern": "ramnet"})  # M = 4^5 = 1024 slots per head
# M = 4^10 = 2^20 slots per head, the same parameters: the per-token cost should not change, the state does.
RAMNET_LARGE = ("ramnet:M2^20", {"model.pattern": "ramnet", "model.ramnet.num_factors": 10})
# M = 16^5 = 2^20 with the M = 1024 row's U = 5 factors: the address decoder does the same number of steps as at
# M = 1024 (its work grows with U, not M), so this row separates the memory's size from the decoder's depth.
RAMNET_LARGE_U5 = ("ramnet:M2^20,U5", {"model.pattern": "ramnet", "model.ramnet.factor_size": 16})
GLA = ("gla", {"model.pattern": "gla"})
GATED_DELTANET = ("gated_deltanet", {"model.pattern": "gated_deltanet"})
LOGLINEAR_MAMBA2 = ("loglinear_mamba2", {"model.pattern": "loglinear", "model.loglinear.num_levels": 17})


def get_config(variant: str = "gpu") -> ml_collections.ConfigDict:
    if variant not in ("gpu", "cpu"):
        raise ValueError(f"configs/bench_decode.py: variant gpu or cpu, got {variant!r}")
    config = ml_collections.ConfigDict()
    config.model_config = "configs/lm.py:transformer"  # path[:variant], relative to the repository root
    config.model_overrides = (("model.dtype", "bfloat16"),)
    config.variants = (TRANSFORMER, RAMNET, RAMNET_LARGE, RAMNET_LARGE_U5, GLA, GATED_DELTANET, LOGLINEAR_MAMBA2)
    config.contexts = (1024, 16384, 65536)
    config.batches = (1, 64)
    config.steps = 64  # tokens decoded per timed call
    config.iters = 5  # timed calls (median)
    # A row whose decoding state would take more than this share of the device's memory is skipped (recorded).
    config.max_state_fraction = 0.6
    config.results = "experiments/results/bench_decode.md"
    if variant == "cpu":
        config.model_config = "configs/lm.py:transformer,cpu"
        config.model_overrides = (("model.dtype", "float32"),)
        config.variants = (TRANSFORMER, RAMNET, ("ramnet:M2^12", {"model.pattern": "ramnet",
                                                                  "model.ramnet.num_factors": 4}),
                           GLA, GATED_DELTANET, ("loglinear_mamba2", {"model.pattern": "loglinear",
                                                                       "model.loglinear.num_levels": 10}))
        config.contexts = (128, 512)
        config.batches = (1, 4)
        config.steps, config.iters = 8, 2
        config.results = "/tmp/bench_decode_cpu.md"
    return config
