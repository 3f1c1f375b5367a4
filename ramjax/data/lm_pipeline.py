"""The language-model input pipeline on grain: documents from a random-access source, tokenised, packed into
windows, batched per process, and resumable from a checkpoint.

Training, for process p of P (each process builds only its own rows of the global batch):

  documents   grain.MapDataset.source(source): random access over the prepared ArrayRecord files
  shuffle     .shuffle(seed).repeat(): document order is a permutation of the split drawn from (seed + epoch) per
              epoch (grain's index_shuffle: no index array in memory); position g of this endless sequence is the
              "global document position"
  shard       [start + p :: P]: process p reads global positions start + p, start + p + P, ... only; the processes
              read disjoint documents whose union is every epoch
  tokenise    the tokens of the text and EOS (int32), with the document's global position
  workers     data.num_workers > 0: grain worker processes read and tokenise (mp_prefetch); their outputs are
              interleaved back into the process's document order, so the data do not depend on num_workers
  pack        Pack: the documents are concatenated and cut into windows of seq_len + 1 tokens (inputs the first
              seq_len, targets the last seq_len), batch_size // P windows at a time into one [rows, seq_len + 1]
              block (numpy work per document and per batch, none per window); each token's position in its
              document is filled in here, so a document split across windows keeps its positions; loss_mask is
              0 only on padding (the end of a finite split)
  prefetch    BATCH_PREFETCH batches packed ahead in a thread

Host memory is bounded: grain reads READ_PREFETCH documents ahead per reader, each worker keeps
WORKER_BUFFER documents, the packer holds the document it is cutting and the batch it is filling, and
BATCH_PREFETCH batches wait; nothing depends on the size of the split.

Resumption: TrainIterator is a grain DatasetIterator (so grain.checkpoint.CheckpointHandler saves it with Orbax,
one JSON file per process); set_state(get_state()) continues exactly where it stopped (the packer's state: grain's
state of the reader before the document being cut, and how many of its tokens are packed) when the layout
(process count and index, num_workers, seed, seq_len, rows, start) is the same; states saved while grain's
ConcatThenSplit packed (before Pack) restore to the same batches too. Onto another number of processes or workers,
the order is defined by restart_document(states of every old process): the smallest global document position any
old process had not finished, g. Every document before g was trained on; the new processes read g + p',
g + p' + P', ... (`start=g`), so the documents from g up to each old process's frontier (at most a few batches'
worth) are read again and none is skipped.

Evaluation: the split in its stored order, no shuffle, packed the same way one window at a time, up to
eval_examples windows, with the bytes of text behind each target (nbytes, for bits per byte; 0 on padding), the
last batch padded with rows whose loss_mask is 0.
"""

from __future__ import annotations

import weakref
from typing import Iterator, NamedTuple

import grain
from absl import flags
import numpy as np

from ramjax.errors import ConfigError

READ_THREADS = 4  # threads reading and tokenising documents per process (or per worker)
READ_PREFETCH = 32  # documents read ahead per process (or per worker)
WORKER_BUFFER = 64  # tokenised documents each worker process holds ready
BATCH_PREFETCH = 2  # batches packed ahead of the training step


class LMBatch(NamedTuple):
    inputs: np.ndarray  # int32 [batch, time]
    targets: np.ndarray  # int32 [batch, time]
    loss_mask: np.ndarray  # bool [batch, time]
    positions: np.ndarray  # int32 [batch, time]: position inside the document


class Tokenize:
    """A document (a dict with the text feature, and its global position) -> its tokens, EOS appended, and that
    position (carried through packing so the iterator knows which document it is in: restart_document)."""

    def __init__(self, tokenizer, feature: str):
        self.tokenizer, self.feature = tokenizer, feature

    def __call__(self, document: int, example) -> dict:
        text = example[self.feature]
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
        tokens = np.append(self.tokenizer.encode(text), self.tokenizer.eos_id).astype(np.int32)
        return {"tokens": tokens, "document": document}


class Pack(grain.IterDataset):
    """The documents' tokens concatenated and cut into blocks of `shape` (seq_len + 1: one window; (rows,
    seq_len + 1): a batch of windows): {"tokens", "positions" (in the document), "document" (its global position),
    "real" (False on padding)}, each an array of `shape`. At the end of a finite stream the last block is padded
    with zeros. The same windows as grain's ConcatThenSplitIterDataset (which this replaced), but Python work per
    document and per block only: grain's did it per window and per packed feature (~2.7 ms of ~4 ms a batch of
    32 x 1024, experiments/results/input_throughput_cpu.md)."""

    def __init__(self, parent: grain.IterDataset, shape: tuple[int, ...]):
        super().__init__(parent)
        self.shape = shape

    def __iter__(self) -> grain.DatasetIterator:
        return PackIterator(self._parent.__iter__(), self.shape)


