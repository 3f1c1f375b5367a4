"""The model scoreboard (experiments/bench_models.py): whole-model training throughput of every LM variant.

  python experiments/bench_models.py --config configs/bench_models.py:gpu      # the scoreboard (one GPU)
  python experiments/bench_models.py --config configs/bench_models.py:cpu      # tiny, seconds on a laptop

Every row is the configs/lm.py model of `model_config`, with `model_overrides` and then the row's own overrides
applied, trained on random tokens at each (seq_len, batch) of `shapes`.
"""

import ml_collections

from ramjax.compile_options import fast_compile_flags

# (name, {config field: value}): one row of the table per shape. Any field of the model config (or of the whole
# training config: optim, mesh) may be set per row, e.g. ("ramnet:pallas:xla", {..., "model.ramnet.decoder_impl":
# "xla"}). The name is free text; --only NAME matches it exactly or up to its first ":" (--only ramnet takes both
# PDMA implementations).
TRANSFORMER = ("transformer", {"model.pattern": "attention"})
RAMNET_SCAN = ("ramnet:scan", {"model.pattern": "ramnet", "model.ramnet.impl": "scan"})
RAMNET_PALLAS = ("ramnet:pallas", {"model.pattern": "ramnet", "model.ramnet.impl": "pallas"})
# RAM-Net as it was before the decoder kernel (the XLA beam search), with each PDMA implementation: the "before"
# rows of the speed issue, measured in the same run as the rest.
RAMNET_SCAN_XLA_DECODER = ("ramnet:scan:xla_decoder", {"model.pattern": "ramnet", "model.ramnet.impl": "scan",
                                                       "model.ramnet.decoder_impl": "xla"})
RAMNET_PALLAS_XLA_DECODER = ("ramnet:pallas:xla_decoder", {"model.pattern": "ramnet", "model.ramnet.impl": "pallas",
                                                           "model.ramnet.decoder_impl": "xla"})
# The linear-time models as configured (impl "auto": the Pallas kernels on GPUs), and each with the XLA chunked
# form instead: the "before" rows of the linear family's speed issue, measured in the same run.
GLA = ("gla", {"model.pattern": "gla"})
GLA_CHUNKED = ("gla:chunked", {"model.pattern": "gla", "model.gla.impl": "chunked"})
MAMBA2 = ("mamba2", {"model.pattern": "mamba2"})
MAMBA2_CHUNKED = ("mamba2:chunked", {"model.pattern": "mamba2", "model.mamba2.impl": "chunked"})
GATED_DELTANET = ("gated_deltanet", {"model.pattern": "gated_deltanet"})
# The chunked form at the chunk size it ran best at (64; the kernels take 32).
GATED_DELTANET_CHUNKED = ("gated_deltanet:chunked", {"model.pattern": "gated_deltanet",
                                                     "model.gated_deltanet.impl": "chunked",
                                                     "model.gated_deltanet.chunk_size": 64})
# configs/lm.py has 12 Fenwick levels (contexts up to 2048); 15 cover every shape here, up to 16384 tokens.
LOGLINEAR_MAMBA2 = ("loglinear_mamba2", {"model.pattern": "loglinear", "model.loglinear.num_levels": 15})
LOGLINEAR_GATED_DELTANET = ("loglinear_gated_deltanet", {"model.pattern": "loglinear", "model.loglinear.num_levels": 15,
                                                         "model.loglinear.base": "gated_deltanet"})
# The levels above the chunk by kernels/loglinear_delta_levels.py (impl "auto" keeps the XLA chunked form until timed).
LOGLINEAR_GATED_DELTANET_PALLAS = ("loglinear_gated_deltanet:pallas", {
    "model.pattern": "loglinear", "model.loglinear.num_levels": 15, "model.loglinear.base": "gated_deltanet",
    "model.loglinear.impl": "pallas"})
