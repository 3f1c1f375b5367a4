"""The adaptive Fenwick decay under its authors' protocol (issue 21; what the fork ran: docs/loglinear.md section 6).

  ramjax train --config configs/adaptive_decay.py:mqar --workdir runs/ad_mqar             # kv 32, length 128
  ramjax train --config configs/adaptive_decay.py:mqar,kv8,linear --workdir runs/ad_kv8_linear
  ramjax train --config configs/adaptive_decay.py:mqar_length --workdir runs/ad_length    # train 128, test 256
  ramjax train --config configs/adaptive_decay.py:selective_copy,len512 --workdir runs/ad_sc512
  ramjax train --config configs/adaptive_decay.py:mqar,ours --workdir runs/ad_mqar_ours   # our Mamba-2 block

Variant: TASK[,MODIFIER...]. Tasks: mqar (the fork's MQAR layout, kv pairs at length 128), mqar_length (trained at
length 128, evaluated at 256 only, as the fork's length-generalisation run), selective_copy (16 tokens, length
256). Modifiers: kv4, kv8, kv16, kv32 (MQAR kv pairs; default 32, the published table's hardest; the fork's
length-generalisation run does not record its kv), len512 (selective copying at length 512), the lambda modes
linear, mlp_softplus (default), mlp_softmax, fixed, and ours (our pre-norm Mamba-2 block with conv, gate, D and
SwiGLU, initialised as the papers describe, on the same data and optimiser). The fork's "fixed lambda" baseline is
softplus(Lscale * dl): our `linear` mode; our `fixed` is lambda = 1.

The model is the fork's: 2 layers, d_model 64, 1 head, d_k = d_v = 64, post-LayerNorm residual around a bare
log-linear Mamba-2 mixer (q, k, v, dl, dt projections; A = -1), no feed-forward block, every Linear and the
embedding N(0, 0.02) (residual output projections 0.01), the lambda MLP too (lambda_init as_run), exact GELU, as
many Fenwick levels as the longest length needs. Data: vocabulary 128, a fixed pool of 10k training examples,
1000 validation examples. Training: Adam at a constant 3e-4 (selective copying 1e-3), no weight decay, no warm-up,
clip 1, batch 64, 20k steps (selective copying 30k), evaluation every 100 steps, stopping early at >= 99% mean
accuracy (train.early_stop_accuracy); summary.json reports the best evaluation (best_eval) beside the last.
"""

import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # configs/, for mqar.py and the shared helper
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mqar  # noqa: E402
from common import LOGLINEAR_MODES  # noqa: E402

TASK_VARIANTS = ("mqar", "mqar_length", "selective_copy")
KV_MODIFIERS = {"kv4": 4, "kv8": 8, "kv16": 16, "kv32": 32}
OTHER_MODIFIERS = ("len512", "ours")


def fenwick_levels(seq_len: int) -> int:
    """Levels a sequence of seq_len tokens needs: ceil(log2 T) + 1 (8 at 128, 9 at 256, 10 at 512)."""
    return (seq_len - 1).bit_length() + 1


def parse(variant: str) -> tuple[str, list[str]]:
    parts = [p.strip() for p in (variant or "mqar").split(",") if p.strip()]
    allowed = (*TASK_VARIANTS, *KV_MODIFIERS, *OTHER_MODIFIERS, *LOGLINEAR_MODES)
    unknown = [p for p in parts if p not in allowed]
    if unknown:
        raise ValueError(f"configs/adaptive_decay.py: unknown variant {unknown[0]!r}; tasks {TASK_VARIANTS}, "
                         f"modifiers {(*KV_MODIFIERS, *OTHER_MODIFIERS, *LOGLINEAR_MODES)} (e.g. 'mqar,kv8,linear')")
    tasks = [p for p in parts if p in TASK_VARIANTS] or ["mqar"]
    if len(tasks) > 1:
        raise ValueError(f"configs/adaptive_decay.py: one task at a time, got {tasks}")
    modifiers = [p for p in parts if p not in TASK_VARIANTS]
    if tasks[0] == "selective_copy" and any(p in KV_MODIFIERS for p in modifiers):
        raise ValueError("configs/adaptive_decay.py: kv modifiers are for the MQAR tasks, not selective_copy")
    if tasks[0] != "selective_copy" and "len512" in modifiers:
        raise ValueError("configs/adaptive_decay.py: len512 is for selective_copy (MQAR lengths are 128 and 256)")
    return tasks[0], modifiers


