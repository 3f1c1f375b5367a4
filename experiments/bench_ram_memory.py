"""Times the RAM-Net memory op (PDMA) per implementation over a grid of shapes; writes a results table.

  python experiments/bench_ram_memory.py --config configs/bench_ram_memory.py:cpu
  python experiments/bench_ram_memory.py --config configs/bench_ram_memory.py:anchors   # GPU, with the peers

Every implementation is checked against the first one run at that shape before its time is reported. With
`config.peers`, the same run also times the anchors' peers at each shape (cuDNN attention through
jax.nn.dot_product_attention; fla's chunk_gla through experiments/peer_gla_torch.py when PyTorch and fla are
installed), the address decoder alone, and whole layers (`config.layer_cases`: a RAM-Net layer per impl
against a cuDNN attention layer, d_model = heads x 64), and prints the ratios the kernel issue asks for.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from absl import app, logging
from ml_collections import config_flags

from ramjax import timing
from ramjax.demo import make_functions, make_inputs
from ramjax.models.mixers import make_mixer
from ramjax.numerics import rel_rms
from ramjax.ops import cape_shift, product_topk

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_ram_memory.py:cpu", "Benchmark grid.")


def case_config(config, batch, seq_len, factor_size) -> ml_collections.ConfigDict:
    case = ml_collections.ConfigDict(config.to_dict())
    case.batch, case.seq_len, case.factor_size = batch, seq_len, factor_size
    return case


def bench_case(config, batch, seq_len, factor_size) -> list[dict]:
    case = case_config(config, batch, seq_len, factor_size)
    codes, num_slots = make_inputs(case)
    codes = codes[:4] + (codes[4].astype(config.v_dtype),)
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
    if config.peers:
        rows += peer_rows(config, batch, seq_len, num_slots)
    return rows


def _timed(name, shape, forward, forward_args, backward, backward_args, config, check="-") -> dict:
    row = {"shape": shape, "impl": name, "check": check,
           "fwd_ms": 1e3 * timing.time_call(forward, *forward_args, iters=config.timing_iters),
           "fwd_bwd_ms": 1e3 * timing.time_call(backward, *backward_args, iters=config.timing_iters)}
    print(row, flush=True)
    return row


def peer_rows(config, batch, seq_len, num_slots) -> list[dict]:
    """cuDNN attention at the anchors' shape, and the decoder (product top-K + CAPE) alone, at this case."""
    shape = f"B={batch} T={seq_len} M={num_slots}"
    rows = []
    keys = jax.random.split(jax.random.key(2), 3)
    qkv = [jax.random.normal(key, (batch, seq_len, config.num_heads, 64), jnp.bfloat16) for key in keys]
    if jax.default_backend() == "gpu":
        def attention(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

        attention_grad = jax.jit(jax.grad(lambda q, k, v: attention(q, k, v).astype(jnp.float32).sum(),
                                          argnums=(0, 1, 2)))
        rows.append(_timed("peer: cuDNN attention (bf16, head dim 64)", shape, jax.jit(attention), qkv,
                           attention_grad, qkv, config))
    factor_size = round(num_slots ** (1 / config.num_factors))
    qk = [2 * jax.random.normal(key, (batch, seq_len, config.num_heads, config.num_factors * factor_size))
          for key in keys[:2]]

    def decode(q, k):
        positions = jnp.arange(seq_len, dtype=jnp.int32)[None, :, None, None]
        out = []
        for x in (q, k):
            idx, val = product_topk(x, num_factors=config.num_factors, top_k=config.top_k)
            out.append((cape_shift(idx, positions, num_slots), val))
        return out

    decode_grad = jax.jit(jax.grad(lambda q, k: sum(jnp.sum(val * val) for _, val in decode(q, k)), argnums=(0, 1)))
    rows.append(_timed("decoder: product top-K + CAPE (q and k)", shape, jax.jit(decode), qk, decode_grad, qk,
                       config))
    return rows


def fla_rows(config) -> list[dict]:
    """fla chunk_gla at every case's (batch, seq_len), from a PyTorch subprocess; [] where it cannot run."""
    shapes = sorted({f"{b}x{t}" for b, t, _ in config.cases})
    command = [sys.executable, "experiments/peer_gla_torch.py", *shapes]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    except (subprocess.CalledProcessError, FileNotFoundError, subprocess.TimeoutExpired) as error:
        tail = getattr(error, "stderr", "") or str(error)
        print(f"fla chunk_gla peer not run: {tail.strip().splitlines()[-1] if tail.strip() else error}")
        return []
    rows = []
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            b, t = r["shape"].split("x")
            rows.append({"shape": f"B={b} T={t}", "impl": f"peer: fla chunk_gla (torch {r['torch']}, triton "
                         f"{r['triton']})", "fwd_ms": r["fwd_ms"], "fwd_bwd_ms": r["fwd_bwd_ms"], "check": "-"})
            print(rows[-1], flush=True)
    return rows


def layer_rows(config) -> list[dict]:
    """Whole token-mixing layers, fwd and fwd+bwd (gradients of every parameter and the input), bf16 compute."""
    sys.path.insert(0, "configs")
    import mqar  # the model config's defaults, resized below

    rows = []
    for batch, seq_len in config.layer_cases:
        shape = f"B={batch} T={seq_len} layer"
        cfg = mqar.model_config()
        cfg.d_model, cfg.num_heads, cfg.dtype = config.num_heads * 64, config.num_heads, "bfloat16"
        cfg.ramnet.num_factors, cfg.ramnet.factor_size, cfg.ramnet.top_k = config.num_factors, 4, config.top_k
        cfg.ramnet.d_v, cfg.ramnet.short_conv, cfg.attention.impl = config.d_v, 0, "cudnn"
        x = jax.random.normal(jax.random.key(3), (batch, seq_len, cfg.d_model), jnp.bfloat16)
        positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
        kinds = [("ramnet", impl) for impl in config.layer_impls]
        if jax.default_backend() == "gpu":
            kinds.append(("attention", "cudnn"))
        for kind, impl in kinds:
            cfg.ramnet.impl = impl if kind == "ramnet" else "auto"
            graphdef, params, rest = nnx.split(make_mixer(kind, cfg, config.num_heads, rngs=nnx.Rngs(0)),
                                               nnx.Param, ...)

            def apply(params, x, graphdef=graphdef, rest=rest):
                return nnx.merge(graphdef, params, rest)(x, positions)

            grad = jax.jit(jax.grad(lambda p, x, apply=apply: apply(p, x).astype(jnp.float32).sum(), argnums=(0, 1)))
            name = f"layer: RAM-Net ({impl})" if kind == "ramnet" else "layer: attention (cuDNN)"
            rows.append(_timed(name, shape, jax.jit(apply), (params, x), grad, (params, x), config))
    return rows


def ratios(rows) -> list[str]:
    """The kernel issue's targets, from rows of this run."""
    def find(impl_prefix, shape_prefix):
        for r in rows:
            if r["impl"].startswith(impl_prefix) and r["shape"].startswith(shape_prefix):
                return r["fwd_bwd_ms"]
        return None

    lines = []
    shapes = []
    for r in rows:
        key = " ".join(r["shape"].split()[:2])
        if key not in shapes and not r["shape"].endswith("layer"):
            shapes.append(key)
    for key in shapes:
        gla, pallas, scan = find("peer: fla", key), find("pallas", key + " M=1024"), find("scan", key + " M=1024")
        for name, mine in (("pallas", pallas), ("scan", scan)):
            if gla and mine:
                lines.append(f"- {key}: fla chunk_gla / {name} fwd+bwd = {gla / mine:.2f}x (target >= 1.5 for pallas)")
        decoder = find("decoder", key + " M=1024")
        if decoder and scan:
            share = decoder / (decoder + min(x for x in (scan, pallas) if x))
            lines.append(f"- {key}: decoder fwd+bwd = {decoder:.2f} ms, {share:.0%} "
                         "of decoder + fastest memory op")
    for impl in ("pallas", "scan"):
        small, big = find(impl, "B=2 T=16384 M=1024"), find(impl, "B=2 T=16384 M=1048576")
        if small and big:
            lines.append(f"- {impl}: M = 2^20 / M = 1024 fwd+bwd at B=2 T=16384 = {big / small:.2f}x (target <= 2)")
    for r in rows:
        if r["shape"].endswith("layer") and r["impl"].startswith("layer: RAM-Net"):
            attention = find("layer: attention", r["shape"])
            if attention:
                lines.append(f"- {r['shape']}: cuDNN attention layer / {r['impl']} fwd+bwd = "
                             f"{attention / r['fwd_bwd_ms']:.2f}x (target > 1 at T >= 16384)")
    return lines


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    rows = []
    for batch, seq_len, factor_size in config.cases:
        rows += bench_case(config, batch, seq_len, factor_size)
    if config.peers and jax.default_backend() == "gpu":
        rows += fla_rows(config)
    rows += layer_rows(config)
    env = timing.environment()
    lines = [
        "# PDMA (RAM-Net memory op) timings",
        "",
        " ".join(f"{k}: {v};" for k, v in env.items()),
        "",
        f"Command: `python experiments/bench_ram_memory.py {' '.join(sys.argv[1:])}`",
        "",
        f"heads {config.num_heads}, U {config.num_factors}, K {config.top_k}, d_v {config.d_v}, v {config.v_dtype} "
        "(state and outputs of the op fp32 inside, o in v's dtype), "
        f"gamma {config.gamma}, CAPE {config.cape}; median of {config.timing_iters} calls after warm-up.",
        "",
        "| shape | impl | fwd ms | fwd+bwd ms | max rel RMS (o, grads) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['shape']} | {r['impl']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {r['check']} |"
              for r in rows]
    summary = ratios(rows)
    if summary:
        lines += ["", "Ratios from this run (fwd+bwd):", ""] + summary
    text = "\n".join(lines) + "\n"
    print(text)
    with open(config.results_file, "w") as f:
        f.write(text)
    print(f"wrote {config.results_file}")


if __name__ == "__main__":
    app.run(main)
