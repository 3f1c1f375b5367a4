"""Grid of the op-level benchmark (experiments/bench_linear_ops.py): the linear-time ops and attention, ours
against fla's Triton kernels and PyTorch's flash attention, in one process.

  python experiments/bench_linear_ops.py --config configs/bench_linear_ops.py:anchors   # GPU, fla as peer
  python experiments/bench_linear_ops.py --config configs/bench_linear_ops.py:cpu       # a smoke run
"""

import ml_collections

# op -> our implementations to time (the ramjax.ops `impl=` values; "cudnn"/"xla" for attention).
IMPLS = {
    "gla": ("chunked", "pallas"),  # per-key-dimension gate (GLA)
    "simple_gla": ("chunked", "pallas"),  # scalar gate per head (Mamba-2 / SSD)
    "gated_delta": ("chunked", "pallas"),
    "loglinear_mamba2": ("chunked",),
    "loglinear_gated_delta": ("chunked", "pallas"),
    "attention": ("cudnn", "xla"),  # causal softmax attention, jax.nn.dot_product_attention
}


def get_config(variant: str = "anchors") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.ops = ("attention", "gla", "simple_gla", "gated_delta", "loglinear_mamba2", "loglinear_gated_delta")
    config.impls = ml_collections.ConfigDict(IMPLS)
    config.num_heads = 16
    config.head_dim = 64
    config.dtype = "bfloat16"  # q, k, v; gates, beta and level weights fp32 (fla's convention)
    config.chunk_size = 64
    config.peer = "fla"  # "fla": fla's kernels and torch's flash attention timed in the same run; "" for none
    config.check_against_peer = True  # our output vs the peer's on the first case (same inputs)
    config.timing_iters = 20  # ours: median of this many calls after warm-up; peers: triton do_bench (median)
    # (batch, seq_len): the anchor shapes of the shared peer timings (kernels/README.md).
    config.cases = ((8, 4096), (2, 16384), (1, 65536))
    config.results_file = "experiments/results/linear_ops_gpu.md"
    # Module switches for an A/B timing, "package.module.NAME=value" each (ramjax.timing.apply_module_settings),
    # e.g. ("kernels.gla_chunk.SUB_CHUNK_PROGRAMS={'gla_chunk_dqk'}",); set before anything is traced.
    config.kernel_settings = ()
    if variant == "cpu":
        config.num_heads, config.head_dim = 2, 16
        config.dtype = "float32"
        config.cases = ((1, 128),)
        config.peer = ""
        config.check_against_peer = False
        config.timing_iters = 2
        config.impls.attention = ("xla",)
        config.results_file = "experiments/results/linear_ops_cpu.md"
    elif variant != "anchors":
        raise ValueError(f"configs/bench_linear_ops.py: unknown variant {variant!r}; known: 'anchors', 'cpu'")
    return config
