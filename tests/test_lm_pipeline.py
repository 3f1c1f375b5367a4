"""The grain language-model pipeline (ramjax/data/lm_pipeline.py) on in-memory sources: sharding by process,
packing, determinism, resumption, bounded host memory and evaluation padding."""

import json
import os
import subprocess
import sys
import textwrap

import grain
import numpy as np
import pytest

from ramjax.data import lm_pipeline
from ramjax.data.tokenizers import ByteTokenizer

TOKENIZER = ByteTokenizer()
EOS = TOKENIZER.eos_id
SEQ_LEN = 16


def tagged_documents(n: int) -> list[dict]:
    """n documents "<i>" + filler of lengths 0..70 (many shorter than a window, some several windows long)."""
    rng = np.random.default_rng(0)
    return [{"text": f"<{i}>" + "ab c" * int(rng.integers(0, 18))} for i in range(n)]


def train_iterator(source, *, process_index=0, process_count=1, batch_size=4, seed=0, num_workers=0, start=0):
    dataset = lm_pipeline.train_dataset(source, "text", TOKENIZER, seq_len=SEQ_LEN, batch_size=batch_size,
                                        seed=seed, process_index=process_index, process_count=process_count,
                                        num_workers=num_workers, start=start)
    layout = {"process_index": process_index, "process_count": process_count, "num_workers": num_workers,
              "seed": seed, "start": start}
    return lm_pipeline.TrainIterator(dataset, layout)


def token_stream(batches) -> tuple[np.ndarray, np.ndarray]:
    """The tokens the windows were cut from (each window: its inputs and its last target) and the positions of
    the input tokens, in the same layout with -1 at each window's last token."""
    tokens, positions = [], []
    for batch in batches:
        for inputs, targets, pos in zip(batch.inputs, batch.targets, batch.positions):
            tokens.append(np.append(inputs, targets[-1]))
            positions.append(np.append(pos, -1))
    return np.concatenate(tokens), np.concatenate(positions)


def documents_in(tokens: np.ndarray) -> list[int]:
    """The tags of the complete documents in a token stream (the one cut at its start is left out)."""
    ends = np.flatnonzero(tokens == EOS)
    texts = [TOKENIZER.decode(tokens[a + 1:b]) for a, b in zip(ends[:-1], ends[1:])]
    first = TOKENIZER.decode(tokens[:ends[0]]) if len(ends) else ""
    texts = ([first] if first.startswith("<") else []) + texts
    return [int(t[1:t.index(">")]) for t in texts]


def take(iterator, n: int) -> list:
    return [next(iterator) for _ in range(n)]


def test_two_processes_read_disjoint_documents_whose_union_is_each_epoch():
    source = tagged_documents(40)
    per_process = []
    for process in range(2):
        iterator = train_iterator(source, process_index=process, process_count=2, batch_size=4)
        documents = documents_in(token_stream(take(iterator, 60))[0])
        assert len(documents) >= 40, "read past the second epoch"
        per_process.append(documents)
    first_epoch = [documents[:20] for documents in per_process]
    assert not set(first_epoch[0]) & set(first_epoch[1])
    assert sorted(first_epoch[0] + first_epoch[1]) == list(range(40))
    second_epoch = [documents[20:40] for documents in per_process]
    assert sorted(second_epoch[0] + second_epoch[1]) == list(range(40))
    assert second_epoch != first_epoch  # each epoch is another permutation
    # Each process yields its own rows: batch_size // process_count of them.
    assert next(train_iterator(source, process_index=1, process_count=2, batch_size=4)).inputs.shape == (2, SEQ_LEN)


def test_packing_keeps_every_token_with_positions_restarting_after_eos():
    source = tagged_documents(30)
    batches = take(train_iterator(source), 40)
    for batch in batches:
        assert batch.inputs.shape == batch.targets.shape == batch.positions.shape == (4, SEQ_LEN)
        assert batch.inputs.dtype == np.int32 and batch.loss_mask.dtype == bool
        assert batch.loss_mask.all()  # training windows are full: no padding
        np.testing.assert_array_equal(batch.targets[:, :-1], batch.inputs[:, 1:])
    tokens, positions = token_stream(batches)
    # The stream is whole documents, each followed by EOS, with nothing dropped or added.
    ends = np.flatnonzero(tokens == EOS)
    for a, b in zip(ends[:-1], ends[1:]):
        text = TOKENIZER.decode(tokens[a + 1:b])
        assert text == source[int(text[1:text.index(">")])]["text"]
    # Positions: 0 at the first token after each EOS, +1 from there (across window boundaries too) to the EOS.
    expected = np.zeros(len(tokens), np.int64)
    for t in range(1, len(tokens)):
        expected[t] = 0 if tokens[t - 1] == EOS else expected[t - 1] + 1
    known = positions >= 0  # the last token of each window is only a target
    np.testing.assert_array_equal(positions[known], expected[known])


