"""Language modelling data and evaluation: the local-text builder, tokenizers, packing, `ramjax eval`, and one
train step per LM variant. No TensorFlow anywhere on this path."""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from ramjax.data import lm
from ramjax.data.local_text import list_documents, local_text_builder
from ramjax.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, train_sentencepiece
from ramjax.errors import ConfigError
from ramjax.train.trainer import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("configs_lm", ROOT / "configs" / "lm.py")
LM = importlib.util.module_from_spec(spec)
spec.loader.exec_module(LM)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 .txt documents of varied lengths, and a .jsonl file of 10 more."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["memory", "slot", "decay", "token", "attention", "über", "naïve", "λ", "state", "read"]
    (root / "a").mkdir()
    for i in range(40):
        text = " ".join(rng.choice(words, size=int(rng.integers(5, 200)))) + f" #{i}\n"
        (root / "a" / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    with open(root / "more.jsonl", "w", encoding="utf-8") as f:
        for i in range(10):
            f.write(json.dumps({"text": f"json document {i} " + " ".join(rng.choice(words, size=30))}) + "\n")
    return root


def lm_config(corpus, data_dir, variant="ramnet", **data):
    config = LM.get_config(f"{variant},cpu")
    d = config.data
    d.corpus_dir, d.data_dir, d.validation_percent = str(corpus), str(data_dir), 20.0
    d.seq_len, d.batch_size, d.eval_examples, d.eval_batch_size = 32, 4, 6, 4
    for key, value in data.items():
        d[key] = value
    m = config.model
    m.d_model, m.num_heads = 16, 2
    m.ramnet.num_factors, m.ramnet.factor_size, m.ramnet.top_k, m.ramnet.d_v = 2, 4, 2, 8
    m.mamba2.head_dim, m.mamba2.d_state = 8, 8
    m.gated_deltanet.chunk_size = m.mamba2.chunk_size = 8
    m.loglinear.num_levels, m.loglinear.decay_hidden = 6, 8
    config.train.num_steps, config.train.log_every, config.train.eval_every = 2, 1, 2
    config.train.checkpoint_every, config.train.progress = 2, False
    config.optim.warmup_steps = 0
    return config


def test_builder_splits_by_document_deterministically(corpus, tmp_path):
    documents = list(list_documents(str(corpus)))
    assert len(documents) == 50 and documents[0][0] == "more.jsonl:0" and documents[10][0] == "a/doc00.txt"
    sizes = []
    for attempt in range(2):
        builder = local_text_builder(corpus_dir=str(corpus), data_dir=str(tmp_path / f"d{attempt}"),
                                     validation_percent=20.0)
        builder.download_and_prepare()
        splits = {s: builder.as_data_source(s) for s in ("train", "validation")}
        ids = {s: sorted(src[i]["id"] for i in range(len(src))) for s, src in splits.items()}
        sizes.append({s: len(v) for s, v in ids.items()})
        assert not set(ids["train"]) & set(ids["validation"])
        if attempt:
            assert ids == previous
        previous = ids
    assert sizes[0] == sizes[1] and sum(sizes[0].values()) == 50 and 3 <= sizes[0]["validation"] <= 20


def test_byte_tokenizer_round_trips_and_counts_bytes():
    tokenizer = ByteTokenizer()
    text = "naïve λ-decay über\n"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert int(tokenizer.token_bytes(np.append(ids, tokenizer.eos_id)).sum()) == len(text.encode("utf-8"))


def test_sentencepiece_trains_and_round_trips(corpus, tmp_path):
    texts = [text for _, text in list_documents(str(corpus))]
    path = train_sentencepiece(texts, str(tmp_path / "spm.model"), vocab_size=320)
    tokenizer = SentencePieceTokenizer(path)
    assert tokenizer.vocab_size == 320
    for text in texts[:5] + ["unseen: ✓ 漢字 tokens"]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert int(tokenizer.token_bytes(ids).sum()) == len(text.encode("utf-8"))
    assert len(tokenizer.encode(texts[0])) < len(texts[0].encode("utf-8"))  # it does compress


def test_the_task_streams_the_prepared_split_per_process_and_resumes(corpus, tmp_path):
    """LMTask on the local_text builder's ArrayRecord files: per-process rows, positions restarting after EOS,
    the same batches from a second task, a resumable state, and padded evaluation batches covering the split's
    windows (the pipeline itself: tests/test_lm_pipeline.py; in the trainer: tests/test_lm_resume.py)."""
    task = lm.LMTask(lm_config(corpus, tmp_path).data)
    eos = task.tokenizer.eos_id
    whole = task.train_iterator()
    batches = [next(whole) for step in range(6)]
    whole.close()
    for batch in batches:
        assert batch.inputs.shape == batch.positions.shape == (4, 32) and batch.loss_mask.all()
        np.testing.assert_array_equal(batch.targets[:, :-1], batch.inputs[:, 1:])
        after_eos = np.zeros_like(batch.inputs, bool)
        after_eos[:, 1:] = batch.inputs[:, :-1] == eos
        assert np.all(batch.positions[after_eos] == 0)
        inside = ~after_eos[:, 1:]
        assert np.all(np.diff(batch.positions, axis=1)[inside] == 1)
    again = lm.LMTask(lm_config(corpus, tmp_path).data).train_iterator()
    for batch in batches:
        for a, b in zip(batch, next(again)):
            np.testing.assert_array_equal(a, b)
    again.close()
    halves = [task.train_iterator(process, 2) for process in range(2)]
    first = [next(iterator) for iterator in halves]
    assert first[0].inputs.shape == (2, 32)
    assert not np.array_equal(first[0].inputs, first[1].inputs)
    state = json.loads(json.dumps(halves[1].get_state()))
    expected = next(halves[1])
    resumed = task.train_iterator(1, 2)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed).inputs, expected.inputs)
    for iterator in halves + [resumed]:
        iterator.close()
    evals = list(task.eval_batches())
    counts = task.split_counts("validation")
    assert sum(int(b.loss_mask[:, 0].sum()) for b in evals) == min(6, counts["windows"])
    assert all(b.inputs.shape == (4, 32) for b in evals)
    assert counts["documents"] == len(task.source("validation"))


