"""MQAR (multi-query associative recall) training runs: one model per variant, same data and optimiser.

  ramjax train --config configs/mqar.py:cpu --workdir runs/mqar_cpu          # RAM-Net, small enough for 2 CPU cores
  ramjax train --config configs/mqar.py:ramnet --workdir runs/ramnet         # d_model 128, 2 layers, the 7-setting suite
  ramjax train --config configs/mqar.py:gla,cpu --workdir runs/gla_cpu       # any model variant + the cpu sizes
  ramjax train --config configs/mqar.py:loglinear_mlp_softplus --workdir runs/ll --config.model.num_heads=4
  ramjax train --config configs/mqar.py:ramnet,fig4 --workdir runs/fig4   # the small Figure-4 regime (GPU: minutes)

Model variants: ramnet, transformer, gla, mamba2, gated_deltanet, loglinear (= loglinear_mlp_softplus),
loglinear_fixed, loglinear_linear, loglinear_mlp_softplus, loglinear_mlp_softmax (the log-linear base is
model.loglinear.base: mamba2 or gated_deltanet). Size modifiers: cpu; fig4 (the cpu sizes with vocabulary 512,
training on kv 4-32 and evaluating up to kv 64 / length 256 for 1000 steps, RAM-Net at M = 1024 (U 5, d_p 4),
K 8, d_v 64: the regime of experiments/sweeps/fig4_ramnet_ablations.py and topk_method.py). Settings are
"kv:length" lists.
"""

import ml_collections

MODEL_VARIANTS = ("ramnet", "transformer", "gla", "mamba2", "gated_deltanet", "loglinear", "loglinear_fixed",
                  "loglinear_linear", "loglinear_mlp_softplus", "loglinear_mlp_softmax")
SIZE_MODIFIERS = ("cpu", "fig4")
# The RAM-Net paper's evaluation suite (kv pairs, length).
SUITE = "4:64,8:64,16:64,32:128,64:256,128:512,256:1024"


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
    m.scan_layers = True  # scan over layers (compile time independent of depth)
    m.remat = False  # recompute each layer group in the backward pass (less memory, more compute)

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
    m.ramnet.impl = "auto"  # PDMA implementation: auto, dense, scan or pallas
    m.ramnet.decoder_impl = "auto"  # address decoder (product top-K): auto, xla or pallas

    m.attention = ml_collections.ConfigDict()
    m.attention.head_dim = 0  # 0: d_model / num_heads
    m.attention.rope_theta = 10000.0
    m.attention.impl = "auto"  # auto (cuDNN on GPU with bf16, else XLA), xla or cudnn

    m.gla = ml_collections.ConfigDict()
    m.gla.expand_k = 0.5
    m.gla.expand_v = 1.0
    m.gla.gate_rank = 16
    m.gla.gate_normaliser = 16.0
    m.gla.chunk_size = 64
    # "auto" (the XLA chunked form), "chunked", or "pallas" (kernels/gla_chunk.py; chunk_size a power of 2 >= 16;
    # not yet timed on a GPU, so not the default).
    m.gla.impl = "auto"

    m.mamba2 = ml_collections.ConfigDict()
    m.mamba2.expand = 2
    m.mamba2.head_dim = 64
    m.mamba2.d_state = 64
    m.mamba2.conv_width = 4
    m.mamba2.chunk_size = 64
    m.mamba2.impl = "auto"  # as model.gla.impl, for plain Mamba-2 (the log-linear op has no kernel yet)

    m.gated_deltanet = ml_collections.ConfigDict()
    m.gated_deltanet.head_dim = 0  # 0: d_model / num_heads
    m.gated_deltanet.expand_v = 2
    m.gated_deltanet.conv_width = 4
    m.gated_deltanet.chunk_size = 64

    m.loglinear = ml_collections.ConfigDict()
    m.loglinear.base = "mamba2"  # mamba2 or gated_deltanet (its options are model.<base>)
    m.loglinear.mode = "mlp_softplus"  # fixed, linear, mlp_softplus or mlp_softmax
    m.loglinear.num_levels = 15  # L: enough for sequences up to 2^14 = 16384 tokens
    m.loglinear.decay_hidden = 64
    return m


