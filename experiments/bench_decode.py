"""Decoding speed and state size of every LM variant (ramjax/models/decode.py), in one process.

  python experiments/bench_decode.py --config configs/bench_decode.py:gpu
  python experiments/bench_decode.py --config configs/bench_decode.py:cpu --config.contexts="(256,)"

For each variant and (context, batch): the decoding state (`init_cache`) is put at position `context` (every
length and Fenwick position set to it; attention's KV cache is then full that far, and its per-token cost grows
with it), and `steps` greedy tokens are decoded in one jitted `jax.lax.scan` (compiled first, then the median of
`iters` calls, each from a fresh state that it donates and updates in place). Reported: decode tokens/s (batch x
steps / time), ms per token step, and the state's bytes per sequence at that context. What it tests: RAM-Net's
state does not grow with the context and its per-token work does not depend on M (K slots touched per token). A
row whose state would not fit (`max_state_fraction` of the device memory) is recorded as skipped with its size.
Results: Markdown with device, versions, date, command.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from absl import app
from flax import nnx
from ml_collections import config_flags

from ramjax import timing
from ramjax.models import LanguageModel
from ramjax.models.decode import decode_step, init_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs/bench_decode.py:gpu"),
                                          "benchmark config")


def model_config(spec: str, overrides):
    """configs/lm.py[:variant] (relative to the repository) with (field, value) overrides applied."""
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_model_config", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(variant) if variant else module.get_config()
    for field, value in overrides:
        target = config
        *parents, name = field.split(".")
        for parent in parents:
            target = target[parent]
        target[name] = value
    return config


def at_position(cache, position: int):
    """The decoding state with every token count (the top-level length, attention's, a Fenwick position) set to
    `position`, as if that many tokens had been decoded."""
    def set_counts(path, leaf):
        name = getattr(path[-1], "key", getattr(path[-1], "name", None)) if path else None
        return jnp.full_like(leaf, position) if name in ("length", "position") else leaf
    return jax.tree_util.tree_map_with_path(set_counts, cache)


def state_bytes(cache, batch: int) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache) if leaf.ndim) // batch


def device_memory() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def bench_row(model, context: int, batch: int, steps: int, iters: int, max_bytes: int | None) -> dict:
    abstract = jax.eval_shape(lambda: init_cache(model, batch, context + steps))
    per_sequence = state_bytes(abstract, batch)
    row = {"state_mb_per_seq": per_sequence / 2**20}
    if max_bytes is not None and per_sequence * batch > max_bytes:
        return dict(row, status=f"skipped: state {per_sequence * batch / 2**30:.1f} GiB > budget")
    graphdef, params = nnx.split(model)

    # The cache is donated, so the loop updates it in place; without that, each call first copies the whole
    # state (all M slots of every RAM-Net layer) into the loop.
    @functools.partial(jax.jit, donate_argnums=1)
    def run(params, cache, token):
        def step(carry, _):
            params, cache, token = carry  # the parameters ride in the carry (nnx wants this trace's values)
            logits, cache = decode_step(nnx.merge(graphdef, params), cache, token)
            return (params, cache, jnp.argmax(logits, axis=-1).astype(jnp.int32)), None
        (_, cache, token), _ = jax.lax.scan(step, (params, cache, token), None, length=steps)
        return token, cache  # returned so that the donated buffer has an output to alias

    new_cache = jax.jit(lambda: at_position(init_cache(model, batch, context + steps), context))
    token = jnp.zeros((batch,), jnp.int32)
    start = time.perf_counter()
    compiled = run.lower(params, abstract, token).compile()
    row["compile_s"] = time.perf_counter() - start
    jax.block_until_ready(compiled(params, new_cache(), token))
    times = []
    for _ in range(iters):
        cache = jax.block_until_ready(new_cache())  # a fresh one each call (the last was donated), not timed
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(params, cache, token))
        times.append(time.perf_counter() - start)
        del out  # freed outside the timed region (freeing the state is no part of decoding)
    seconds = statistics.median(times)
    return dict(row, status="ok", tokens_per_s=batch * steps / seconds, ms_per_step=1e3 * seconds / steps)


def main(argv) -> None:
    del argv
    config = _CONFIG.value
    budget = device_memory()
    max_bytes = int(budget * config.max_state_fraction) if budget else None
    rows = []
    command = " ".join(["python"] + sys.argv)
    for name, overrides in config.variants:
        cfg = model_config(config.model_config, tuple(config.model_overrides) + tuple(overrides.items()))
        model = LanguageModel(cfg.model, rngs=nnx.Rngs(0))
        for context in config.contexts:
            for batch in config.batches:
                try:
                    row = bench_row(model, context, batch, config.steps, config.iters, max_bytes)
                except Exception as error:  # out of memory, compile error: recorded, the run goes on
                    row = {"status": f"error: {type(error).__name__}: {str(error).splitlines()[0][:120]}"}
                row.update(variant=name, context=context, batch=batch)
                rows.append(row)
                print(f"{name:18s} context {context:6d} batch {batch:3d}: {row}", flush=True)
                write_results(config.results, rows, command, config)
        del model


def write_results(path: str, rows: list[dict], command: str, config) -> None:
    lines = ["# Decoding: tokens/s and state per sequence", "", timing.environment_lines(command), "",
             f"model: {config.model_config} with {dict(config.model_overrides)}; {config.steps} greedy tokens per "
             f"timed call, median of {config.iters}; the state put at position `context` first.", "",
             "| variant | context | batch | decode tokens/s | ms per step | state MB / sequence | status |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        tps = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else ""
        ms = f"{r['ms_per_step']:.3f}" if "ms_per_step" in r else ""
        mb = f"{r['state_mb_per_seq']:,.2f}" if "state_mb_per_seq" in r else ""
        lines.append(f"| {r['variant']} | {r['context']} | {r['batch']} | {tps} | {ms} | {mb} | {r['status']} |")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
