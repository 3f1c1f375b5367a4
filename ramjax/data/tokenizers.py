"""Tokenisers for language modelling: bytes (nothing to train or download) and SentencePiece (trained from the
corpus with `ramjax prepare`). Both report, per token, how many bytes of text it stands for, so evaluation can
give bits per byte whatever the tokeniser.

Special ids: the byte tokeniser uses 0..255 for bytes, then PAD = 256, EOS = 257 (vocabulary 258). SentencePiece
models are trained with pad 0, unk 1, bos 2, eos 3 (`--pad_id=0` ...), and EOS separates documents.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np


class ByteTokenizer:
    name = "byte"
    pad_id, eos_id = 256, 257
    vocab_size = 258

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def token_bytes(self, ids: np.ndarray) -> np.ndarray:
        return (np.asarray(ids) < 256).astype(np.int32)

    def save(self, directory: str) -> str:
        path = os.path.join(directory, "tokenizer_byte.txt")
        with open(path, "w") as f:
            f.write("byte tokenizer: ids 0-255 bytes, 256 pad, 257 eos\n")
        return path


class SentencePieceTokenizer:
    name = "sentencepiece"
    pad_id, eos_id = 0, 3

    def __init__(self, model_path: str):
        import sentencepiece as spm

        if not os.path.exists(model_path):
            raise ValueError(f"SentencePiece model {model_path!r} not found: run `ramjax prepare` with the same "
                             "config first")
        self.model_path = model_path
        self.processor = spm.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = self.processor.get_piece_size()
        # Bytes of text per id (pieces use U+2581 for a space; byte-fallback pieces <0xNN> are one byte).
        sizes = []
        for i in range(self.vocab_size):
            piece = self.processor.id_to_piece(i)
            if self.processor.is_control(i) or self.processor.is_unknown(i):
                sizes.append(0)
            elif self.processor.is_byte(i):
                sizes.append(1)
            else:
                sizes.append(len(piece.replace("\u2581", " ").encode("utf-8")))
        self.sizes = np.asarray(sizes, np.int32)

    def __getstate__(self) -> dict:
        # grain worker processes receive the tokenizer pickled: send the model's path, load it there.
        return {"model_path": self.model_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_path"])

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.processor.encode(text), np.int32)

    def decode(self, ids) -> str:
        return self.processor.decode([int(i) for i in ids])

    def token_bytes(self, ids: np.ndarray) -> np.ndarray:
        return self.sizes[np.asarray(ids)]

    def save(self, directory: str) -> str:
        path = os.path.join(directory, os.path.basename(self.model_path))
        if os.path.abspath(path) != os.path.abspath(self.model_path):
            shutil.copyfile(self.model_path, path)
        return path


def load_run_tokenizer(workdir: str, tokenizer: str):
    """The tokenizer a language-model run trained with, from the copy `ramjax train` saved in its workdir."""
    if tokenizer == "byte":
        return ByteTokenizer()
    if tokenizer == "sentencepiece":
        models = sorted(f for f in os.listdir(workdir) if f.startswith("spm_") and f.endswith(".model"))
        if not models:
            raise ValueError(f"{workdir}: no SentencePiece model (spm_*.model) saved by `ramjax train` in this run")
        return SentencePieceTokenizer(os.path.join(workdir, models[-1]))
    raise ValueError(f"data.tokenizer: unknown tokenizer {tokenizer!r} in the run's config")


def train_sentencepiece(texts, model_path: str, vocab_size: int, *, max_sentence_length: int = 1 << 16) -> str:
    """Trains a SentencePiece BPE model (byte fallback: any text encodes) on `texts`; writes model_path."""
    import sentencepiece as spm

    os.makedirs(os.path.dirname(model_path) or ".", exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            for text in texts:
                f.write(text.replace("\r", "") + "\n")
        prefix = os.path.join(tmp, "spm")
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=prefix, vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, character_coverage=1.0, split_by_whitespace=False,
            # Exact round trips, so bits per byte count the real text: no normalisation, no invented space.
            normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
            max_sentence_length=max_sentence_length, input_sentence_size=2_000_000, shuffle_input_sentence=True,
            minloglevel=2, num_threads=os.cpu_count() or 1)
        shutil.copyfile(prefix + ".model", model_path)
    return model_path