def get_config(variant: str = "ramnet") -> ml_collections.ConfigDict:
    parts = [p.strip() for p in (variant or "ramnet").split(",") if p.strip()]
    unknown = [p for p in parts if p not in MODEL_VARIANTS + SIZE_MODIFIERS]
    if unknown:
        raise ValueError(f"configs/mqar.py: unknown variant {unknown[0]!r}; model variants {MODEL_VARIANTS}, "
                         f"size modifiers {SIZE_MODIFIERS} (combine with a comma, e.g. 'gla,cpu')")
    models = [p for p in parts if p in MODEL_VARIANTS] or ["ramnet"]
    if len(models) > 1:
        raise ValueError(f"configs/mqar.py: one model variant at a time, got {models}")

    config = ml_collections.ConfigDict()
    config.task = "mqar"  # mqar or selective_copy

    config.data = ml_collections.ConfigDict()
    config.data.seed = 0
    config.data.batch_size = 256  # global, over all processes and devices
    config.data.vocab_size = 8192
    config.data.train_settings = SUITE  # "kv:length" (selective copying: "tokens:length")
    config.data.mixture = "cycle"  # cycle: one setting per step in turn; pad: every setting in every batch
    config.data.power_a = 0.01  # Zoology's gap distribution
    config.data.eval_settings = SUITE
    config.data.eval_examples = 1000  # per setting
    config.data.eval_batch_size = 250
    config.data.eval_seed = 12345  # eval data is fixed and disjoint in stream from training data

    config.model = model_config()

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 200
    config.optim.final_lr_ratio = 0.1  # cosine decay to learning_rate * final_lr_ratio
    config.optim.weight_decay = 0.1  # on kernels and embeddings only
    config.optim.b1 = 0.9
    config.optim.b2 = 0.95
    config.optim.eps = 1e-8
    config.optim.clip_norm = 1.0

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 6000
    config.train.init_seed = 0
    config.train.log_every = 50
    config.train.eval_every = 1000
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 2
    config.train.progress = True  # a progress bar on the terminal
    # A step with a non-finite loss or gradient norm never updates the parameters; then "skip" goes on with the
    # next batch, "stop" ends the run (exit code 3). Either way the step and its batch are logged.
    config.train.on_nonfinite = "skip"
    config.train.inject_nan_at_step = -1  # >= 0: make that step's loss NaN (a drill for the guard above)
    # With each evaluation, RAM-Net's read/write overlap and top-K mass per layer on the step's MQAR batch
    # (ramjax/train/address_metrics.py): whether queries read the slots their value was written to.
    config.train.address_metrics = True
    # RAM-Net trained with a larger top-K that halves down to model.ramnet.top_k over the given steps
    # (ramjax/train/top_k_schedule.py); 0 = train with the model's K. Evaluation always uses the model's K.
    # At M = 1024, K = 8 the plain model stays at chance on MQAR; K 32 -> 16 -> 8 over the first 500 steps
    # learned (0.997-0.999 mean accuracy, experiments/results/topk_method.md).
    config.train.ramnet_top_k_start = 32
    config.train.ramnet_top_k_anneal_steps = 500

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # -1: the devices the other axes leave
    config.mesh.fsdp = 1
    config.mesh.tensor = 1
    # logical axis -> mesh axes; a dimension not divisible by its mesh axes stays replicated (with a warning).
    config.mesh.rules = (
        ("batch", ("data", "fsdp")),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("mlp", "tensor"),
        ("layers", None),
        ("levels", None),
        ("decay_mlp", None),
    )

    model = models[0]
    m = config.model
    m.vocab_size = config.data.vocab_size
    if model == "transformer":
        m.pattern = "attention"
    elif model.startswith("loglinear"):
        m.pattern = "loglinear"
        if model != "loglinear":
            m.loglinear.mode = model[len("loglinear_"):]
    else:
        m.pattern = model

    if "cpu" in parts or "fig4" in parts:
        # Small enough that the whole run (install included) takes minutes on 2 CPU cores.
        config.data.batch_size = 64
        config.data.vocab_size = m.vocab_size = 256
        config.data.train_settings = "4:64,8:64,16:64"
        config.data.mixture = "pad"
        config.data.eval_settings = "4:64,8:64,16:64"
        config.data.eval_examples = 500
        m.d_model = 64
        m.dtype = "float32"
        m.ramnet.num_factors, m.ramnet.factor_size, m.ramnet.top_k, m.ramnet.d_v = 2, 8, 4, 32
        m.ramnet.impl = "scan"  # at batch 64 x length 64 the scan's fwd+bwd is ~2x the dense one's speed on CPU
        m.mamba2.head_dim, m.mamba2.d_state = 32, 16
        m.gated_deltanet.chunk_size = m.gla.chunk_size = m.mamba2.chunk_size = 32
        # lr 1e-2 reached 0.96 on (kv 8, length 64) by step 400 where 3e-3 needed ~900 (mqar_tuning.md, round 2).
        config.train.num_steps = 500
        config.train.eval_every = 250
        config.train.checkpoint_every = 250
        config.optim.warmup_steps = 100
        config.optim.learning_rate = 1e-2
        # M = 64, K = 4 learns without the top-K schedule, and each K of a schedule is one more compile.
        config.train.ramnet_top_k_start = config.train.ramnet_top_k_anneal_steps = 0
    if "fig4" in parts:
        # The small Figure-4 regime (experiments/results/fig4_ramnet_ablations.md), at the memory issue 16 is about.
        config.data.vocab_size = m.vocab_size = 512
        config.data.train_settings = "4:64,8:64,16:64,32:128"
        config.data.eval_settings = "4:64,8:64,16:64,32:128,64:256"
        m.ramnet.num_factors, m.ramnet.factor_size, m.ramnet.top_k, m.ramnet.d_v = 5, 4, 8, 64
        config.train.num_steps = 1000
        config.train.ramnet_top_k_start, config.train.ramnet_top_k_anneal_steps = 32, 500
        config.train.eval_every = 500
        config.train.checkpoint_every = 500
    return config