def test_the_order_is_a_function_of_the_seed():
    source = tagged_documents(30)
    a, b, c = (take(train_iterator(source, seed=seed), 12) for seed in (3, 3, 4))
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)
    assert not all(np.array_equal(x.inputs, y.inputs) for x, y in zip(a, c))


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_mid_epoch_from_a_saved_state_equals_an_uninterrupted_run(num_workers):
    source = tagged_documents(30)
    uninterrupted = take(train_iterator(source, num_workers=num_workers), 25)
    for stop in (1, 7, 13):  # mid-document and mid-epoch (an epoch is ~12 batches here)
        first = train_iterator(source, num_workers=num_workers)
        take(first, stop)
        state = json.loads(json.dumps(first.get_state()))  # as the checkpoint stores it
        first.close()
        resumed = train_iterator(source, num_workers=num_workers)
        resumed.set_state(state)
        for expected, got in zip(uninterrupted[stop:], take(resumed, 25 - stop)):
            for u, v in zip(expected, got):
                np.testing.assert_array_equal(u, v)
        resumed.close()


@pytest.mark.slow
def test_worker_processes_do_not_change_the_data():
    source = tagged_documents(30)
    for x, y in zip(take(train_iterator(source), 15), take(train_iterator(source, num_workers=2), 15)):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)


def test_restoring_onto_another_number_of_processes_restarts_at_the_first_unfinished_document():
    source = tagged_documents(40)
    old = [train_iterator(source, process_index=p, process_count=2) for p in range(2)]
    read = [documents_in(token_stream(take(iterator, 5))[0]) for iterator in old]
    states = [iterator.get_state() for iterator in old]
    with pytest.raises(ValueError, match="another layout"):
        train_iterator(source).set_state(states[0])
    g = lm_pipeline.restart_document(states)
    # The document at each global position: the shuffled, repeated order the processes shard.
    order = grain.MapDataset.range(40).shuffle(seed=0).repeat()
    assert {order[q] for q in range(g)} <= set(read[0] + read[1])  # every document before g was read whole
    new = train_iterator(source, start=g)
    assert documents_in(token_stream(take(new, 3))[0])[:3] == [order[g], order[g + 1], order[g + 2]]
    with pytest.raises(ValueError, match="every process"):
        lm_pipeline.restart_document(states[:1])


def test_evaluation_windows_are_the_split_in_order_and_the_last_batch_is_padded():
    source = tagged_documents(13)
    windows = list(lm_pipeline.eval_windows(source, "text", TOKENIZER, seq_len=SEQ_LEN))
    # Each window's tokens up to its padding: the first, and one more per unmasked target.
    tokens = np.concatenate([np.append(w["inputs"], w["targets"][-1])[:1 + w["loss_mask"].sum()] for w in windows])
    text = "".join(d["text"] for d in source)
    assert TOKENIZER.decode(tokens) == text  # EOS decodes to nothing
    assert int((tokens == EOS).sum()) == 13
    assert windows[0]["loss_mask"].all() and not windows[-1]["loss_mask"].all()
    padding = ~windows[-1]["loss_mask"]
    assert np.all(np.diff(padding.astype(int)) >= 0)  # the padding is the window's tail
    assert windows[-1]["nbytes"][padding].sum() == 0
    batches = list(lm_pipeline.padded_batches(iter(windows), 5))
    assert all(b.inputs.shape == (5, SEQ_LEN) for b in batches)
    assert sum(int(b.loss_mask[:, 0].sum()) for b in batches) == len(windows) - (not windows[-1]["loss_mask"][0])
    pad_rows = 5 * len(batches) - len(windows)
    assert pad_rows > 0 and not batches[-1].loss_mask[5 - pad_rows:].any()
    limited = list(lm_pipeline.eval_windows(source, "text", TOKENIZER, seq_len=SEQ_LEN, limit=3))
    assert len(limited) == 3 and all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(limited, windows))


class SyntheticText:
    """A random-access corpus of `documents` documents of up to `longest` random letters, each made from its
    index when asked for: nothing of it is in memory."""

    def __init__(self, documents: int, longest: int = 8000):
        self.documents, self.longest = documents, longest

    def __len__(self) -> int:
        return self.documents

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng(index)
        return {"text": rng.integers(97, 123, int(rng.integers(1, self.longest)), dtype=np.uint8).tobytes()}


@pytest.mark.parametrize("budget_kb, read_ahead", [(1024, 1), pytest.param(8192, lm_pipeline.READ_PREFETCH,
                                                                      marks=pytest.mark.slow)])
