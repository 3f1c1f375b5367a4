"""Times log-linear attention (chunked) forward and forward + backward; fla's Triton kernel as the peer.

  python experiments/bench_loglinear.py --config configs/bench_loglinear.py:anchors

Both run in one process on the same GPU, one after the other, so the ratio compares like with like.
Writes a Markdown table with the device, versions, date and command to config.results_file.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for PyTorch in the same process

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, logging
from ml_collections import config_flags

from ramjax import timing
from ramjax.numerics import rel_rms
from ramjax.ops.loglinear import loglinear_attention, loglinear_gated_delta

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench_loglinear.py:anchors", "Benchmark grid.")


def make_inputs(config, batch, seq_len, base, seed=0):
    """bf16 q, k, v; fp32 g in [-0.1, 0] and level weights; the fla peer's L = 2 + log2(T) levels."""
    dtype = jnp.dtype(config.dtype)
    num_level = 2 + int(np.log2(seq_len))
    keys = jax.random.split(jax.random.key(seed), 6)
    shape = (batch, seq_len, config.num_heads, config.head_dim)
    q, k, v = (jax.random.normal(key, shape, dtype) for key in keys[:3])
    g = -0.1 * jax.random.uniform(keys[3], shape[:3], jnp.float32)
    level_weights = jax.random.uniform(keys[4], shape[:3] + (num_level,), jnp.float32)
    if base == "mamba2":
        return (q, k, v, g, level_weights)
    k = (k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True)).astype(dtype)
    beta = jax.random.uniform(keys[5], shape[:3], jnp.float32)
    return (q, k, v, g, beta, level_weights)


def ours(base, chunk_size):
    op = loglinear_attention if base == "mamba2" else loglinear_gated_delta

    def forward(*inputs):
        return op(*inputs, impl="chunked", chunk_size=chunk_size)

    def loss(*inputs):
        return jnp.sum(forward(*inputs).astype(jnp.float32))

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=tuple(range(6 if base != "mamba2" else 5))))


def time_fla(inputs, iters):
    """fla chunk_log_linear_attn on the same values, through PyTorch: (fwd ms, fwd+bwd ms, output)."""
    import torch
    from fla.ops.log_linear_attn import chunk_log_linear_attn
    from triton.testing import do_bench

    def to_torch(a, dtype):
        return torch.from_numpy(np.asarray(a.astype(jnp.float32))).to("cuda", dtype).requires_grad_()

    q, k, v, g, level_weights = inputs
    args = [to_torch(a, torch.bfloat16) for a in (q, k, v)]
    args += [to_torch(g, torch.float32), to_torch(level_weights, torch.bfloat16)]

    def step():
        out = chunk_log_linear_attn(*args)
        o = out[0] if isinstance(out, tuple) else out
        o.float().sum().backward()

    fwd_bwd = do_bench(step, warmup=20, rep=max(100, 10 * iters), return_mode="median")
    fwd = do_bench(lambda: chunk_log_linear_attn(*args), warmup=20, rep=max(100, 10 * iters), return_mode="median")
    out = chunk_log_linear_attn(*args)
    o = out[0] if isinstance(out, tuple) else out
    return fwd, fwd_bwd, o.detach().float().cpu().numpy()


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    rows, notes = [], []
    for batch, seq_len in config.cases:
        shape = f"B={batch} T={seq_len}"
        for base in config.bases:
            inputs = make_inputs(config, batch, seq_len, base)
            for chunk_size in config.chunk_sizes:
                forward, backward = ours(base, chunk_size)
                fwd = 1e3 * timing.time_call(forward, *inputs, iters=config.timing_iters)
                fwd_bwd = 1e3 * timing.time_call(backward, *inputs, iters=config.timing_iters)
                rows.append(dict(shape=shape, op=f"ramjax {base} chunked C={chunk_size}", fwd=fwd, fwd_bwd=fwd_bwd))
                print(rows[-1], flush=True)
            if config.peer == "fla" and base == "mamba2":
                try:
                    fwd, fwd_bwd, o_fla = time_fla(inputs, config.timing_iters)
                except Exception as error:  # a peer that fails is reported, not fatal
                    notes.append(f"fla at {shape}: {type(error).__name__}: {str(error)[:200]}")
                    print(notes[-1], flush=True)
                    continue
                rows.append(dict(shape=shape, op="fla chunk_log_linear_attn", fwd=fwd, fwd_bwd=fwd_bwd))
                print(rows[-1], flush=True)
                if config.check_against_peer and len(notes) == 0 and (batch, seq_len) == tuple(config.cases[0]):
                    o = forward(*inputs)
                    notes.append(f"ramjax vs fla output at {shape}: relative RMS {rel_rms(o, o_fla):.2e}")
                    print(notes[-1], flush=True)

    env = timing.environment()
    lines = ["# Log-linear attention timings", "", " ".join(f"{k}: {v};" for k, v in env.items()), ""]
    lines += [f"Command: `python experiments/bench_loglinear.py {' '.join(sys.argv[1:])}`", ""]
    lines += [
        f"heads {config.num_heads}, head dim {config.head_dim}, {config.dtype} q/k/v, fp32 g and level weights, "
        f"L = 2 + log2 T; ours: median of {config.timing_iters} calls after warm-up; fla: triton do_bench median.",
        "",
        "| shape | op | fwd ms | fwd+bwd ms | fla fwd+bwd ms / this |",
        "|---|---|---|---|---|",
    ]
    # fla's kernel is the scalar-decay (Mamba-2) base: only those rows have a like-for-like peer.
    peer = {r["shape"]: r for r in rows if r["op"].startswith("fla")}
    for r in rows:
        comparable = r["shape"] in peer and "gated_delta" not in r["op"]
        ratio = f"{peer[r['shape']]['fwd_bwd'] / r['fwd_bwd']:.2f}x" if comparable else "- (no peer)"
        lines.append(f"| {r['shape']} | {r['op']} | {r['fwd']:.2f} | {r['fwd_bwd']:.2f} | {ratio} |")
    lines += [""] + [f"- {note}" for note in notes]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(config.results_file), exist_ok=True)
    with open(config.results_file, "w") as f:
        f.write(text)
    print(f"wrote {config.results_file}")


if __name__ == "__main__":
    app.run(main)