class PackIterator(grain.DatasetIterator):
    """State: the parent's state before the document being cut, and how many of its tokens are packed."""

    def __init__(self, parent: grain.DatasetIterator, shape: tuple[int, ...]):
        super().__init__(parent)
        self.shape, self.size = shape, int(np.prod(shape))
        self.document, self.document_state, self.offset = None, None, 0

    def __next__(self) -> dict:
        block = {"tokens": np.zeros(self.size, np.int32), "positions": np.zeros(self.size, np.int32),
                 "document": np.zeros(self.size, np.int64)}
        filled = 0
        while filled < self.size:
            if self.document is None:
                state = self._parent.get_state()
                try:
                    self.document = next(self._parent)
                except StopIteration:
                    break
                self.document_state = state
            piece = self.document["tokens"][self.offset:self.offset + self.size - filled]
            end = filled + len(piece)
            block["tokens"][filled:end] = piece
            block["positions"][filled:end] = np.arange(self.offset, self.offset + len(piece))
            block["document"][filled:end] = self.document["document"]
            filled, self.offset = end, self.offset + len(piece)
            if self.offset >= len(self.document["tokens"]):
                # Beyond its end only after restoring a ConcatThenSplit state: the excess skips the next documents.
                self.document, self.offset = None, self.offset - len(self.document["tokens"])
        if not filled:
            raise StopIteration
        block["real"] = np.arange(self.size) < filled
        return {name: values.reshape(self.shape) for name, values in block.items()}

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state() if self.document is None else self.document_state,
                "offset": self.offset}

    def set_state(self, state: dict) -> None:
        if "remainder_slices" in state:
            # Saved by grain's ConcatThenSplit (before this packer): its parent's state before the document in
            # progress, where the rest of that document starts ((-1, -1): at 0), and the windows since.
            start = state["remainder_slices"]["tokens"][0]
            state = {"parent": state["parent_state"],
                     "offset": max(start, 0) + state["elements_from_buffer_after_checkpoint"] * self.shape[-1]}
        self._parent.set_state(state["parent"])
        self.document, self.offset = None, state["offset"]


def model_rows(packed: dict) -> dict:
    """Packed windows (one [seq_len + 1], or a batch [rows, seq_len + 1]) -> the model's rows of seq_len
    (targets shifted by one) and the document of each row's last token."""
    tokens = packed["tokens"]
    # Contiguous copies, as the rows were when grain's batching stacked them.
    return {"inputs": np.ascontiguousarray(tokens[..., :-1]), "targets": np.ascontiguousarray(tokens[..., 1:]),
            "positions": np.ascontiguousarray(packed["positions"][..., :-1]), "loss_mask": packed["real"][..., 1:],
            "document": packed["document"].max(axis=-1)}  # documents only grow along the stream; padding is 0


def check_layout(*, batch_size: int, process_index: int, process_count: int, num_workers: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} of process_count {process_count}: need "
                         "0 <= process_index < process_count")
    if batch_size < 1 or batch_size % process_count:
        raise ConfigError(f"data.batch_size: must be a positive multiple of the {process_count} processes, "
                          f"got {batch_size}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"data.num_workers: grain worker processes, an integer >= 0 (0: read in this process), "
                          f"got {num_workers!r}")


