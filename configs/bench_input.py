"""The language-model input pipeline's throughput (experiments/bench_input.py): batches/s of
`LMTask.train_iterator` at the model table's data settings, per data.num_workers.

  python experiments/bench_input.py --config configs/bench_input.py:gpu      # on the training host
  python experiments/bench_input.py --config configs/bench_input.py:cpu      # a laptop or CI machine

The data section is configs/lm.py's (the source `ramjax prepare` builds by default: the Python standard library,
in data.data_dir), with `data_overrides` applied; the pipeline runs on the host's CPUs only, so both variants
measure the same 1024 x 32 batches and differ in the worker counts tried, the batches timed and the results file.
"""

import ml_collections


def get_config(variant: str = "gpu") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # The data section of this config: seq_len 1024, batch 32 (global; one process reads all of it), the stdlib
    # corpus, the byte tokenizer. The model part is not used; transformer is the model the target comes from.
    config.data_config = "configs/lm.py:transformer"  # path[:variant], relative to the repository root
    # FIELD=VALUE items (space-separated, parsed as --config.FIELD=VALUE) applied to that config, e.g.
    # --config.data_overrides="data.data_dir=/tmp/ramjax_data data.corpus_dir=/path/to/texts"
    config.data_overrides = ""
    # One group of rows per tokenizer. sentencepiece is trained on the train split the first time (tens of
    # seconds on the stdlib, timed as preparation) and kept in data.data_dir.
    config.tokenizers = ("byte", "sentencepiece")
    config.sentencepiece_vocab_size = 8192  # data.vocab_size of the sentencepiece rows (the byte tokenizer: 258)
    config.num_workers = (0, 1, 2, 4, 8)  # data.num_workers of each row (0: threads in the training process)
    config.warmup_batches = 20  # read after the first batch, not timed (thread pools, worker buffers fill up)
    config.batches = 500  # timed
    # Input must keep up with the fastest model with room to spare: >= 10x its steps/s at context 1024 (issue 22).
    # The fastest model is the transformer: 1,116,460 tokens/s at 1024 x 32 on one H200
    # (experiments/results/bench_models.md, the 2026-12-01 00:37 run) = 34.1 steps/s, so 341 batches/s.
    config.target_batches_per_s = 341.0
    config.results_file = "experiments/results/input_throughput.md"  # newest run first; older runs are kept
    if variant == "cpu":
        config.num_workers = (0, 1)  # 2 cores: more workers than that only compete with the packing thread
        config.warmup_batches = 10
        config.batches = 200
        config.results_file = "experiments/results/input_throughput_cpu.md"
    elif variant != "gpu":
        raise ValueError(f"configs/bench_input.py: unknown variant {variant!r}; known: 'gpu', 'cpu'")
    return config
