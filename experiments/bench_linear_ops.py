"""Op-level timings of the linear-time ops and attention, forward and forward + backward, against the peers.

  python experiments/bench_linear_ops.py --config configs/bench_linear_ops.py:anchors
  python experiments/bench_linear_ops.py --config configs/bench_linear_ops.py:cpu --config.ops=gla,simple_gla

Ours: gated linear attention with a per-key-dimension gate (gla) and a scalar gate (simple_gla, Mamba-2's SSD),
the gated delta rule, the two log-linear ops, and causal attention (jax.nn.dot_product_attention with cuDNN's
flash kernel or XLA), each with the implementations config.impls names. Peers (config.peer = "fla"): fla's
chunk_gla, chunk_simple_gla, chunk_gated_delta_rule and chunk_log_linear_attn, and PyTorch's flash attention,
on the same values, in the same process, one after the other, so the ratios compare like with like.

Inputs: q, k, v [batch, time, heads, head_dim] in config.dtype (k unit-norm for the delta rule), log decays in
[-0.1, 0] and beta, level weights in [0, 1] in fp32; the log-linear ops get L = 2 + log2(T) levels (fla's).
Ours: the median of timing_iters calls of the jitted forward, and of its gradient with respect to every input;
peers: triton.testing.do_bench medians. Rows are written to config.results_file as they finish (device,
versions, date and command on top).
"""

from __future__ import annotations

import os
import shlex
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for PyTorch in the same process

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from ramjax import ops, timing
from ramjax.numerics import rel_rms

# op -> the name its peer has in the table (fla's kernel, or PyTorch's attention)
PEERS = {
    "gla": "fla chunk_gla",
    "simple_gla": "fla chunk_simple_gla",
    "gated_delta": "fla chunk_gated_delta_rule",
    "loglinear_mamba2": "fla chunk_log_linear_attn",
    "attention": "torch sdpa (flash)",
}


def make_inputs(op: str, batch: int, seq_len: int, heads: int, dim: int, dtype, seed: int = 0,
                dim_v: int | None = None) -> tuple:
    """The op's positional inputs (see the module docstring); v of width dim_v (default: dim)."""
    keys = jax.random.split(jax.random.key(seed), 6)
    shape = (batch, seq_len, heads, dim)
    q, k = (jax.random.normal(key, shape, jnp.float32) for key in keys[:2])
    v = jax.random.normal(keys[2], shape[:3] + (dim_v or dim,), jnp.float32)
    if op in ("gated_delta", "loglinear_gated_delta"):
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    if op == "attention":
        return (q, k, v)
    gate_shape = shape if op == "gla" else shape[:3]
    log_decay = -0.1 * jax.random.uniform(keys[3], gate_shape, jnp.float32)
    beta = jax.random.uniform(keys[4], shape[:3], jnp.float32)
    level_weights = jax.random.uniform(keys[5], shape[:3] + (2 + int(np.log2(seq_len)),), jnp.float32)
    return {"gla": (q, k, v, log_decay), "simple_gla": (q, k, v, log_decay),
            "gated_delta": (q, k, v, log_decay, beta),
            "loglinear_mamba2": (q, k, v, log_decay, level_weights),
            "loglinear_gated_delta": (q, k, v, log_decay, beta, level_weights)}[op]


def our_op(op: str, impl: str, chunk_size: int):
    """f(*inputs) -> o for one of our implementations."""
    if op == "attention":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    fn = {"gla": ops.gated_linear_attention, "simple_gla": ops.gated_linear_attention,
          "gated_delta": ops.gated_delta_rule, "loglinear_mamba2": ops.loglinear_attention,
          "loglinear_gated_delta": ops.loglinear_gated_delta}[op]
    return lambda *inputs: fn(*inputs, impl=impl, chunk_size=chunk_size)


def time_ours(forward, inputs, iters: int) -> tuple[float, float, jax.Array]:
    """(fwd ms, fwd+bwd ms, o): the jitted forward, and the gradient of sum(o) with respect to every input."""
    def loss(*args):
        return jnp.sum(forward(*args).astype(jnp.float32))

    forward_jit = jax.jit(forward)
    backward = jax.jit(jax.grad(loss, argnums=tuple(range(len(inputs)))))
    fwd = 1e3 * timing.time_call(forward_jit, *inputs, iters=iters)
    fwd_bwd = 1e3 * timing.time_call(backward, *inputs, iters=iters)
    return fwd, fwd_bwd, forward_jit(*inputs)


def peer_op(op: str):
    """The peer as f(*torch inputs) -> o, the inputs converted as fla expects them."""
    import torch.nn.functional as F

    if op == "attention":
        return lambda q, k, v: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
    if op == "gla":
        from fla.ops.gla import chunk_gla
        return lambda q, k, v, g: chunk_gla(q, k, v, g, scale=1.0)[0]
    if op == "simple_gla":
        from fla.ops.simple_gla import chunk_simple_gla
        return lambda q, k, v, g: chunk_simple_gla(q, k, v, g, scale=1.0)[0]
    if op == "gated_delta":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        return lambda q, k, v, g, beta: chunk_gated_delta_rule(q, k, v, g, beta.to(q.dtype), scale=1.0)[0]
    from fla.ops.log_linear_attn import chunk_log_linear_attn
    return lambda q, k, v, g, levels: chunk_log_linear_attn(q, k, v, g, levels.to(q.dtype), scale=1.0)[0]


