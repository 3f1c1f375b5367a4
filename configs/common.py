"""Shared by the config files (big_vision style): the model config, the model variants and the variant parser.

Config files are loaded by path (`ramjax train --config configs/lm.py:ramnet`, from any directory), so each one
puts this directory on sys.path before `import common`.

A variant is "MODEL[,MODIFIER...]": one model of MODELS (the same names in every config file), and modifiers:
the file's sizes (e.g. cpu) and a log-linear decay mode (fixed, linear, mlp_softplus, mlp_softmax).
"""

import ml_collections

# Model variant -> model fields it sets (the pattern is each layer's mixer, repeated over the depth).
MODELS = {
    "ramnet": {"pattern": "ramnet"},
    "transformer": {"pattern": "attention"},
    "gla": {"pattern": "gla"},
    "mamba2": {"pattern": "mamba2"},
    "gated_deltanet": {"pattern": "gated_deltanet"},
    "loglinear_mamba2": {"pattern": "loglinear", "loglinear.base": "mamba2"},
    "loglinear_gated_deltanet": {"pattern": "loglinear", "loglinear.base": "gated_deltanet"},
    "hybrid": {"pattern": "ramnet,ramnet,ramnet,attention"},  # three RAM-Net layers, then attention
}
LOGLINEAR_MODES = ("fixed", "linear", "mlp_softplus", "mlp_softmax")  # model.loglinear.mode, as a modifier
# Earlier names, still accepted: configs/mqar.py's "loglinear" and "loglinear_MODE" (base mamba2).
ALIASES = {"loglinear": "loglinear_mamba2",
           **{f"loglinear_{mode}": f"loglinear_mamba2,{mode}" for mode in LOGLINEAR_MODES}}


def parse_variant(variant: str, sizes: tuple, where: str, default: str = "ramnet") -> tuple[str, list[str]]:
    """(model, modifiers) of "MODEL[,MODIFIER...]"; a ValueError naming `where` for an unknown part or two
    models."""
    parts = [p.strip() for p in (variant or default).split(",") if p.strip()]
    parts = [q for p in parts for q in ALIASES.get(p, p).split(",")]
    unknown = [p for p in parts if p not in (*MODELS, *sizes, *LOGLINEAR_MODES)]
    if unknown:
        raise ValueError(f"{where}: unknown variant {unknown[0]!r}; model variants {tuple(MODELS)}, modifiers "
                         f"{sizes + LOGLINEAR_MODES} (combine with a comma, e.g. 'gla,cpu')")
    models = [p for p in parts if p in MODELS] or [default]
    if len(models) > 1:
        raise ValueError(f"{where}: one model variant at a time, got {models}")
    return models[0], [p for p in parts if p not in MODELS]


