"""MQAR (multi-query associative recall) training runs: one model per variant, same data and optimiser.

  ramjax train --config configs/mqar.py:cpu --workdir runs/mqar_cpu          # RAM-Net, small enough for 2 CPU cores
  ramjax train --config configs/mqar.py:ramnet --workdir runs/ramnet         # d_model 128, 2 layers, the 7-setting suite
  ramjax train --config configs/mqar.py:gla,cpu --workdir runs/gla_cpu       # any model variant + the cpu sizes
  ramjax train --config configs/mqar.py:loglinear_mamba2,linear --workdir runs/ll --config.model.num_heads=4
  ramjax train --config configs/mqar.py:ramnet,fig4 --workdir runs/fig4   # the small Figure-4 regime (GPU: minutes)

Model variants (configs/common.py, the same in every config file): ramnet, transformer, gla, mamba2,
gated_deltanet, loglinear_mamba2, loglinear_gated_deltanet (adaptive mlp_softplus decay; the modifiers fixed,
linear, mlp_softplus, mlp_softmax set model.loglinear.mode), hybrid (three RAM-Net layers then attention, 4
layers). Earlier names still accepted: loglinear = loglinear_mamba2, loglinear_MODE = loglinear_mamba2,MODE.
Size modifiers: cpu; fig4 (the cpu sizes with vocabulary 512,
training on kv 4-32 and evaluating up to kv 64 / length 256 for 1000 steps, RAM-Net at M = 1024 (U 5, d_p 4),
K 8, d_v 64: the regime of experiments/sweeps/fig4_ramnet_ablations.py and topk_method.py). Settings are
"kv:length" lists.
"""

import os
import sys

import ml_collections

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # configs/, for the shared helper
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import MODELS, model_config, parse_variant, set_model  # noqa: E402

MODEL_VARIANTS = tuple(MODELS)
SIZE_MODIFIERS = ("cpu", "fig4")
# The RAM-Net paper's evaluation suite (kv pairs, length).
SUITE = "4:64,8:64,16:64,32:128,64:256,128:512,256:1024"
# Zoology's training mixture for that suite (its original MQAR configs: 100k examples of kv 4 / length 64 and 20k
# each of 8 / 128, 16 / 256, 32 / 256, 64 / 256): with mixture "cycle", one setting per step in turn, kv 4 listed
# five times for the same proportions. Lengths 512 and 1024 are never trained on: they test generalisation.
ZOOLOGY_TRAIN = "4:64,4:64,4:64,4:64,4:64,8:128,16:256,32:256,64:256"


