"""Language-model data: documents from TFDS, tokenised, packed into fixed-length windows.

Packing: every document is tokenised and followed by EOS, and the documents of a split are concatenated into one
token stream, with each token's position inside its document (positions, and so RAM-Net's CAPE shifts, restart
at every document). Training windows are T + 1 consecutive tokens of that stream (inputs the first T, targets the
last T); the window order is a permutation of all windows per epoch, drawn from (data.seed, epoch), so the
batch of a step is a function of (seed, step): a resumed run sees the batches an uninterrupted one would, and
every process builds the same global batch and keeps its rows. The loss mask is 0 only on padding (evaluation
batches padded to full size).

Sources (`data.dataset`): "local_text" (the builder in local_text.py over `data.corpus_dir`, default the Python
standard library) or "tfds:NAME" (any prepared TFDS dataset in `data.data_dir` with a text feature
`data.text_feature`, read through `tfds.data_source`, no TensorFlow).

Provenance: everything prepared from a source lives in `data_dir/<source>-<key>/`, where the key hashes what the
source is (local_text: the corpus directory and validation_percent; tfds:NAME: the name, data_dir and text
feature): the local_text dataset itself, the SentencePiece model and the token streams (one folder per
tokenizer). Its provenance.json records those facts and, for local_text, the corpus fingerprint (files, sizes,
mtimes: ramjax/data/corpus.py); a corpus that changed since is refused with what differs. The task's
`provenance` (facts, fingerprint, tokenizer) goes into each run's record (config.json), so a resume on other
data is refused like any other change.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import NamedTuple

import numpy as np

from ramjax.data.tasks import EvalSlice
from ramjax.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, train_sentencepiece

TOKENIZERS = ("byte", "sentencepiece")


class LMBatch(NamedTuple):
    inputs: np.ndarray  # int32 [batch, time]
    targets: np.ndarray  # int32 [batch, time]
    loss_mask: np.ndarray  # bool [batch, time]
    positions: np.ndarray  # int32 [batch, time]: position inside the document


class Stream(NamedTuple):
    tokens: np.ndarray  # int32 [n]
    positions: np.ndarray  # int32 [n]
    nbytes: np.ndarray  # int32 [n]: bytes of text each token stands for (EOS: 0)
    documents: int


def data_root(d) -> str:
    return os.path.abspath(os.path.expanduser(d.data_dir))


def source_facts(d) -> dict:
    """What the prepared dataset, the tokenizer trained on it and the token streams depend on (besides the
    tokenizer's own settings)."""
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
            raise ValueError(f"data.corpus_dir: {now.get('corpus_dir', d.dataset)} is not what was prepared in "
                             f"{directory} on {recorded.get('prepared', '?')} ({'; '.join(changed)}); delete that "
                             "directory to prepare it again")
    else:
        os.makedirs(directory, exist_ok=True)
        partial = path + f".{os.getpid()}.tmp"
        with open(partial, "w") as f:
            json.dump(dict(now, prepared=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())), f, indent=1)
        os.replace(partial, path)
    return now


def _source(d, split: str):
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
            raise ValueError(f"data.dataset {d.dataset!r}: not prepared in {data_root(d)}; prepare it there first "
                             f"(`tfds build {name} --data_dir {data_root(d)}` on a machine with TensorFlow, with "
                             "--file_format array_record so that reading needs none)")
        return builder.as_data_source(split), d.text_feature
    raise ValueError(f"data.dataset: 'local_text' or 'tfds:NAME', got {d.dataset!r}")


def _texts(d, split: str):
    source, feature = _source(d, split)
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
    raise ValueError(f"data.tokenizer: must be one of {TOKENIZERS}, got {d.tokenizer!r}")


def _tokenizer_tag(tokenizer) -> str:
    if isinstance(tokenizer, ByteTokenizer):
        return "byte"
    with open(tokenizer.model_path, "rb") as f:
        return "spm-" + hashlib.sha1(f.read()).hexdigest()[:12]