def time_peer(op: str, inputs, iters: int) -> tuple[float, float, np.ndarray]:
    """(fwd ms, fwd+bwd ms, o as float32 numpy) of the peer on the same values."""
    import torch
    from triton.testing import do_bench

    def to_torch(a):
        dtype = torch.bfloat16 if a.dtype == jnp.bfloat16 else torch.float32
        return torch.from_numpy(np.asarray(a.astype(jnp.float32))).to("cuda", dtype).requires_grad_()

    args = [to_torch(a) for a in inputs]
    fn = peer_op(op)

    def step():
        fn(*args).float().sum().backward()

    rep = max(100, 10 * iters)
    fwd_bwd = do_bench(step, warmup=20, rep=rep, return_mode="median")
    fwd = do_bench(lambda: fn(*args), warmup=20, rep=rep, return_mode="median")
    o = fn(*args).detach().float().cpu().numpy()
    args.clear()  # the inputs and their gradients go before the next row
    torch.cuda.empty_cache()
    return fwd, fwd_bwd, o


def table(rows: list[dict]) -> list[str]:
    """Markdown rows; each of ours divided by the peer of its op and case from the same run."""
    peers = {(r["case"], r["op"]): r for r in rows if r["impl"] == "peer" and "error" not in r}
    lines = ["| case | op | impl | fwd ms | fwd+bwd ms | peer fwd+bwd / this | vs peer output (rel. RMS) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = PEERS[r["op"]] if r["impl"] == "peer" else r["impl"]
        if "error" in r:
            lines.append(f"| {r['case']} | {r['op']} | {name} | failed: {r['error']} | | | |")
            continue
        peer = peers.get((r["case"], r["op"]))
        ratio = f"{peer['fwd_bwd'] / r['fwd_bwd']:.2f}x" if peer and r["impl"] != "peer" else "-"
        error = f"{r['rel_rms_vs_peer']:.1e}" if "rel_rms_vs_peer" in r else ""
        lines.append(f"| {r['case']} | {r['op']} | {name} | {r['fwd']:.3g} | {r['fwd_bwd']:.3g} | {ratio} | {error} |")
    return lines


def write(path: str, head: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(head + "\n".join(table(rows)) + "\n")


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    config = flags.FLAGS.config
    unknown = sorted(set(config.ops) - set(config.impls))
    if unknown:
        raise SystemExit(f"bench_linear_ops: config.ops has {unknown}; known: {sorted(config.impls)}")
    try:
        timing.apply_module_settings(config.kernel_settings)
    except ValueError as error:
        raise SystemExit(f"bench_linear_ops: config.{error}") from None
    dtype = jnp.dtype(config.dtype)
    command = "python experiments/bench_linear_ops.py " + shlex.join(sys.argv[1:])
    head = ("# Linear-time ops and attention: forward and forward + backward against the peers\n\n" +
            timing.environment_lines(command) +
            f"\nheads {config.num_heads}, head dim {config.head_dim}, q/k/v {config.dtype}, gates, beta and "
            f"level weights fp32, chunk size {config.chunk_size}; ours: median of {config.timing_iters} calls "
            "after warm-up; peers: triton do_bench median. Ratio > 1: ours faster.\n\n")
    rows, peer_outputs = [], {}
    # Per op the peer first: fla autotunes its kernels on a shape's first call (minutes on a fresh machine), so a
    # run cut short still has the peer of every op it reached; our rows are then checked against its output.
    jobs = [(case, op, impl) for case in config.cases for op in config.ops
            for impl in (("peer",) if config.peer and op in PEERS else ()) + tuple(config.impls[op])]
    for number, ((batch, seq_len), op, impl) in enumerate(jobs, 1):
        case = f"{batch}x{seq_len}"
        inputs = make_inputs(op, batch, seq_len, config.num_heads, config.head_dim, dtype)
        row = {"case": case, "op": op, "impl": impl}
        start = time.perf_counter()
        try:
            if impl == "peer":
                row["fwd"], row["fwd_bwd"], o = time_peer(op, inputs, config.timing_iters)
                if config.check_against_peer and (batch, seq_len) == tuple(config.cases[0]):
                    peer_outputs[op] = o
            else:
                row["fwd"], row["fwd_bwd"], o = time_ours(our_op(op, impl, config.chunk_size), inputs,
                                                          config.timing_iters)
                if op in peer_outputs and (batch, seq_len) == tuple(config.cases[0]):
                    row["rel_rms_vs_peer"] = float(rel_rms(o, peer_outputs[op]))
        except Exception as error:  # noqa: BLE001 - out of memory, no peer installed: record it and go on
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
        rows.append(row)
        took = time.perf_counter() - start
        result = row.get("error") or f"fwd {row['fwd']:.3g} ms, fwd+bwd {row['fwd_bwd']:.3g} ms"
        print(f"[{number}/{len(jobs)}] {case} {op} {impl}: {result} ({took:.0f} s)", flush=True)
        write(config.results_file, head, rows)
    print("\n" + "\n".join(table(rows)), flush=True)
    print(f"\nwrote {config.results_file}", flush=True)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", "configs/bench_linear_ops.py:anchors", "Benchmark grid.")
    app.run(main)
