"""Language-model data: documents from TFDS, tokenised and packed into fixed-length windows by a grain pipeline.

The pipeline (ramjax/data/lm_pipeline.py) reads the prepared split through a random-access TFDS data source,
shuffles documents (seeded, a new permutation each epoch), gives each process only its own documents (process p
of P reads every P-th of the shuffled order) and tokenises them (in `data.num_workers` grain worker processes,
0: in this process); each document is followed by EOS and the documents are packed into windows of
`data.seq_len` + 1 tokens (inputs the first T, targets the last T), with each token's position inside its
document (positions, and so RAM-Net's CAPE shifts, restart at every document). Host memory is bounded (a few
documents and batches in flight), whatever the size of the dataset. The loss mask is 0 only on padding (the end
of an evaluation split, and the masked rows padding its last batch).

`LMTask.train_iterator(process_index, process_count)` yields that process's rows of each global batch
(data.batch_size // process_count); it is a grain DatasetIterator whose get_state()/set_state() go into the
checkpoint with the model, so a resumed run reads on exactly where it stopped. The trainer (_TrainData in
ramjax/train/trainer.py) reads each process's rows from it and puts them on the mesh with
jax.make_array_from_process_local_data (evaluation.Batches.put_local); every checkpoint holds each process's
iterator state (checkpoints/<step>/data/process_<i>-of-<n>.json, grain's Orbax item). On another number of
processes (or workers) a resume restarts at `lm_pipeline.restart_document(old states)`: the first document some
old process had not finished, read in the new sharding (a few batches' documents are read twice, none skipped),
and says so. A checkpoint saved before the trainer kept the state is caught up by replaying the stream to its
step. The data order does not depend on data.num_workers. Evaluation reads its split in stored order,
unshuffled.

Sources (`data.dataset`): "local_text" (the builder in local_text.py over `data.corpus_dir`, default the Python
standard library) or "tfds:NAME" (any prepared TFDS dataset in `data.data_dir` with a text feature
`data.text_feature`, read through `tfds.data_source`, no TensorFlow; prepare it as ArrayRecord).

Provenance: everything prepared from a source lives in `data_dir/<source>-<key>/`, where the key hashes what the
source is (local_text: the corpus directory and validation_percent; tfds:NAME: the name, data_dir and text
feature): the local_text dataset itself and the SentencePiece model. Its provenance.json records those facts
and, for local_text, the corpus fingerprint (files, sizes, mtimes: ramjax/data/corpus.py); a corpus that changed
since is refused with what differs. The task's `provenance` (facts, fingerprint, tokenizer) goes into each run's
record (config.json), so a resume on other data is refused like any other change.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import numpy as np

from ramjax.data import lm_pipeline
from ramjax.data.lm_pipeline import LMBatch  # noqa: F401  (re-exported: the batches LMTask yields)
from ramjax.data.tasks import EvalSlice
from ramjax.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, train_sentencepiece
from ramjax.errors import ConfigError

TOKENIZERS = ("byte", "sentencepiece")


def data_root(d) -> str:
    return os.path.abspath(os.path.expanduser(d.data_dir))


def source_facts(d) -> dict:
    """What the prepared dataset and the tokenizer trained on it depend on (besides the tokenizer's own
    settings)."""
    if d.dataset == "local_text":
        from ramjax.data.corpus import default_corpus_dir

        corpus_dir = os.path.abspath(os.path.expanduser(d.corpus_dir or default_corpus_dir()))
        return {"dataset": "local_text", "corpus_dir": corpus_dir, "validation_percent": float(d.validation_percent)}
    return {"dataset": d.dataset, "data_dir": data_root(d), "text_feature": d.text_feature}


def source_dir(d) -> str:
    """data_dir/<source>-<key>: everything prepared from this source (see the module docstring)."""
    facts = source_facts(d)
    key = hashlib.sha1(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(data_root(d), f"{facts['dataset'].replace(':', '_')}-{key}")


def source_provenance(d) -> dict:
    """The source's facts and, for local_text, the corpus fingerprint now (a missing corpus_dir: ValueError)."""
    facts = source_facts(d)
    if d.dataset == "local_text":
        from ramjax.data.corpus import fingerprint

        facts.update(fingerprint(facts["corpus_dir"]))
    return facts


def check_provenance(d) -> dict:
    """The source's provenance, checked against (or recorded in) source_dir/provenance.json."""
    now = source_provenance(d)
    directory = source_dir(d)
    path = os.path.join(directory, "provenance.json")
    if os.path.exists(path):
        with open(path) as f:
            recorded = json.load(f)
        changed = [f"{k}: {recorded.get(k)!r} -> {now[k]!r}" for k in now if recorded.get(k) != now[k]]
        if changed:
            raise ConfigError(f"data.corpus_dir: {now.get('corpus_dir', d.dataset)} is not what was prepared in "
                              f"{directory} on {recorded.get('prepared', '?')} ({'; '.join(changed)}); delete that "
                              "directory to prepare it again")
    else:
        os.makedirs(directory, exist_ok=True)
        partial = path + f".{os.getpid()}.tmp"
        with open(partial, "w") as f:
            json.dump(dict(now, prepared=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())), f, indent=1)
        os.replace(partial, path)
    return now