def get_config(variant: str = "ramnet") -> ml_collections.ConfigDict:
    model, parts = parse_variant(variant, SIZE_MODIFIERS, "configs/mqar.py")

    config = ml_collections.ConfigDict()
    config.task = "mqar"  # mqar or selective_copy

    config.data = ml_collections.ConfigDict()
    config.data.seed = 0
    config.data.batch_size = 256  # global, over all processes and devices
    config.data.vocab_size = 8192
    config.data.train_settings = ZOOLOGY_TRAIN  # "kv:length" (selective copying: "tokens:length")
    config.data.mixture = "cycle"  # cycle: one setting per step in turn; pad: every setting in every batch
    config.data.power_a = 0.01  # Zoology's gap distribution
    config.data.eval_settings = SUITE
    config.data.eval_examples = 1000  # per setting
    # 1000 examples per setting in 8 batches: at length 1024 a batch of 250 needed ~20 GB of temporaries for
    # RAM-Net at d_v 128 (XLA:CPU's buffer assignment), more than a sixth of an H200, where the grids run six or
    # more programs on one GPU.
    config.data.eval_batch_size = 125
    # Training batches made ahead of the loop by this many background threads (0: in the loop); the same batches
    # either way. At vocabulary 8192 making a batch costs about as much CPU as the GPU's step of a small model.
    config.data.prefetch_threads = 2
    config.data.eval_seed = 12345  # eval data is fixed and disjoint in stream from training data
    config.data.layout = "standard"  # standard (Zoology MQAR, Mamba selective copying) or fork (docs/loglinear.md 6)
    config.data.train_pool_size = 0  # 0: fresh examples every step; N: a fixed pool of N per setting (the fork: 10k)

    config.model = model_config()

    config.optim = ml_collections.ConfigDict()
    # RAM-Net learns at 3e-3 and not at 1e-3 in this regime (3000 steps, M 1024, two seeds: 0.80 / 0.98 / 0.85 at
    # d_model 64 / 128 / 256 against 0.0005 / 0.002 / 0.18; experiments/results/fig3_mqar_state_size.md); the
    # baselines' better rate differs by model and width, so theirs stays 1e-3 (sweeps try both).
    config.optim.learning_rate = 3e-3 if model == "ramnet" else 1e-3
    config.optim.schedule = "warmup_cosine"  # warmup_cosine, or constant (no warm-up, no decay: the fork's Adam)
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
    # N > 1: N independent copies of the model trained in one jitted step (a vmap over parameters, optimizer state
    # and batch; ramjax/train/multi_seed.py). Seed i initialises with init_seed + i and draws its batches from
    # data.seed + i: seed i is the single run with those seeds. Metrics are logged per seed (NAME/seed_i) and as
    # mean and std over seeds; summary.json adds each seed's best evaluation and their mean +- std; checkpoints
    # hold the stacked state and resume as usual. Synthetic tasks only. 1: one model, exactly as before.
    config.train.num_seeds = 1
    # > 1: the batch's gradient is summed over this many slices of it, one after another in the step (one
    # optimizer update, the same loss and gradient up to rounding), so only one slice's activations are in memory
    # at a time: for runs whose step does not fit (RAM-Net's top-K start at a large memory). data.batch_size must
    # split into equal slices that are multiples of the batch shards.
    config.train.microbatches = 1
    # The LM head and the loss over chunks of at most this many positions (batch x a slice of time), each chunk's
    # logits formed again in the backward pass (ramjax/train/step.py: chunked_masked_totals); 0: the whole batch's
    # logits at once. At vocabulary 8192, batch 256 and length 1024 the whole logits are 8 GiB in fp32 per copy,
    # and two seeds' steps (train.num_seeds = 2) ran out of memory at 42 GB of an H200 (2026-12-02); chunks of
    # 32768 positions hold 1 GiB. A batch of at most this many positions takes the plain path. Same loss and
    # gradient up to float rounding.
    config.train.loss_chunk_tokens = 32768
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
    # > 0: end the run (as finished, its summary saying so) at the first evaluation whose mean accuracy reaches
    # this; 0: run all num_steps. The summary always records the best evaluation and its step ("best_eval").
    config.train.early_stop_accuracy = 0.0
    # Steps [start, stop) traced with jax.profiler into WORKDIR/profile (open with TensorBoard's profile plugin or
    # XProf); (0, 0): none. Each process of a multi-process run writes its own trace.
    config.train.profile_steps = (0, 0)
    # RAM-Net trained with a larger top-K that halves down to model.ramnet.top_k over the given steps
    # (ramjax/train/top_k_schedule.py); 0 = train with the model's K. Evaluation always uses the model's K.
    # At M = 1024, K = 8 the plain model stays at chance on MQAR; K 32 -> 16 -> 8 over the first 500 steps
    # learned (0.997-0.999 mean accuracy, experiments/results/topk_method.md). Larger memories need a larger start
    # and a longer anneal: M = 4096 learned on 3 of 3 seeds with 128 over 700 steps (0.992-0.998; 128 over 500: 2
    # of 3); M = 65536 stayed at chance with 256 over 500 (experiments/results/large_memory.md).
    # Off by default since the factor schedule below does the same job at the model's K (cheaper steps, and it
    # also learns at M = 65536 where this did not); with both on, this layout gives the same 0.999 at step 1000.
    # Zoology's layout (model.pattern = "base_conv,ramnet", model.ramnet.short_conv = 0) needs both: 32 over 500
    # steps with the factor schedule learned (0.967, 3 seeds), either alone did not (0.048 / 0.200)
    # (experiments/results/ramnet_without_conv.md, large_memory.md).
    config.train.ramnet_top_k_start = 0
    config.train.ramnet_top_k_anneal_steps = 0
    # RAM-Net trained with a memory that grows to M = d_p^U one factor at a time (ramjax/train/factor_schedule.py):
    # the first U - A factors held at digit 0 while A are active, A growing from ramnet_factors_start to U in equal
    # phases over ramnet_factors_grow_steps; 0 = train with all factors. Evaluation always uses all of them. With
    # 3 factors (64 slots at d_p 4) growing over 600 steps, K = 8 learned MQAR at M = 1024 (0.999 mean, 3 seeds)
    # and over 700 at M = 4096 (0.997); over 1000 at M = 65536 it needed 1500 steps (0.968). Without it, both stay
    # at chance (experiments/results/large_memory.md). A memory of at most d_p^3 slots has no schedule.
    config.train.ramnet_factors_start = 3
    config.train.ramnet_factors_grow_steps = 600

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

    m = config.model
    m.vocab_size = config.data.vocab_size

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
    if "fig4" in parts:
        # The small Figure-4 regime (experiments/results/fig4_ramnet_ablations.md), at the memory issue 16 is about.
        config.data.vocab_size = m.vocab_size = 512
        config.data.train_settings = "4:64,8:64,16:64,32:128"
        config.data.eval_settings = "4:64,8:64,16:64,32:128,64:256"
        m.ramnet.num_factors, m.ramnet.factor_size, m.ramnet.top_k, m.ramnet.d_v = 5, 4, 8, 64
        config.train.num_steps = 1000
        config.train.eval_every = 500
        config.train.checkpoint_every = 500
    set_model(m, model, parts)
    return config