def train_dataset(source, feature: str, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                  process_index: int, process_count: int, num_workers: int = 0, start: int = 0) -> grain.IterDataset:
    """This process's endless stream of training batches (dicts of [batch_size // process_count, ...] arrays,
    with each row's global document position under "document"); see the module docstring."""
    check_layout(batch_size=batch_size, process_index=process_index, process_count=process_count,
                 num_workers=num_workers)
    if len(source) == 0:
        raise ValueError("data: the train split has no documents")
    documents = grain.MapDataset.source(source).shuffle(seed=seed % 2**32).repeat()
    documents = documents.map_with_index(lambda index, example: (index, example))
    documents = documents[start + process_index::process_count]
    tokenize = Tokenize(tokenizer, feature)
    documents = documents.map(lambda pair: tokenize(*pair))
    read = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_PREFETCH)
    documents = documents.to_iter_dataset(read)
    if num_workers:
        # grain's workers read absl flags, which no ramjax command parses (they are flags of absl.app programs).
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        documents = documents.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                                       per_worker_buffer_size=WORKER_BUFFER))
    batches = Pack(documents, (batch_size // process_count, seq_len + 1)).map(model_rows)
    return grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=BATCH_PREFETCH)


def as_batch(rows: dict) -> LMBatch:
    return LMBatch(rows["inputs"], rows["targets"], rows["loss_mask"], rows["positions"])


class TrainIterator(grain.DatasetIterator):
    """LMBatch after LMBatch of this process's rows; get_state()/set_state() for the checkpoint (a JSON-able
    dict: grain's state of the pipeline, the layout it belongs to, and the frontier for restart_document)."""

    def __init__(self, dataset: grain.IterDataset, layout: dict):
        super().__init__()
        # Held in a list that close() (and, at the latest, interpreter exit) empties: grain's prefetch thread is
        # then stopped and collected while the modules its clean-up needs still exist.
        self._pipeline = []
        self._finalizer = weakref.finalize(self, release, self._pipeline)
        self._pipeline.append(iter(dataset))
        self.layout = dict(layout)
        # The document in progress: every document of this process before it was trained on.
        self.frontier = layout["start"] + layout["process_index"]

    def __next__(self) -> LMBatch:
        rows = next(self._pipeline[0])
        self.frontier = int(rows["document"][-1])
        return as_batch(rows)

    def start_prefetch(self) -> None:
        self._pipeline[0].start_prefetch()

    def close(self) -> None:
        self._finalizer()

    def get_state(self) -> dict:
        return {"pipeline": self._pipeline[0].get_state(), "layout": self.layout, "frontier": self.frontier}

    def set_state(self, state: dict) -> None:
        if state["layout"] != self.layout:
            changed = {k: (state["layout"].get(k), v) for k, v in self.layout.items() if state["layout"].get(k) != v}
            raise ValueError(f"data iterator state: saved with another layout ({changed}, as (saved, now)); "
                             "restore onto another number of processes or data.num_workers with "
                             "lm_pipeline.restart_document(states of every saved process) as the start")
        self._pipeline[0].set_state(state["pipeline"])
        self.frontier = int(state["frontier"])


def release(pipeline: list) -> None:
    for iterator in pipeline:
        iterator.close()
    pipeline.clear()


def restart_document(states: list[dict]) -> int:
    """The global document position to restart from on another layout, from the saved state of every process
    of the old one: the smallest document any of them had not finished (see the module docstring)."""
    counts = {s["layout"]["process_count"] for s in states}
    if len(counts) != 1 or len(states) != counts.pop():
        raise ValueError(f"restart_document: needs the state of every process of one run, got {len(states)} "
                         f"states of runs with {sorted({s['layout']['process_count'] for s in states})} processes")
    return min(int(s["frontier"]) for s in states)


def eval_windows(source, feature: str, tokenizer, *, seq_len: int, limit: int = 0) -> grain.IterDataset:
    """The windows of a split in stored order (at most `limit`, 0: all): dicts of [seq_len] arrays."""
    if len(source) == 0:
        raise ValueError("data: the evaluation split has no documents")
    tokenize = Tokenize(tokenizer, feature)
    documents = grain.MapDataset.source(source).map_with_index(tokenize)
    documents = documents.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS,
                                                            prefetch_buffer_size=READ_PREFETCH))
    windows = Pack(documents, (seq_len + 1,)).map(lambda packed: eval_row(packed, tokenizer))
    if limit > 0:
        windows = grain.experimental.LimitIterDataset(windows, count=limit)
    return windows


def eval_row(packed: dict, tokenizer) -> dict:
    """A packed window -> the model's row, with the bytes of text behind each target (0 on padding)."""
    row = model_rows(packed)
    row["nbytes"] = np.where(row["loss_mask"], tokenizer.token_bytes(row["targets"]), 0).astype(np.int32)
    return row


def padded_batches(windows: Iterator[dict], batch_size: int) -> Iterator[LMBatch]:
    """Batches of batch_size windows; the last one padded with rows whose loss_mask is 0."""
    rows = []
    for window in windows:
        rows.append(window)
        if len(rows) == batch_size:
            yield as_batch({k: np.stack([r[k] for r in rows]) for k in ("inputs", "targets", "loss_mask",
                                                                          "positions")})
            rows = []
    if rows:
        stacked = {k: np.stack([r[k] for r in rows]) for k in ("inputs", "targets", "loss_mask", "positions")}
        pad = batch_size - len(rows)
        yield as_batch({k: np.pad(v, ((0, pad), (0, 0))) for k, v in stacked.items()})