def split_source(d, split: str):
    """A random-access sequence of examples (dicts with the text feature) of `split`, preparing it if needed."""
    if d.dataset == "local_text":
        from ramjax.data.local_text import check_splits, local_text_builder

        directory = source_dir(d)
        builder = local_text_builder(corpus_dir=d.corpus_dir or None, data_dir=directory,
                                     validation_percent=d.validation_percent)
        if not builder.is_prepared():
            check_splits(builder.corpus_dir, d.validation_percent)
            print(f"ramjax: preparing the local_text dataset of {builder.corpus_dir} in {directory} (once)",
                  flush=True)
            builder.download_and_prepare()
        return builder.as_data_source(split), "text"
    if d.dataset.startswith("tfds:"):
        import tensorflow_datasets as tfds

        name = d.dataset[len("tfds:"):]
        builder = tfds.builder(name, data_dir=os.path.expanduser(d.data_dir))
        if not builder.is_prepared():
            raise ConfigError(f"data.dataset {d.dataset!r}: not prepared in {data_root(d)}; prepare it there first "
                              f"(`tfds build {name} --data_dir {data_root(d)}` on a machine with TensorFlow, with "
                              "--file_format array_record so that reading needs none)")
        return builder.as_data_source(split), d.text_feature
    raise ConfigError(f"data.dataset: 'local_text' or 'tfds:NAME', got {d.dataset!r}")


def _texts(d, split: str):
    source, feature = split_source(d, split)
    for i in range(len(source)):
        text = source[i][feature]
        yield text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


def make_tokenizer(d, *, train_if_missing: bool = True):
    if d.tokenizer == "byte":
        return ByteTokenizer()
    if d.tokenizer == "sentencepiece":
        limit = f"_docs{d.tokenizer_max_documents}" if d.tokenizer_max_documents > 0 else ""
        path = os.path.join(source_dir(d), "tokenizers", f"spm_bpe_{d.vocab_size}{limit}.model")
        if not os.path.exists(path) and train_if_missing:
            print(f"ramjax: training a SentencePiece model ({d.vocab_size} pieces) on the train split -> {path}",
                  flush=True)
            texts = _texts(d, "train")
            if d.tokenizer_max_documents > 0:
                texts = (t for i, t in zip(range(d.tokenizer_max_documents), texts))
            train_sentencepiece(texts, path, d.vocab_size)
        return SentencePieceTokenizer(path)
    raise ConfigError(f"data.tokenizer: must be one of {TOKENIZERS}, got {d.tokenizer!r}")


def _tokenizer_tag(tokenizer) -> str:
    if isinstance(tokenizer, ByteTokenizer):
        return "byte"
    with open(tokenizer.model_path, "rb") as f:
        return "spm-" + hashlib.sha1(f.read()).hexdigest()[:12]