# The mixers the MQAR train tests and the decode tests also build run only in the slow set here; RAM-Net LM
# training runs by default in tests/test_lm_resume.py (its resume test trains a RAM-Net LM), so its step is slow too.
ALSO_COVERED = ("gla", "mamba2", "gated_deltanet", "loglinear_mamba2", "loglinear_gated_deltanet", "hybrid", "ramnet")


@pytest.mark.parametrize("variant", [pytest.param(v, marks=pytest.mark.slow) if v in ALSO_COVERED else v
                                     for v in LM.MODEL_VARIANTS])
def test_one_lm_train_step_per_variant(corpus, tmp_path, variant):
    config = lm_config(corpus, tmp_path / "data", variant)
    config.train.num_steps = 1
    config.train.eval_every = config.train.checkpoint_every = 1
    summary = train(config, str(tmp_path / "run"))
    assert np.isfinite(summary["train"]["loss"])
    assert (tmp_path / "run" / "tokenizer_byte.txt").exists()


# slow: ~23 s on 2 cores (trains a hybrid LM with a SentencePiece tokenizer, as the generate test below does).
@pytest.mark.slow
def test_ramjax_eval_reports_bits_per_byte_and_per_position_loss(corpus, tmp_path):
    from ramjax.evaluate import evaluate_run

    config = lm_config(corpus, tmp_path / "data", "hybrid", tokenizer="sentencepiece", vocab_size=300)
    config.model.vocab_size = 300
    workdir = str(tmp_path / "run")
    train(config, workdir)
    result = evaluate_run(workdir)
    assert result["windows"] == min(6, lm.LMTask(config.data).split_counts("validation")["windows"])
    assert result["tokens"] == result["windows"] * 32
    assert 0 < result["bits_per_byte"] < 20 and len(result["per_position_loss"]) == 32
    assert result["perplexity"] == pytest.approx(np.exp(result["loss"]))
    assert (tmp_path / "run" / "eval_validation.json").exists()
    assert (tmp_path / "run" / "eval_validation.png").stat().st_size > 1000
    assert (tmp_path / "run" / "spm_bpe_300.model").exists()  # the tokenizer travels with the run


