"""Language modelling on text through TensorFlow Datasets (by default the Python standard library's sources).

  ramjax prepare --config configs/lm.py                                   # build the dataset (+ tokenizer)
  ramjax train --config configs/lm.py:ramnet --workdir runs/lm_ramnet
  ramjax eval --workdir runs/lm_ramnet                                    # loss, bits per byte, per-position loss
  ramjax train --config configs/lm.py:hybrid,cpu --workdir runs/lm_cpu    # small enough for a laptop

Model variants (configs/common.py, the same in every config file): ramnet, transformer, gla, mamba2,
gated_deltanet, loglinear_mamba2 and loglinear_gated_deltanet (adaptive mlp_softplus decay), hybrid (three
RAM-Net layers then one attention layer, repeated). Sizes: d_model 512, 8 layers, 8 heads (~25-30M parameters
with the byte tokenizer), context 1024. Size modifier: cpu.
"""

import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # configs/, for the shared helper and mqar.py
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mqar  # noqa: E402
from common import MODELS, parse_variant, set_model  # noqa: E402

MODEL_VARIANTS = tuple(MODELS)


def get_config(variant: str = "ramnet"):
    model, parts = parse_variant(variant, ("cpu",), "configs/lm.py")
    config = mqar.get_config("transformer")  # the optimiser, train, mesh sections and the model defaults
    config.task = "lm"
    d = config.data
    for field in ("train_settings", "eval_settings", "power_a", "eval_seed", "mixture"):
        del d[field]
    d.dataset = "local_text"  # local_text, or tfds:NAME for a prepared TFDS dataset in data_dir
    d.corpus_dir = ""  # local_text: a directory of .txt/.jsonl/.parquet files; "" = the Python standard library
    d.data_dir = "~/ramjax_data"  # prepared datasets, tokenizers and token streams, one folder per source
    d.validation_percent = 1.0  # local_text: share of documents held out (split by document, deterministic)
    d.text_feature = "text"  # tfds:NAME datasets: the feature holding the text
    d.tokenizer = "byte"  # byte (vocabulary 258) or sentencepiece (trained from the train split, vocab_size)
    d.tokenizer_max_documents = 0  # sentencepiece: train on at most this many documents (0 = all)
    d.vocab_size = 258
    d.seq_len = 1024
    d.batch_size = 32
    d.eval_examples = 256  # validation windows evaluated (0 = the whole split)
    d.eval_batch_size = 16
    d.num_workers = 0  # grain worker processes that read and tokenise (0: threads in the training process)

    m = config.model
    m.vocab_size = d.vocab_size
    m.d_model, m.num_layers, m.num_heads = 512, 8, 8
    m.ramnet.short_conv = 0  # the paper's LM has none
    m.ramnet.cape = "paper"
    m.ramnet.alpha_init = 0.0
    m.loglinear.mode = "mlp_softplus"
    m.loglinear.num_levels = 12  # Fenwick levels for contexts up to 2^11 = 2048 tokens
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 500
    config.train.num_steps = 10000
    config.train.eval_every = 1000
    config.train.checkpoint_every = 500
    # train.ramnet_factors_start / _grow_steps (3 factors growing to U over 600 steps) come from the MQAR config,
    # where they let M = 1024 and 4096 learn at K = 8; on language modelling not yet measured against the plain model.

    if "cpu" in parts:
        d.seq_len, d.batch_size, d.eval_examples, d.eval_batch_size = 128, 8, 32, 8
        m.d_model, m.num_layers, m.num_heads = 64, 2, 2  # hybrid: 4 (set_model)
        m.dtype = "float32"  # faster than bfloat16 on CPUs
        m.ramnet.num_factors, m.ramnet.factor_size, m.ramnet.top_k, m.ramnet.d_v = 2, 8, 4, 32
        m.ramnet.impl = "scan"
        m.mamba2.head_dim, m.mamba2.d_state = 32, 16
        m.gated_deltanet.chunk_size = m.gla.chunk_size = m.mamba2.chunk_size = 32
        m.loglinear.num_levels = 9
        config.train.num_steps, config.train.eval_every, config.train.checkpoint_every = 300, 100, 100
        config.optim.warmup_steps = 50
    set_model(m, model, parts)
    return config