# The in-chunk part in XLA (impl "auto" takes the Pallas kernels of kernels/loglinear_chunk.py on GPUs): the before row.
LOGLINEAR_MAMBA2_CHUNKED = ("loglinear_mamba2:chunked", {"model.pattern": "loglinear", "model.loglinear.num_levels": 15,
                                                         "model.loglinear.impl": "chunked"})
HYBRID = ("hybrid", {"model.pattern": "ramnet,ramnet,ramnet,attention"})


def get_config(variant: str = "gpu") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model_config = "configs/lm.py:transformer"  # path[:variant], relative to the repository root
    # FIELD=VALUE items (space-separated, parsed as --config.FIELD=VALUE) applied to every row, before the row's
    # own, e.g. --config.model_overrides="model.dtype=bfloat16 model.d_model=1024"
    config.model_overrides = "model.dtype=bfloat16"
    config.variants = (TRANSFORMER, RAMNET_SCAN_XLA_DECODER, RAMNET_PALLAS_XLA_DECODER, RAMNET_SCAN, RAMNET_PALLAS,
                       GLA, GLA_CHUNKED, MAMBA2, MAMBA2_CHUNKED, GATED_DELTANET, GATED_DELTANET_CHUNKED,
                       LOGLINEAR_MAMBA2, LOGLINEAR_MAMBA2_CHUNKED, LOGLINEAR_GATED_DELTANET, LOGLINEAR_GATED_DELTANET_PALLAS,
                       HYBRID)
    config.baseline = "transformer"  # the variant the "x transformer" ratios divide by (always run)
    config.shapes = ((1024, 32), (4096, 8), (16384, 2))  # (seq_len, batch): 32768 tokens per step each
    config.num_devices = 1  # the first N devices, data parallel (memory is per device)
    config.warmup_steps = 3  # after compilation, not timed
    config.steps = 10  # timed, one at a time (block_until_ready); the table gives the median
    config.seed = 0  # of the random tokens
    # How the random tokens are drawn: "zipf" (rank r with probability ~ r^-zipf_exponent, like text: at 1.0 the
    # commonest byte is ~16% of a batch) or "uniform". The embedding gradient's scatter-add is fast on uniform ids
    # and slow where ids repeat (jaxlib 0.10.2-0.11.x on GPUs: ramjax/ops/shared/embedding.py), so only "zipf"
    # times what training on text costs. Runs before 2026-12-02 15:00 UTC drew "uniform" ids.
    config.token_distribution = "zipf"
    config.zipf_exponent = 1.0
    config.results_file = "experiments/results/bench_models.md"  # and .json beside it
    # Added to XLA_FLAGS (a flag already there is left alone) before JAX starts its backend; "" for none.
    config.xla_flags = ""
    # Module switches for an A/B timing, "package.module.NAME=value" each (ramjax.timing.apply_module_settings),
    # e.g. ("kernels.gla_chunk.SUB_CHUNK_PROGRAMS={'gla_chunk_dqk'}",); they apply to every row of the run.
    config.kernel_settings = ()
    if variant == "cpu":
        config.model_config = "configs/lm.py:transformer,cpu"  # d_model 64, 2 layers, 2 heads, RAM-Net impl scan
        config.model_overrides = "model.dtype=float32"
        hybrid_name, hybrid = HYBRID
        config.variants = (TRANSFORMER, RAMNET_SCAN, GLA, MAMBA2, GATED_DELTANET, LOGLINEAR_MAMBA2,
                           (hybrid_name, dict(hybrid, **{"model.ramnet.impl": "scan", "model.num_layers": 4})))
        config.shapes = ((64, 2),)
        config.warmup_steps = 1
        config.steps = 2
        config.results_file = "experiments/results/bench_models_cpu.md"
        # The tests' fast-compile flags (ramjax/compile_options.py): the whole run in ~30 s instead of ~85 s on 2
        # cores, compile time being most of it; the steps then run slower, so the CPU numbers are a smoke test.
        config.xla_flags = fast_compile_flags()
    elif variant != "gpu":
        raise ValueError(f"configs/bench_models.py: unknown variant {variant!r}; known: 'gpu', 'cpu'")
    return config