def set_model(m: ml_collections.ConfigDict, model: str, modifiers=()) -> None:
    """The model fields of variant `model` (and a log-linear mode among `modifiers`) on model config `m`; the
    depth is rounded up to a multiple of the pattern's length (hybrid: 4)."""
    for field, value in MODELS[model].items():
        node = m
        *parents, leaf = field.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    for mode in (p for p in modifiers if p in LOGLINEAR_MODES):
        m.loglinear.mode = mode
    period = len(m.pattern.split(","))
    m.num_layers = -(-m.num_layers // period) * period


def model_config() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.pattern = "ramnet"  # the mixer of each layer, comma-separated and repeated over the depth
    m.vocab_size = 8192
    m.d_model = 128
    m.num_layers = 2
    m.num_heads = 4
    m.mlp_hidden = 0  # 0: 8/3 d_model rounded up to a multiple of 8
    m.norm_eps = 1e-6
    # Compute dtype: bfloat16 or float32 (parameters, optimiser state, the loss and every recurrent state stay
    # fp32). bfloat16 for GPUs and TPUs, where matrix products run several times faster in it; the cpu variant
    # sets float32, which is faster on CPUs (no bf16 matrix units) and keeps CPU results exact.
    m.dtype = "bfloat16"
    # How the token embedding's gradient is summed into its table: one_hot (a matrix product; the default on GPUs
    # and TPUs, where XLA's scatter-add slows down on text's repeated tokens: 100 of a 122 ms LM step on an H200,
    # ramjax/ops/shared/embedding.py), scatter (XLA's scatter-add), or auto (one_hot there, scatter on CPUs).
    m.embedding_grad = "auto"
    m.scan_layers = True  # scan over layers (compile time independent of depth)
    m.remat = False  # recompute each layer group in the backward pass (less memory, more compute)
    m.remat_policy = "nothing"  # what a recomputed group keeps: "nothing" or "dots" (its projections; ramjax/models/lm.py)
    # The residual block; the adaptive-decay fork's choices are in docs/loglinear.md section 6.
    m.block = "pre_norm"  # pre_norm: x + f(norm(x)); post_norm: norm(x + f(x)) (the fork)
    m.norm = "rms"  # norm of the residual stream: rms (RMSNorm) or layer (LayerNorm with a bias, the fork's)
    m.feed_forward = True  # a SwiGLU block after each mixer; False: the mixer alone (the fork)
    m.weight_init = "default"  # default: each layer's own; normal: Linears, embedding N(0, init_std), biases 0 (fork)
    m.init_std = 0.02  # std of weight_init "normal"; residual output projections get init_std / sqrt(2 num_layers)

    m.ramnet = ml_collections.ConfigDict()
    m.ramnet.num_factors = 5  # U
    m.ramnet.factor_size = 4  # d_p: M = d_p ** U = 1024 slots per head
    m.ramnet.top_k = 8  # K
    m.ramnet.d_v = 64
    m.ramnet.gamma = 1.0  # PDMA decay power (spec: unspecified, default 1 = EMA)
    m.ramnet.eps = 1e-6
    m.ramnet.grad_eps = 1e-3
    # CAPE heads per layer: "paper" (all heads in layers 1-4, half in 5-8), "half", "all", "none", or counts
    # "2,1". On MQAR, with the short conv below doing the token shift, "none" learned fastest (measured, see
    # experiments/results/mqar_tuning.md); without a conv no CAPE schedule learned the shift in 5000 steps.
    m.ramnet.cape = "none"
    m.ramnet.alpha_init = 1.0  # log temperature per head on W_q and W_k (1.0: sharper addresses at the start)
    m.ramnet.output_norm = False  # ours, off by default: the paper has neither
    m.ramnet.output_gate = False
    # Ours: width of a causal conv on q, k, v (0 = none, as in the paper's LM). MQAR needs a token shift (pair a
    # value with the key before it); Mamba-2 and Gated DeltaNet get it from their convs, and RAM-Net without one
    # plateaued at 0.12 accuracy on (kv 8, length 64) while with width 4 it reached 0.91 in 1000 steps.
    m.ramnet.short_conv = 4
    m.ramnet.qk_bias = False  # ours: a bias on W_q and W_k (position-only addresses with CAPE); the paper has none
    # Ours, 0 = off: with qk_bias, CAPE head h of a layer starts reading the slot written h + 1 tokens before (its
    # biases favour those slots' digits by this logit), a relative address to start from (docs/ramnet.md s. 7).
    m.ramnet.cape_offset_bias = 0.0
    m.ramnet.impl = "auto"  # PDMA implementation: auto, dense, scan or pallas
    m.ramnet.decoder_impl = "auto"  # address decoder (product top-K): auto, xla or pallas

    m.attention = ml_collections.ConfigDict()
    m.attention.head_dim = 0  # 0: d_model / num_heads
    m.attention.rope_theta = 10000.0
    m.attention.impl = "auto"  # auto (cuDNN on GPU with bf16, else XLA), xla or cudnn

    # Zoology's BaseConv layer (pattern kind "base_conv", e.g. "base_conv,ramnet"): its conv's width.
    m.base_conv = ml_collections.ConfigDict()
    m.base_conv.width = 3

    m.gla = ml_collections.ConfigDict()
    m.gla.expand_k = 0.5
    m.gla.expand_v = 1.0
    m.gla.gate_rank = 16
    m.gla.gate_normaliser = 16.0
    m.gla.chunk_size = 64
    # "auto" (on a GPU the Pallas kernels, measured faster there; elsewhere the XLA chunked form), "chunked", or
    # "pallas" (kernels/gla_chunk.py; chunk_size a power of 2 >= 16).
    m.gla.impl = "auto"
    # A short causal conv (+ SiLU) of this width on q, k and v; 0: none (fla's GLA layer by default; no config
    # here turns it on: on the CPU it did not help GLA learn MQAR, experiments/results/fig3_mqar_state_size.md).
    m.gla.conv_width = 0

    m.mamba2 = ml_collections.ConfigDict()
    m.mamba2.expand = 2
    m.mamba2.head_dim = 64
    m.mamba2.d_state = 64
    m.mamba2.conv_width = 4  # short causal conv (with SiLU) on x, B, C; 0: none (the fork)
    m.mamba2.chunk_size = 64
    m.mamba2.gate = True  # the silu(z) output gate; False: none (the fork)
    m.mamba2.output_norm = True  # RMSNorm before the output projection; False: none (the fork)
    m.mamba2.d_skip = True  # the skip y += D x; False: none (the fork)
    m.mamba2.dt_scales_v = True  # v = x dt as in Mamba-2; False: v = x (the fork)
    m.mamba2.a_init = "uniform"  # uniform: A = -U[1, 16] per head (Mamba-2); arange: A_h = -(h + 1), -1 (the fork)
    m.mamba2.impl = "auto"  # as model.gla.impl, for plain Mamba-2 (the log-linear form: model.loglinear.impl)

    m.gated_deltanet = ml_collections.ConfigDict()
    m.gated_deltanet.head_dim = 0  # 0: d_model / num_heads
    m.gated_deltanet.expand_v = 2
    m.gated_deltanet.conv_width = 4
    # 32: the Pallas kernels (kernels/gated_delta_chunk.py) spill registers at 64; on one H200 the LM step at
    # 4096 x 8 took 71 ms with them at 32, 164 ms at 64, and 136 ms in the XLA chunked form at 64.
    m.gated_deltanet.chunk_size = 32
    # "auto" (on GPUs the Pallas kernels when chunk_size <= 32, else the XLA chunked form), "chunked" or "pallas".
    m.gated_deltanet.impl = "auto"

    m.loglinear = ml_collections.ConfigDict()
    m.loglinear.base = "mamba2"  # mamba2 or gated_deltanet (its options are model.<base>)
    m.loglinear.mode = "mlp_softplus"  # fixed, linear, mlp_softplus or mlp_softmax
    m.loglinear.num_levels = 15  # L: enough for sequences up to 2^14 = 16384 tokens
    m.loglinear.decay_hidden = 64
    m.loglinear.lambda_init = "as_described"  # as_described: W2 0, b2 0.54 (papers' text); as_run: N(0, 0.02) (fork)
    # The chunked op's backward pass reruns its forward instead of keeping its intermediates: peak step memory
    # ~40% lower for the Mamba-2 base, ~3x for Gated DeltaNet (XLA's CPU buffer assignment at 16384 x 2;
    # docs/loglinear.md section 7). On an H200 the step got faster with it, not slower (less memory traffic).
    m.loglinear.recompute = True
    # The log-linear op: "auto" (for sequences: on GPUs with the mamba2 base "pallas", else "chunked"), "chunked",
    # or with the mamba2 base "pallas" (the in-chunk part as Pallas kernels, kernels/loglinear_chunk.py).
    m.loglinear.impl = "auto"
    m.loglinear.exact_gelu = False  # the lambda MLP's GELU: tanh approximation, or True: exact erf (the fork)
    # Levels a training length never fills keep their initial lambda (docs/loglinear.md section 4); `ramjax eval
    # --tie-unseen-levels` sets this field to the highest trained level.
    m.loglinear.tie_levels_above = 0  # ours; N > 0: every level above N takes its lambda; 0: off (the papers)
    return m
