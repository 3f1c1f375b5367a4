"""A local text corpus on disk: which files it holds, and a fingerprint of them (no TFDS needed).

The fingerprint hashes every document file's relative path, size and modification time, so a prepared dataset
and its tokenizer can be checked against the corpus they came from in milliseconds (the standard library:
~2000 files) without reading the text.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig

from ramjax.errors import ConfigError

SUFFIXES = (".txt", ".jsonl", ".parquet", ".py")


def default_corpus_dir() -> str:
    """The standard library of the running Python."""
    return sysconfig.get_paths()["stdlib"]


def corpus_files(corpus_dir: str) -> list[str]:
    """Every document file under corpus_dir (absolute paths), in a fixed order."""
    corpus_dir = os.path.abspath(os.path.expanduser(corpus_dir))
    if not os.path.isdir(corpus_dir):
        raise ConfigError(f"data.corpus_dir: {corpus_dir!r} is not a directory")
    stdlib = corpus_dir == os.path.abspath(default_corpus_dir())
    out = []
    for root, dirs, files in os.walk(corpus_dir):
        dirs.sort()
        if stdlib:  # the standard library alone: not what pip installed next to it, not caches
            dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__")]
        out += [os.path.join(root, name) for name in sorted(files) if name.endswith(SUFFIXES)]
    return out


def fingerprint(corpus_dir: str) -> dict:
    """{"files": how many, "fingerprint": a hash of every file's relative path, size and mtime}."""
    corpus_dir = os.path.abspath(os.path.expanduser(corpus_dir))
    digest = hashlib.sha1()
    files = corpus_files(corpus_dir)
    for path in files:
        stat = os.stat(path)
        digest.update(f"{os.path.relpath(path, corpus_dir)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"files": len(files), "fingerprint": digest.hexdigest()[:16]}
