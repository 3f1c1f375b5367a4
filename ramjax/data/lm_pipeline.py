"""The language-model input pipeline on grain: documents from a random-access source, tokenised, packed into
windows, batched per process, and resumable from a checkpoint.

Training, for process p of P (each process builds only its own rows of the global batch):

  documents   grain.MapDataset.source(source): random access over the prepared ArrayRecord files
  shuffle     .shuffle(seed).repeat(): document order is a permutation of the split drawn from (seed + epoch) per
              epoch (grain's index_shuffle: no index array in memory); position g of this endless sequence is the
              "global document position"
  shard       [start + p :: P]: process p reads global positions start + p, start + p + P, ... only; the processes
              read disjoint documents whose union is every epoch
  tokenise    tokens of the text and EOS, each token's position in its document, the bytes it stands for
  workers     data.num_workers > 0: grain worker processes read and tokenise (mp_prefetch); their outputs are
              interleaved back into the process's document order, so the data do not depend on num_workers
  pack        grain's ConcatThenSplit: the documents are concatenated and cut into windows of seq_len + 1 tokens
              (inputs the first seq_len, targets the last seq_len), a document split across windows keeps its
              positions; loss_mask is 0 only on padding (the end of a finite split)
  batch       batch_size // P windows, prefetched (bounded) in a thread

Host memory is bounded: grain reads READ_PREFETCH documents ahead per reader, each worker keeps
WORKER_BUFFER documents, the packer holds at most one window, and BATCH_PREFETCH batches wait; nothing depends
on the size of the split.

Resumption: TrainIterator is a grain DatasetIterator (so grain.checkpoint.CheckpointHandler saves it with Orbax,
one JSON file per process); set_state(get_state()) continues exactly where it stopped (grain's own state of the
reader and the packer) when the layout (process count and index, num_workers, seed, seq_len, rows, start) is
the same. Onto another number of processes or workers, the order is defined by restart_document(states of every
old process): the smallest global document position any old process had not finished, g. Every document
before g was trained on; the new processes read g + p', g + p' + P', ... (`start=g`), so the documents from g up
to each old process's frontier (at most a few batches' worth) are read again and none is skipped.

Evaluation: the split in its stored order, no shuffle, packed the same way, up to eval_examples windows, the
last batch padded with rows whose loss_mask is 0.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterator, NamedTuple

import grain
from absl import flags
import numpy as np

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
    """A document (a dict with the text feature, and its global position) -> token arrays, EOS appended."""

    def __init__(self, tokenizer, feature: str):
        self.tokenizer, self.feature = tokenizer, feature

    def __call__(self, document: int, example) -> dict:
        text = example[self.feature]
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
        tokens = np.append(self.tokenizer.encode(text), self.tokenizer.eos_id).astype(np.int32)
        return {"tokens": tokens, "positions": np.arange(len(tokens), dtype=np.int32),
                "nbytes": self.tokenizer.token_bytes(tokens).astype(np.int32),
                # Carried through packing so the iterator knows which document it is in (restart_document).
                "document": np.full(len(tokens), document, np.int64)}


def window_fields(packed: dict) -> dict:
    """A packed window of seq_len + 1 tokens -> the model's row of seq_len (targets shifted by one)."""
    tokens = packed["tokens"]
    return {"inputs": tokens[:-1], "targets": tokens[1:], "positions": packed["positions"][:-1],
            "loss_mask": packed["tokens_segment_ids"][1:] != 0,  # segment 0 is padding
            "nbytes": packed["nbytes"][1:], "document": packed["document"].max()}


def packed_windows(documents: grain.IterDataset, seq_len: int) -> grain.IterDataset:
    lengths = {name: seq_len + 1 for name in ("tokens", "positions", "nbytes", "document")}
    windows = grain.experimental.ConcatThenSplitIterDataset(documents, length_struct=lengths,
                                                             split_full_length_features=True)
    return windows.map(window_fields)


def check_layout(*, batch_size: int, process_index: int, process_count: int, num_workers: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} of process_count {process_count}: need "
                         "0 <= process_index < process_count")
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(f"data.batch_size: must be a positive multiple of the {process_count} processes, "
                         f"got {batch_size}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"data.num_workers: grain worker processes, an integer >= 0 (0: read in this process), "
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
    batches = packed_windows(documents, seq_len).batch(batch_size // process_count, drop_remainder=True)
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
        self._pipeline[0].set_state(slices_as_tuples(state["pipeline"]))
        self.frontier = int(state["frontier"])


def release(pipeline: list) -> None:
    for iterator in pipeline:
        iterator.close()
    pipeline.clear()


def slices_as_tuples(state: Any) -> Any:
    """grain's packer state after a JSON round trip (the checkpoint): its (start, stop) slices come back as
    lists, and grain tells an empty slice by comparing with the tuple (-1, -1), so they must be tuples again."""
    if isinstance(state, dict):
        return {k: ({f: tuple(v) for f, v in value.items()} if k == "remainder_slices" else slices_as_tuples(value))
                for k, value in state.items()}
    if isinstance(state, list):
        return [slices_as_tuples(v) for v in state]
    return state


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
    windows = packed_windows(documents.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS,
                                                                         prefetch_buffer_size=READ_PREFETCH)),
                             seq_len)
    if limit > 0:
        windows = grain.experimental.LimitIterDataset(windows, count=limit)
    return windows


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