def _positions(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """Each token's position inside its document (documents end with EOS)."""
    index = np.arange(len(tokens), dtype=np.int64)
    starts = np.zeros(len(tokens), dtype=np.int64)
    after_eos = np.flatnonzero(tokens[:-1] == eos_id) + 1
    starts[after_eos] = after_eos
    return (index - np.maximum.accumulate(starts)).astype(np.int32)


def load_stream(d, tokenizer, split: str) -> Stream:
    """The packed token stream of `split`, cached under source_dir/streams/ as compressed uint16 tokens when the
    vocabulary fits (the stdlib corpus in bytes: ~31 M tokens, ~15 MB on disk). The cache and provenance.json
    are all that reading needs (numpy, no TFDS): copy the source directory to a machine without TFDS to train
    there (the corpus itself must be there too for local_text, whose fingerprint is checked)."""
    directory = os.path.join(source_dir(d), "streams", _tokenizer_tag(tokenizer))
    path = os.path.join(directory, f"{split}.npz")
    if not os.path.exists(path):
        tokens, documents = [], 0
        for text in _texts(d, split):
            tokens.append(np.append(tokenizer.encode(text), tokenizer.eos_id).astype(np.int32))
            documents += 1
        if not tokens:
            raise ValueError(f"data: the {split!r} split of {d.dataset} has no documents")
        tokens = np.concatenate(tokens)
        stored = tokens.astype(np.uint16) if tokenizer.vocab_size <= 65536 else tokens
        os.makedirs(directory, exist_ok=True)
        partial = path + f".{os.getpid()}.tmp.npz"
        np.savez_compressed(partial, tokens=stored, documents=documents)
        os.replace(partial, path)  # atomic: processes sharing the data dir never read half a file
    with np.load(path) as f:
        tokens, documents = f["tokens"].astype(np.int32), int(f["documents"])
    return Stream(tokens, _positions(tokens, tokenizer.eos_id), tokenizer.token_bytes(tokens).astype(np.int32),
                  documents)


def _window(stream: Stream, index: int, seq_len: int):
    start = index * seq_len
    return (stream.tokens[start:start + seq_len], stream.tokens[start + 1:start + seq_len + 1],
            stream.positions[start:start + seq_len])


class LMTask:
    """The trainer's task interface (train_batch, eval_slices, eval_batches) over packed text."""

    def __init__(self, data_config, *, eval_split: str = "validation"):
        d = self.config = data_config
        if d.tokenizer not in TOKENIZERS:
            raise ValueError(f"data.tokenizer: must be one of {TOKENIZERS}, got {d.tokenizer!r}")
        self.seq_len = int(d.seq_len)
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len: must be >= 2, got {d.seq_len}")
        source = check_provenance(d)
        self.tokenizer = make_tokenizer(d)
        # What this task's data is: recorded with each run (config.json), so a resume on other data is refused.
        self.provenance = dict(source, tokenizer=_tokenizer_tag(self.tokenizer))
        if d.tokenizer == "byte" and d.vocab_size != ByteTokenizer.vocab_size:
            raise ValueError(f"data.vocab_size: the byte tokenizer has {ByteTokenizer.vocab_size} ids, "
                             f"got {d.vocab_size}")
        self.train_settings = self.eval_settings = [(0, self.seq_len)]
        self.eval_split = eval_split
        self.eval_slices = [EvalSlice(f"{eval_split}_len{self.seq_len}", 0, self.seq_len)]
        self._streams = {}
        self._orders = {}

    def stream(self, split: str) -> Stream:
        if split not in self._streams:
            self._streams[split] = load_stream(self.config, self.tokenizer, split)
            if len(self._streams[split].tokens) < self.seq_len + 1:
                raise ValueError(f"data.seq_len: the {split!r} split has {len(self._streams[split].tokens)} "
                                 f"tokens, fewer than one window of {self.seq_len + 1}")
        return self._streams[split]

    @property
    def max_train_len(self) -> int:
        return self.seq_len

    def num_windows(self, split: str) -> int:
        return (len(self.stream(split).tokens) - 1) // self.seq_len

    def train_batch(self, step: int) -> LMBatch:
        stream, n = self.stream("train"), self.num_windows("train")
        flat = step * self.config.batch_size + np.arange(self.config.batch_size)
        epochs, offsets = flat // n, flat % n
        rows = [_window(stream, int(self._epoch_order(int(e), n)[o]), self.seq_len) for e, o in zip(epochs, offsets)]
        inputs, targets, positions = (np.stack(x) for x in zip(*rows))
        return LMBatch(inputs, targets, np.ones_like(inputs, bool), positions)

    def _epoch_order(self, epoch: int, n: int) -> np.ndarray:
        """The window order of `epoch`, drawn from (data.seed, epoch); the last two are kept, so the permutation
        is drawn once per epoch rather than once per step."""
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = np.random.default_rng([self.config.seed, epoch]).permutation(n)
        return self._orders[epoch]

    def eval_batches(self, eval_slice: EvalSlice | None = None):
        """The evaluation split's windows in order, up to data.eval_examples of them (0: all), in batches of
        data.eval_batch_size; the last batch is padded with masked rows."""
        del eval_slice
        stream, n = self.stream(self.eval_split), self.num_windows(self.eval_split)
        limit = n if self.config.eval_examples <= 0 else min(n, self.config.eval_examples)
        size = self.config.eval_batch_size
        for first in range(0, limit, size):
            indices = list(range(first, min(first + size, limit)))
            rows = [_window(stream, i, self.seq_len) for i in indices]
            inputs, targets, positions = (np.stack(x) for x in zip(*rows))
            mask = np.ones_like(inputs, bool)
            pad = size - len(indices)
            if pad:
                inputs, targets, positions, mask = (np.pad(x, ((0, pad), (0, 0))) for x in
                                                    (inputs, targets, positions, mask))
            yield LMBatch(inputs, targets, mask, positions)

    def eval_bytes(self, limit_windows: int | None = None) -> np.ndarray:
        """Bytes of text behind each target of the evaluation windows, [windows, T] (for bits per byte)."""
        stream, n = self.stream(self.eval_split), self.num_windows(self.eval_split)
        limit = n if not limit_windows else min(n, limit_windows)
        return np.stack([stream.nbytes[i * self.seq_len + 1:i * self.seq_len + self.seq_len + 1]
                         for i in range(limit)])


def prepare(config) -> dict:
    """Builds the dataset, trains the tokeniser if it is SentencePiece, and tokenises both splits."""
    task = LMTask(config.data)
    out = {"data_dir": source_dir(config.data), "provenance": task.provenance, "tokenizer": task.tokenizer.name,
           "vocab_size": int(task.tokenizer.vocab_size)}
    for split in ("train", "validation"):
        stream = task.stream(split)
        out[split] = {"documents": stream.documents, "tokens": int(len(stream.tokens)),
                      "bytes": int(stream.nbytes.sum()), "windows": task.num_windows(split)}
    return out


def main(config) -> None:
    """`ramjax prepare --config configs/lm.py`."""
    import json

    if config.get("task") != "lm":
        raise SystemExit("ramjax prepare: the config's task is not 'lm'")
    print(json.dumps(prepare(config), indent=2))