def test_eval_refuses_a_non_lm_workdir(tmp_path, capsys):
    from ramjax.errors import ConfigError
    from ramjax.evaluate import evaluate_run

    (tmp_path / "config.json").write_text(json.dumps({"task": "mqar"}))
    with pytest.raises(ConfigError, match="use --settings/--examples"):
        evaluate_run(str(tmp_path))
    with pytest.raises(ConfigError, match="no config.json"):
        evaluate_run(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="--max_windows: 0 .* or a positive count, got -1"):
        evaluate_run(str(tmp_path), max_windows=-1)
    from ramjax.evaluate import main  # the language-model flags on a synthetic run: refused, not ignored

    for flags in (["--split", "train"], ["--max_windows", "3"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["--workdir", str(tmp_path), *flags])
        assert exit_info.value.code == 2
        assert "--split/--max_windows are for language models; this run's task is 'mqar'" in capsys.readouterr().err


def test_prepared_data_is_keyed_by_its_source_and_a_changed_corpus_is_refused(corpus, tmp_path):
    """Another corpus or validation_percent in the same data_dir is another prepared dataset (the issue's case:
    prepare one corpus, then another, and get the first); a corpus changed since it was prepared is refused
    with what differs; the run's record holds the provenance, so a resume on other data is refused too."""
    import shutil

    mine = tmp_path / "mine"
    shutil.copytree(corpus, mine)
    data_dir = tmp_path / "data"
    a = lm.LMTask(lm_config(mine, data_dir).data)
    b = lm.LMTask(lm_config(mine, data_dir, validation_percent=40.0).data)
    c = lm.LMTask(lm_config(corpus, data_dir).data)
    assert len({lm.source_dir(t.config) for t in (a, b, c)}) == 3
    assert len(a.source("validation")) != len(b.source("validation"))
    assert a.provenance["corpus_dir"] == str(mine) and a.provenance["files"] == 41

    config = lm_config(mine, data_dir)
    workdir = tmp_path / "run"
    train(config, str(workdir))
    recorded = json.loads((workdir / "config.json").read_text())["data_provenance"]
    assert recorded["fingerprint"] == a.provenance["fingerprint"] and recorded["tokenizer"] == "byte"

    (mine / "a" / "new.txt").write_text("one more document\n")
    with pytest.raises(ValueError, match=r"is not what was prepared in .*files: 41 -> 42"):
        lm.LMTask(lm_config(mine, data_dir).data)


def test_prepare_warns_when_the_validation_split_is_smaller_than_evaluation_asks(corpus, tmp_path, capsys):
    """A corpus whose held-out documents give fewer windows than data.eval_examples is prepared, with a warning
    naming the counts and the fields to change (seen: a GPU image's 575-file standard library gave 5 windows)."""
    config = lm_config(corpus, tmp_path / "data")
    config.data.eval_examples = 1
    first = lm.prepare(config)
    windows = first["validation"]["windows"]
    assert windows >= 1 and "warning" not in first
    config.data.eval_examples = windows + 1
    out = lm.prepare(config)
    assert f"has {windows} windows of 32 tokens, fewer than data.eval_examples = {windows + 1}" in out["warning"]
    assert "data.validation_percent (now 20.0)" in capsys.readouterr().err


def test_a_split_left_empty_is_refused_before_preparing(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    for i in range(3):
        (small / f"d{i}.txt").write_text(f"document {i}\n")
    config = lm_config(small, tmp_path / "data", validation_percent=0.001)
    with pytest.raises(ValueError, match=r"data.validation_percent: 0.001% of the 3 documents with text .* leaves "
                                         r"the validation split without text"):
        lm.LMTask(config.data).source("train")
    empty = tmp_path / "empty"  # files without text: no split has anything to read (was prepared, and scored 0)
    empty.mkdir()
    for i in range(4):
        (empty / f"d{i}.txt").write_text("")
    with pytest.raises(ValueError, match=r"of the 0 documents with text .* leaves the train and validation split "
                                         r"without text; add documents"):
        lm.LMTask(lm_config(empty, tmp_path / "data_empty", validation_percent=50.0).data).source("train")


@pytest.mark.parametrize("line,detail", [(b'{"text": "a\xff"}\n', "can't decode"), (b'{"txt": "a"}\n', 'no "text"'),
                                         (b'{"text": "a\n', "line 1 column"), (b'{"text": 3}\n', "is a int")])
def test_a_bad_jsonl_line_is_named_with_its_file_and_line(tmp_path, line, detail):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "d.jsonl").write_bytes(b'{"text": "fine"}\n' + line)
    config = lm_config(corpus, tmp_path / "data", validation_percent=50.0)
    with pytest.raises(ConfigError, match=r"data.corpus_dir: .*d.jsonl line 2: each line must be a JSON object "
                                          r'with a "text" string \(.*' + re.escape(detail)):
        lm.LMTask(config.data).source("train")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_a_prepared_tfds_dataset_reads_by_name(corpus, tmp_path):
    """data.dataset = "tfds:NAME" reads any prepared TFDS dataset from data_dir (here the local_text one, from the
    folder it was prepared in)."""
    missing = lm.LMTask(lm_config(corpus, tmp_path, dataset="tfds:local_text").data)
    with pytest.raises(ValueError, match="not prepared in"):
        missing.source("validation")
    by_builder = lm.LMTask(lm_config(corpus, tmp_path).data)
    by_builder.source("validation")  # prepares local_text in data_dir/local_text-<key>
    prepared_in = lm.source_dir(by_builder.config)
    by_name = lm.LMTask(lm_config(corpus, prepared_in, dataset="tfds:local_text").data)
    for a, b in zip(by_name.eval_batches(), by_builder.eval_batches()):
        np.testing.assert_array_equal(a.inputs, b.inputs)
    first = [task.train_iterator() for task in (by_name, by_builder)]
    np.testing.assert_array_equal(next(first[0]).inputs, next(first[1]).inputs)
    for iterator in first:
        iterator.close()


# slow: ~26 s on 2 cores (a subprocess that trains nothing but imports, restores and decodes); decoding itself
# (prefill + decode == the full forward pass, every mixer) is tests/test_decode.py's, in the default run.
@pytest.mark.slow
def test_ramjax_generate_prints_a_continuation(corpus, tmp_path):
    """`ramjax generate` on a tiny trained LM (SentencePiece tokenizer, a hybrid) in a subprocess: text, no
    traceback; a batch of prompts from a file gives one continuation each."""
    config = lm_config(corpus, tmp_path / "data", "hybrid", tokenizer="sentencepiece", vocab_size=300)
    config.model.vocab_size = 300
    workdir = str(tmp_path / "run")
    train(config, workdir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("memory slot\n\nthe state decays\n", encoding="utf-8")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "ramjax.cli", "generate", "--workdir", workdir, "--prompt_file",
                           str(prompts), "--max_new_tokens", "6", "--temperature", "0.8", "--seed", "1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.count("--- ") == 2 and "memory slot" in done.stdout and "the state decays" in done.stdout


def test_ramjax_generate_refuses_bad_input_in_one_line(tmp_path, capsys):
    from ramjax.generate import main

    (tmp_path / "mqar").mkdir()
    (tmp_path / "mqar" / "config.json").write_text(json.dumps({"task": "mqar"}))
    for argv, needle in ((["--workdir", str(tmp_path / "missing"), "--prompt", "x"], "no config.json"),
                         (["--workdir", str(tmp_path / "mqar"), "--prompt", "x"], "needs a language model"),
                         (["--workdir", str(tmp_path / "mqar"), "--prompt", ""], "a prompt is empty"),
                         (["--workdir", str(tmp_path / "mqar")], "give a prompt")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        message = capsys.readouterr().err.strip()  # one line on stderr, exit status 2 (a usage error)
        assert exit_info.value.code == 2
        assert message.startswith("ramjax generate: ") and needle in message and "\n" not in message, message