class LMTask:
    """The trainer's task interface over packed text (ramjax/data/lm_pipeline.py): train_iterator (this
    process's rows, resumable), eval_slices, eval_batches, eval_bytes."""

    def __init__(self, data_config, *, eval_split: str = "validation"):
        d = self.config = data_config
        if d.tokenizer not in TOKENIZERS:
            raise ConfigError(f"data.tokenizer: must be one of {TOKENIZERS}, got {d.tokenizer!r}")
        self.seq_len = int(d.seq_len)
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len: must be >= 2, got {d.seq_len}")
        self.num_workers = d.get("num_workers", 0)
        lm_pipeline.check_layout(batch_size=d.batch_size, process_index=0, process_count=1,
                                 num_workers=self.num_workers)
        source = check_provenance(d)
        self.tokenizer = make_tokenizer(d)
        # What this task's data is: recorded with each run (config.json), so a resume on other data is refused.
        self.provenance = dict(source, tokenizer=_tokenizer_tag(self.tokenizer))
        if d.tokenizer == "byte" and d.vocab_size != ByteTokenizer.vocab_size:
            raise ConfigError(f"data.vocab_size: the byte tokenizer has {ByteTokenizer.vocab_size} ids, "
                              f"got {d.vocab_size}")
        self.train_settings = self.eval_settings = [(0, self.seq_len)]
        self.eval_split = eval_split
        self.eval_slices = [EvalSlice(f"{eval_split}_len{self.seq_len}", 0, self.seq_len)]
        self._sources = {}

    @property
    def max_train_len(self) -> int:
        return self.seq_len

    @property
    def feature(self) -> str:
        """The examples' text feature."""
        return "text" if self.config.dataset == "local_text" else self.config.text_feature

    def source(self, split: str):
        """The split's random-access examples (prepared on first use)."""
        if split not in self._sources:
            self._sources[split], _ = split_source(self.config, split)
        return self._sources[split]

    def train_iterator(self, process_index: int = 0, process_count: int = 1, *, start: int = 0):
        """This process's training batches (LMBatch of data.batch_size // process_count rows), endless; a grain
        DatasetIterator with get_state()/set_state(). `start`: the global document position to begin at
        (lm_pipeline.restart_document, when resuming onto another layout)."""
        d = self.config
        dataset = lm_pipeline.train_dataset(
            self.source("train"), self.feature, self.tokenizer, seq_len=self.seq_len,
            batch_size=d.batch_size, seed=d.seed, process_index=process_index, process_count=process_count,
            num_workers=self.num_workers, start=start)
        layout = {"process_index": process_index, "process_count": process_count, "num_workers": self.num_workers,
                  "seed": int(d.seed), "seq_len": self.seq_len, "batch_size": int(d.batch_size), "start": start}
        return lm_pipeline.TrainIterator(dataset, layout)

    def eval_windows(self, limit: int | None = None):
        """The evaluation split's windows in order: at most `limit` (default data.eval_examples; 0: all)."""
        limit = self.config.eval_examples if limit is None else limit
        return lm_pipeline.eval_windows(self.source(self.eval_split), self.feature, self.tokenizer,
                                        seq_len=self.seq_len, limit=limit)

    def eval_batches(self, eval_slice: EvalSlice | None = None):
        """The evaluation split's windows in order, up to data.eval_examples of them (0: all), in batches of
        data.eval_batch_size; the last batch is padded with masked rows."""
        del eval_slice
        return lm_pipeline.padded_batches(iter(self.eval_windows()), self.config.eval_batch_size)

    def eval_bytes(self, limit_windows: int | None = None) -> np.ndarray:
        """Bytes of text behind each target of the evaluation windows, [windows, T] (for bits per byte; 0 on
        padding)."""
        windows = self.eval_windows(limit_windows or 0)
        return np.stack([np.where(w["loss_mask"], w["nbytes"], 0) for w in windows])

    def split_counts(self, split: str) -> dict:
        """Documents, tokens, bytes and windows of `split` (one pass over it)."""
        windows = lm_pipeline.eval_windows(self.source(split), self.feature, self.tokenizer,
                                           seq_len=self.seq_len)
        tokens = nbytes = count = 0
        for window in windows:
            count += 1
            tokens += int(window["loss_mask"].sum()) + 1  # the window's first token is no target
            nbytes += int(window["nbytes"][window["loss_mask"]].sum())
            nbytes += int(self.tokenizer.token_bytes(window["inputs"][:1]).sum())
        return {"documents": len(self.source(split)), "tokens": tokens, "bytes": nbytes, "windows": count}


def prepare(config, *, count_train: bool = False) -> dict:
    """Builds the dataset and trains the tokeniser if it is SentencePiece; counts the validation split's tokens
    (and the train split's with count_train: a pass over all of it)."""
    task = LMTask(config.data)
    out = {"data_dir": source_dir(config.data), "provenance": task.provenance, "tokenizer": task.tokenizer.name,
           "vocab_size": int(task.tokenizer.vocab_size)}
    for split in ("train", "validation"):
        out[split] = (task.split_counts(split) if split == "validation" or count_train
                      else {"documents": len(task.source(split))})
    if small := small_validation_message(out["validation"]["windows"], config.data):
        out["warning"] = small
        print(f"ramjax prepare: warning: {small}", file=sys.stderr, flush=True)
    return out


def small_validation_message(windows: int, data) -> str | None:
    """A message when the validation split holds fewer windows than evaluation asks for (data.eval_examples), or
    None. Seen on a GPU image whose Python standard library had 575 files: 2 held-out documents, 5 windows, so
    every validation loss of that run was the loss of 5 windows."""
    wanted = data.eval_examples
    if wanted and windows < wanted:
        return (f"the validation split has {windows} windows of {data.seq_len} tokens, fewer than "
                f"data.eval_examples = {wanted}: its losses will be noisy and not comparable with a run on a larger "
                f"split; use a larger corpus (data.corpus_dir) or raise data.validation_percent "
                f"(now {data.get('validation_percent', '-')})")
    return None


def main(config) -> None:
    """`ramjax prepare --config configs/lm.py`."""
    import json

    if config.get("task") != "lm":
        raise SystemExit("ramjax prepare: the config's task is not 'lm'")
    print(json.dumps(prepare(config), indent=2))
