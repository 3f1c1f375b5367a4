"""A TensorFlow Datasets builder for local text: a directory of .txt / .jsonl / .parquet files, or by default the
Python standard library's own source files (tens of MB of real text on every machine, no download).

  builder = local_text_builder(corpus_dir=None, data_dir="~/ramjax_data/local_text-KEY")   # lm.source_dir
  builder.download_and_prepare(file_format="array_record")   # needs tensorflow-datasets, not TensorFlow
  source = builder.as_data_source("train")                    # random access, no TensorFlow either

Documents: a .txt or .py file is one document; a .jsonl line is one (its "text" field); a .parquet row is one
(its "text" column; needs pyarrow). Each document goes to "validation" when a hash of its identity (path, and
line or row) falls in the first `validation_percent` of the hash range, else to "train": the split is by
document, deterministic, and stable when files are added.
"""

from __future__ import annotations

import hashlib
import json
import os

import tensorflow_datasets as tfds

from ramjax.data import corpus
from ramjax.data.corpus import default_corpus_dir
from ramjax.errors import ConfigError


def list_documents(corpus_dir: str):
    """(identity, text) of every document under corpus_dir, in a fixed order."""
    corpus_dir = os.path.abspath(os.path.expanduser(corpus_dir))
    for path in corpus.corpus_files(corpus_dir):
        relative = os.path.relpath(path, corpus_dir)
        if path.endswith((".txt", ".py")):
            with open(path, encoding="utf-8", errors="replace") as f:
                yield relative, f.read()
        elif path.endswith(".jsonl"):
            yield from _jsonl_documents(path, relative)
        else:  # .parquet
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ValueError(f"{path}: reading .parquet files needs pyarrow (pip install pyarrow)") from None
            for number, text in enumerate(pq.read_table(path, columns=["text"]).column("text").to_pylist()):
                yield f"{relative}:{number}", text


def _jsonl_documents(path: str, relative: str):
    """(identity, text) of each non-blank line of a .jsonl file, {"text": ...} each; a line that is not such an
    object (or not UTF-8) is an error naming the file and line, not a traceback from json."""
    number = 0
    try:
        with open(path, "rb") as f:  # bytes, decoded per line: a decoding error then names its own line
            for number, raw in enumerate(f):
                line = raw.decode("utf-8")
                if line.strip():
                    text = json.loads(line)["text"]
                    if not isinstance(text, str):
                        raise TypeError(f'"text" is a {type(text).__name__}, not a string')
                    yield f"{relative}:{number}", text
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        detail = "no \"text\" field" if isinstance(error, KeyError) else str(error).splitlines()[0][:200]
        raise ConfigError(f"data.corpus_dir: {path} line {number + 1}: each line must be a JSON object with a "
                          f"\"text\" string ({detail})") from None


def split_of(identity: str, validation_percent: float) -> str:
    bucket = int.from_bytes(hashlib.sha1(identity.encode()).digest()[:8], "big") % 1_000_000
    return "validation" if bucket < validation_percent * 10_000 else "train"


def check_splits(corpus_dir: str, validation_percent: float) -> None:
    """Refuses a corpus or validation_percent that would leave a split without documents (TFDS cannot write an
    empty split), before anything is prepared."""
    if not 0 < validation_percent < 100:
        raise ConfigError(f"data.validation_percent: must be in (0, 100), got {validation_percent}")
    counts = {"train": 0, "validation": 0}  # documents with text: an empty file gives a split nothing to read
    for identity, text in list_documents(corpus_dir):
        counts[split_of(identity, validation_percent)] += bool(text)
    empty = [split for split, n in counts.items() if n == 0]
    if empty:
        total = sum(counts.values())
        raise ConfigError(f"data.validation_percent: {validation_percent}% of the {total} documents with text in "
                          f"{corpus_dir} leaves the {' and '.join(empty)} split without text; "
                          + ("add documents (data.corpus_dir)" if total < 2 else "change data.validation_percent"))


class LocalText(tfds.core.GeneratorBasedBuilder):
    """Local text documents, split into train and validation by document."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}

    def __init__(self, *, corpus_dir: str | None = None, validation_percent: float = 1.0, **kwargs):
        self.corpus_dir = corpus_dir or default_corpus_dir()
        self.validation_percent = validation_percent
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "id": tfds.features.Text()}),
            description="Local text documents (by default the Python standard library's sources).",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in ("train", "validation")}

    def _generate_examples(self, split: str):
        for identity, text in list_documents(self.corpus_dir):
            if split_of(identity, self.validation_percent) == split:
                yield identity, {"text": text, "id": identity}


def local_text_builder(*, corpus_dir: str | None, data_dir: str, validation_percent: float = 1.0) -> LocalText:
    return LocalText(corpus_dir=corpus_dir, validation_percent=validation_percent,
                     data_dir=os.path.expanduser(data_dir), file_format="array_record")