def get_config(variant: str = "mqar"):
    task, modifiers = parse(variant)
    config = mqar.get_config("loglinear_mamba2")  # the train, mesh sections and the model defaults

    d = config.data
    d.seed = 0
    d.batch_size = 64
    d.vocab_size = 128
    d.mixture = "cycle"  # one setting per run, as the fork
    d.layout = "fork"
    d.train_pool_size = 10000
    d.eval_examples = 1000
    d.eval_batch_size = 250
    d.eval_seed = 1  # the fork's validation set: its own generator (seed + 1 there)
    if task == "selective_copy":
        config.task = "selective_copy"
        train_len = eval_len = 512 if "len512" in modifiers else 256
        count = 16
    else:
        config.task = "mqar"
        train_len, eval_len = (128, 256) if task == "mqar_length" else (128, 128)
        count = next((KV_MODIFIERS[p] for p in modifiers if p in KV_MODIFIERS), 32)
    d.train_settings = f"{count}:{train_len}"
    d.eval_settings = f"{count}:{eval_len}"

    m = config.model
    m.vocab_size = d.vocab_size
    m.pattern = "loglinear"
    m.d_model, m.num_layers, m.num_heads = 64, 2, 1
    m.dtype = "float32"  # the fork trains in fp32
    m.loglinear.base = "mamba2"
    m.loglinear.mode = next((p for p in modifiers if p in LOGLINEAR_MODES), "mlp_softplus")
    m.loglinear.num_levels = fenwick_levels(max(train_len, eval_len))
    m.loglinear.decay_hidden = 64
    m.mamba2.head_dim, m.mamba2.d_state, m.mamba2.chunk_size = 64, 64, 64
    if "ours" not in modifiers:
        # The fork's layer and block (mqar_minimal.py's HAttentionLayer, MQARModel).
        m.block, m.norm, m.norm_eps, m.feed_forward = "post_norm", "layer", 1e-5, False
        m.weight_init, m.init_std = "normal", 0.02
        m.mamba2.expand = 1  # v and the output have width d_model: one head of 64
        m.mamba2.conv_width = 0  # no short conv (and no SiLU) on v, k, q
        m.mamba2.gate = m.mamba2.output_norm = m.mamba2.d_skip = m.mamba2.dt_scales_v = False  # none of them
        m.mamba2.a_init = "arange"  # A = -1 for the one head (learnable, as there)
        m.loglinear.lambda_init = "as_run"  # W_l, W1, W2 N(0, 0.02), zero biases: lambda starts near 0.69
        m.loglinear.exact_gelu = True  # the erf GELU (PyTorch's default), as the fork

    o = config.optim
    o.schedule = "constant"
    o.learning_rate = 1e-3 if task == "selective_copy" else 3e-4
    o.warmup_steps = 0
    o.weight_decay = 0.0
    o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults
    o.clip_norm = 1.0

    t = config.train
    t.num_steps = 30000 if task == "selective_copy" else 20000
    t.log_every = 100
    t.eval_every = 100
    t.early_stop_accuracy = 0.99  # the fork stops at >= 99% validation accuracy and reports the best evaluation
    t.checkpoint_every = 1000
    t.address_metrics = False  # no RAM-Net layers
    t.ramnet_top_k_start = t.ramnet_top_k_anneal_steps = 0
    return config