def test_host_memory_does_not_grow_with_the_corpus(monkeypatch, budget_kb, read_ahead):
    """One epoch of a corpus 10x the budget (Python and numpy allocations, traced by tracemalloc): the peak
    stays under the budget, so it is the pipeline's buffers (documents read ahead, one window being packed,
    the batches waiting), not the data, that take memory. The fast case reads one document ahead."""
    import tracemalloc

    monkeypatch.setattr(lm_pipeline, "READ_PREFETCH", read_ahead)
    monkeypatch.setattr(lm_pipeline, "READ_THREADS", min(read_ahead, lm_pipeline.READ_THREADS))
    budget = budget_kb << 10
    source = SyntheticText(documents=10 * budget // 4000)  # mean 4000 bytes: 10x the budget
    dataset = lm_pipeline.train_dataset(source, "text", TOKENIZER, seq_len=1024, batch_size=4, seed=0,
                                        process_index=0, process_count=1)
    iterator = lm_pipeline.TrainIterator(dataset, {"start": 0, "process_index": 0})
    next(iterator)
    tracemalloc.start()
    try:
        streamed = 0
        while streamed < 10 * budget:
            streamed += next(iterator).inputs.size
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        iterator.close()
    assert peak < budget, f"traced peak {peak / 2**20:.2f} MB while streaming {streamed / 2**20:.0f} MB of tokens"


@pytest.mark.slow
def test_resident_memory_of_a_process_streaming_a_large_corpus_stays_bounded(tmp_path):
    """A fresh process streams 160 MB of tokens, 10x a 16 MB budget (0 and 2 workers): its peak resident set grows
    by less than the budget after the first batch, and no worker's peak exceeds the main process's at its first
    batch by more than the budget (resource.getrusage; grain's own threads and buffers included)."""
    script = tmp_path / "stream.py"
    script.write_text(textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_lm_pipeline import SyntheticText, TOKENIZER
        from ramjax.data import lm_pipeline

        def main():
            workers = int(sys.argv[1])
            dataset = lm_pipeline.train_dataset(SyntheticText(100_000), "text", TOKENIZER, seq_len=1024,
                                                batch_size=32, seed=0, process_index=0, process_count=1,
                                                num_workers=workers)
            iterator = lm_pipeline.TrainIterator(dataset, {{"start": 0, "process_index": 0}})
            next(iterator)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            streamed = 0
            while streamed < 160 << 20:
                streamed += next(iterator).inputs.size
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            iterator.close()  # joins the workers, so their peak is in RUSAGE_CHILDREN
            print(before, after, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)

        if __name__ == "__main__":
            main()
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(__file__)),
                                                                    os.environ.get("PYTHONPATH")])))
    for workers in (0, 2):
        done = subprocess.run([sys.executable, str(script), str(workers)], capture_output=True, text=True,
                              env=env, timeout=600)
        assert done.returncode == 0, done.stderr
        before, after, worker = (int(x) for x in done.stdout.split()[-3:])  # kB
        assert after - before < 16 << 10, f"{workers} workers: peak RSS {before >> 10} -> {after >> 10} MB"
        assert worker - before < 16 << 10, f"{workers} workers: a worker's peak RSS {worker >> 10} MB"


def test_pack_cuts_the_windows_grains_concat_then_split_did_and_resumes_from_its_states():
    """Pack replaced grain's ConcatThenSplit: the same windows (the last one padded) and, from a state grain's
    packer saved (a checkpoint from before, JSON round trip included), the same windows onwards."""
    tokenize = lm_pipeline.Tokenize(TOKENIZER, "text")
    documents = grain.MapDataset.source(tagged_documents(13)).map_with_index(tokenize).to_iter_dataset()
    grains = grain.experimental.ConcatThenSplitIterDataset(documents.map(lambda d: {"tokens": d["tokens"]}),
                                                           length_struct={"tokens": SEQ_LEN + 1})
    expected = list(grains)
    windows = list(lm_pipeline.Pack(documents, (SEQ_LEN + 1,)))
    assert len(windows) == len(expected) > 10
    for w, e in zip(windows, expected):
        np.testing.assert_array_equal(w["tokens"], e["tokens"])
        np.testing.assert_array_equal(w["real"], e["tokens_segment_ids"] != 0)
    for stop in range(len(expected)):
        old = iter(grains)
        take(old, stop)
        state = json.loads(json.dumps(old.get_state()))
        new = iter(lm_pipeline.Pack(documents, (SEQ_LEN + 1,)))
        new.set_state(state)
        for w, e in zip(new, windows[stop:], strict=True):
            for k in w:
                np.testing.assert_array_equal(w[k], e[k])
