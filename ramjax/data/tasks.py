"""The synthetic tasks the trainer runs, behind one interface: training batches by step, evaluation slices.

A task is configured by `config.task` ("mqar" or "selective_copy") and `config.data`. Settings are strings of
"a:length" pairs, where a is the number of kv pairs (MQAR) or of tokens to copy (selective copying).

Every process builds the same global batch from (seed, step) and keeps its own rows, so the data a run sees does
not depend on how many processes share it (a run on 2 hosts equals a run on 1), and a restarted run sees the
same batches. Making a batch is not free (at vocabulary 8192 about as long as a small model's GPU step), so
the trainer makes them ahead in background threads (BatchesAhead, data.prefetch_threads).

`data.layout` picks the generator: "standard" (Zoology's MQAR, Mamba's selective copying) or "fork" (the
adaptive-decay fork's, docs/loglinear.md section 6). `data.train_pool_size` = N > 0 trains on a fixed pool of N
examples per train setting, made once from data.seed, each step's batch distinct rows of it drawn by (seed,
step), as the fork's randperm(N)[:batch]; 0 draws fresh examples every step.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Any, Callable

import numpy as np

from ramjax.data import mqar, selective_copy
from ramjax.data.mqar import Batch, batch_rng
from ramjax.errors import ConfigError

TASKS = ("mqar", "selective_copy")
MIXTURES = ("cycle", "pad")
LAYOUTS = ("standard", "fork")
# Stream tag of the training pool's generator: keeps it apart from the per-step batch generators.
POOL_STREAM = 0x706F6F6C


def parse_settings(field: str, text: str) -> list[tuple[int, int]]:
    """ "4:64,8:64" -> [(4, 64), (8, 64)], with an error that names the config field."""
    settings = []
    for item in str(text).split(","):
        parts = item.strip().split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ConfigError(f"{field}: expected comma-separated 'count:length' pairs such as '4:64,8:64', "
                              f"got {text!r}")
        settings.append((int(parts[0]), int(parts[1])))
    return settings


@dataclasses.dataclass(frozen=True)
class EvalSlice:
    name: str  # "kv8_len64" or "tokens16_len256"
    count: int
    seq_len: int


class SyntheticTask:
    def __init__(self, task: str, data_config):
        if task not in TASKS:
            raise ConfigError(f"task: must be one of {TASKS}, got {task!r}")
        d = data_config
        if d.mixture not in MIXTURES:
            raise ConfigError(f"data.mixture: must be one of {MIXTURES}, got {d.mixture!r}")
        self.layout = d.get("layout", "standard")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"data.layout: must be one of {LAYOUTS}, got {self.layout!r}")
        self.pool_size = d.get("train_pool_size", 0)
        if isinstance(self.pool_size, bool) or not isinstance(self.pool_size, int) or self.pool_size < 0:
            raise ConfigError(f"data.train_pool_size: must be an integer >= 0 (0: fresh examples every step), got "
                              f"{self.pool_size!r}")
        if 0 < self.pool_size < d.batch_size:
            raise ConfigError(f"data.train_pool_size: a batch takes distinct examples of the pool, so it must be 0 "
                              f"or >= data.batch_size ({d.batch_size}), got {self.pool_size}")
        self._pools = {}  # train setting index -> its pool (a Batch of pool_size rows), made on first use
        self.task, self.config = task, d
        self.train_settings = parse_settings("data.train_settings", d.train_settings)
        self.eval_settings = parse_settings("data.eval_settings", d.eval_settings)
        for field, settings in (("data.train_settings", self.train_settings),
                                ("data.eval_settings", self.eval_settings)):
            for count, seq_len in settings:
                try:
                    self._check(count, seq_len)
                except ValueError as error:
                    raise ConfigError(f"{field}: setting {count}:{seq_len} is invalid: {error}") from None
        if d.mixture == "pad" and d.batch_size < len(self.train_settings):
            raise ConfigError(f"data.batch_size: with mixture 'pad' every batch holds every setting, so it must be "
                              f">= {len(self.train_settings)} (the number of train settings), got {d.batch_size}")
        prefix = "kv" if task == "mqar" else "tokens"
        self.eval_slices = [EvalSlice(f"{prefix}{c}_len{n}", c, n) for c, n in self.eval_settings]

    def _check(self, count: int, seq_len: int) -> None:
        fork = self.layout == "fork"
        if self.task == "mqar":
            check = mqar.check_fork_setting if fork else mqar.check_setting
        else:
            check = selective_copy.check_fork_setting if fork else selective_copy.check_setting
        check(count, seq_len, self.config.vocab_size)

    def _batch(self, rng, batch_size: int, count: int, seq_len: int) -> Batch:
        vocab_size = self.config.vocab_size
        if self.task == "mqar" and self.layout == "fork":
            return mqar.fork_mqar_batch(rng, batch_size=batch_size, seq_len=seq_len, num_kv_pairs=count,
                                        vocab_size=vocab_size)
        if self.task == "mqar":
            return mqar.mqar_batch(rng, batch_size=batch_size, seq_len=seq_len, num_kv_pairs=count,
                                   vocab_size=vocab_size, power_a=self.config.power_a)
        if self.layout == "fork":
            return selective_copy.fork_selective_copy_batch(rng, batch_size=batch_size, seq_len=seq_len,
                                                            num_tokens=count, vocab_size=vocab_size)
        return selective_copy.selective_copy_batch(rng, batch_size=batch_size, seq_len=seq_len, num_tokens=count,
                                                   vocab_size=vocab_size)

    def train_pool(self, index: int) -> Batch:
        """The fixed training examples of train setting `index` (data.train_pool_size > 0)."""
        if index not in self._pools:
            count, seq_len = self.train_settings[index]
            rng = np.random.default_rng([self.config.seed, POOL_STREAM, index])
            self._pools[index] = self._batch(rng, self.pool_size, count, seq_len)
        return self._pools[index]

    def _train_examples(self, rng, batch_size: int, index: int) -> Batch:
        """`batch_size` training examples of train setting `index`: fresh, or distinct rows of its pool."""
        if not self.pool_size:
            count, seq_len = self.train_settings[index]
            return self._batch(rng, batch_size, count, seq_len)
        rows = rng.choice(self.pool_size, size=batch_size, replace=False)
        return Batch(*(field[rows] for field in self.train_pool(index)))

    @property
    def max_train_len(self) -> int:
        return max(n for _, n in self.train_settings)

    def train_batch(self, step: int) -> Batch:
        """The global training batch of `step`: one setting in turn ("cycle"), or all settings right-padded to
        the longest ("pad"; padding is token 0 with no loss, harmless to a causal model)."""
        rng = batch_rng(self.config.seed, step)
        if self.config.mixture == "cycle":
            return self._train_examples(rng, self.config.batch_size, step % len(self.train_settings))
        sizes = np.full(len(self.train_settings), self.config.batch_size // len(self.train_settings))
        sizes[: self.config.batch_size % len(self.train_settings)] += 1
        parts = [self._train_examples(rng, int(size), index) for index, size in enumerate(sizes)]
        width = self.max_train_len
        return Batch(*(np.concatenate([np.pad(getattr(p, field), ((0, 0), (0, width - p.inputs.shape[1])))
                                       for p in parts]) for field in Batch._fields))

    def eval_batches(self, eval_slice: EvalSlice):
        """The fixed evaluation batches of one slice: the slice's eval_examples (the same in every run with this
        eval_seed, whatever eval_batch_size and the device count are) in batches of eval_batch_size rows, the
        last one padded with rows that count nothing (loss_mask False), so every batch has one shape."""
        index = self.eval_slices.index(eval_slice)
        size, total = self.config.eval_batch_size, self.config.eval_examples
        rng = np.random.default_rng([self.config.eval_seed, index])
        examples = self._batch(rng, total, eval_slice.count, eval_slice.seq_len)
        for start in range(0, total, size):
            rows = [getattr(examples, field)[start:start + size] for field in Batch._fields]
            short = size - rows[0].shape[0]
            if short:
                rows = [np.concatenate([x, np.zeros((short,) + x.shape[1:], x.dtype)]) for x in rows]
            yield Batch(*rows)


def prefetch_threads(data_config) -> int:
    """data.prefetch_threads, checked."""
    value = data_config.get("prefetch_threads", 2)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"data.prefetch_threads: must be an integer >= 0 (0: each synthetic batch made in the "
                          f"loop, when its step is dispatched), got {value!r}")
    return value


class BatchesAhead:
    """A synthetic task's host batches, made ahead of the loop by `threads` background threads (numpy's
    generators and sorts release the GIL): a batch is a function of its step alone, so making steps
    step+1..step+2*threads while the device trains `step` changes nothing but the wait. At vocabulary 8192 one
    MQAR batch of 256 rows takes ~0.04 s of a CPU core, as long as a small model's whole train step on a GPU."""

    def __init__(self, make: Callable[[int], Any], num_steps: int, threads: int):
        self.make, self.num_steps, self.depth = make, num_steps, 2 * threads
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, "ramjax-batches") if threads else None
        self.pending = {}  # step -> the future of its batch

    def get(self, step: int):
        if self.pool is None:
            return self.make(step)
        for ahead in range(step, min(step + self.depth + 1, self.num_steps)):
            if ahead not in self.pending:
                self.pending[ahead] = self.pool.submit(self.make, ahead)
        for stale in [s for s in self.pending if s < step]:  # steps asked for out of order: drop what was made
            self.pending.pop(stale).cancel()
        future = self.pending.pop(step, None)
        return future.result() if future is not None else self.make(step)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pending.clear()
