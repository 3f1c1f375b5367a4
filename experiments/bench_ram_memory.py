"""Times the RAM-Net memory op (PDMA) per implementation over a grid of shapes; writes a results table.

  python experiments/bench_ram_memory.py --config configs/bench_ram_memory.py:cpu

Every implementation is checked against the first one run at that shape before its time is reported.
"""

from __future__ import annotations

import sys

import jax
import ml_collections
from absl import app, logging
from ml_collections import config_flags

from ramjax import timing
from ramjax.demo import make_functions, make_inputs
from ramjax.numerics import rel_rms

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_ram_memory.py:cpu", "Benchmark grid.")


def case_config(config, batch, seq_len, factor_size) -> ml_collections.ConfigDict:
    case = ml_collections.ConfigDict(config.to_dict())
    case.batch, case.seq_len, case.factor_size = batch, seq_len, factor_size
    return case


def bench_case(config, batch, seq_len, factor_size) -> list[dict]:
    case = case_config(config, batch, seq_len, factor_size)
    codes, num_slots = make_inputs(case)
    read_idx, read_val, write_idx, write_val, v = codes
    cotangent = jax.random.normal(jax.random.key(1), v.shape)
    grad_args = (read_val, write_val, v, read_idx, write_idx, cotangent)
    dense_elements = batch * config.num_heads * seq_len * num_slots * config.d_v
    rows, reference = [], None
    for impl in config.impls:
        if impl == "dense" and dense_elements > config.dense_max_elements:
            continue
        forward, backward = make_functions(case, num_slots, impl)
        o, (_, grads) = forward(*codes), backward(*grad_args)
        if reference is None:
            reference = (impl, o, grads)
        error = max([rel_rms(o, reference[1])] + [rel_rms(g, r) for g, r in zip(grads, reference[2])])
        rows.append(
            {
                "shape": f"B={batch} T={seq_len} M={num_slots}",
                "impl": impl,
                "fwd_ms": 1e3 * timing.time_call(forward, *codes, iters=config.timing_iters),
                "fwd_bwd_ms": 1e3 * timing.time_call(backward, *grad_args, iters=config.timing_iters),
                "check": f"{error:.1e} vs {reference[0]}",
            }
        )
        print(rows[-1], flush=True)
    return rows


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    rows = []
    for batch, seq_len, factor_size in config.cases:
        rows += bench_case(config, batch, seq_len, factor_size)
    env = timing.environment()
    lines = [
        "# PDMA (RAM-Net memory op) timings",
        "",
        " ".join(f"{k}: {v};" for k, v in env.items()),
        "",
        f"Command: `python experiments/bench_ram_memory.py {' '.join(sys.argv[1:])}`",
        "",
        f"heads {config.num_heads}, U {config.num_factors}, K {config.top_k}, d_v {config.d_v}, fp32, "
        f"gamma {config.gamma}, CAPE {config.cape}; median of {config.timing_iters} calls after warm-up.",
        "",
        "| shape | impl | fwd ms | fwd+bwd ms | max rel RMS (o, grads) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['shape']} | {r['impl']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {r['check']} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(config.results_file, "w") as f:
        f.write(text)
    print(f"wrote {config.results_file}")


if __name__ == "__main__":
    app.run(main)
