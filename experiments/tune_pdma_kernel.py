"""Chooses the PDMA Pallas kernel's tiling on a GPU: checks and times kernels.pdma over (chunk, warps, d_tile).

  python experiments/tune_pdma_kernel.py --shapes 8x4096 --backends token,triton --chunks 2,16 --warps 4,8 --tiles 32,64

Every setting is checked against --reference (a ramjax impl, default "scan"; relative RMS of o and the three gradients) before it is timed.
Inputs are the benchmark's: random q, k decoded by product top-K with CAPE, 16 heads, U 5, d_p 4, K 8, d_v 64,
bf16 v. Prints a table and appends it, with device, versions and date, to --results.
"""

from __future__ import annotations

import argparse
import functools
import itertools

import jax
import jax.numpy as jnp
import ml_collections

from kernels.pdma import pdma as kernel_pdma
from ramjax import timing
from ramjax.demo import make_inputs
from ramjax.numerics import rel_rms
from ramjax.ops.memory import pdma


def inputs(batch, seq_len, args):
    config = ml_collections.ConfigDict(dict(seed=0, batch=batch, seq_len=seq_len, num_heads=args.heads,
                                            num_factors=5, factor_size=args.factor_size, top_k=8, d_v=64, cape=True))
    (ri, rv, wi, wv, v), num_slots = make_inputs(config)
    return (ri, rv, wi, wv, v.astype(jnp.bfloat16)), num_slots


def functions(run):
    def loss(rv, wv, v, ri, wi, ct):
        return jnp.sum(run(ri, rv, wi, wv, v).astype(jnp.float32) * ct)

    return jax.jit(run), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8x4096,2x16384,1x65536")
    parser.add_argument("--chunks", default="8,16")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--tiles", default="32,64")
    parser.add_argument("--backends", default="token",
                        help="kernels.pdma backends: token, triton, sorted, sorted+kernel (sorted with its Pallas "
                             "block kernel)")
    parser.add_argument("--reference", default="scan", help="the ramjax impl every setting is checked against")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--factor_size", type=int, default=4)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--time_reference", action="store_true",
                        help="also time the reference")
    parser.add_argument("--interpret", action="store_true", help="interpret mode (a smoke test off the GPU)")
    parser.add_argument("--results", default="experiments/results/pdma_kernel_tuning.md")
    args = parser.parse_args()
    lines = ["| shape | backend | chunk | warps | d_tile | fwd ms | fwd+bwd ms | max rel RMS vs reference |",
             "|---|---|---|---|---|---|---|---|"]
    for shape in args.shapes.split(","):
        batch, seq_len = map(int, shape.split("x"))
        (ri, rv, wi, wv, v), num_slots = inputs(batch, seq_len, args)
        ct = jax.random.normal(jax.random.key(1), v.shape)
        ref_fwd, ref_bwd = functions(functools.partial(pdma, num_slots=num_slots, impl=args.reference))
        ref = (ref_fwd(ri, rv, wi, wv, v), ref_bwd(rv, wv, v, ri, wi, ct))
        if args.time_reference:
            t_fwd = timing.time_call(ref_fwd, ri, rv, wi, wv, v, iters=args.iters)
            t_bwd = timing.time_call(ref_bwd, rv, wv, v, ri, wi, ct, iters=args.iters)
            row = f"| B={batch} T={seq_len} M={num_slots} | ramjax impl={args.reference} | | | | {1e3 * t_fwd:.2f} | " \
                  f"{1e3 * t_bwd:.2f} | reference |"
            print(row, flush=True)
            lines.append(row)
        settings = itertools.product(args.backends.split(","), *(map(int, a.split(",")) for a in (
            args.chunks, args.warps, args.tiles)))
        for backend, chunk, warps, tile in settings:
            extra = {"block_kernel": True} if backend == "sorted+kernel" else {}
            run = functools.partial(kernel_pdma, num_slots=num_slots, backend=backend.partition("+")[0], chunk=chunk,
                                    num_warps=warps, d_tile=tile, interpret=args.interpret, **extra)
            fwd, bwd = functions(run)
            try:
                o, grads = fwd(ri, rv, wi, wv, v), bwd(rv, wv, v, ri, wi, ct)
                error = max([rel_rms(o, ref[0])] + [rel_rms(a, b) for a, b in zip(grads, ref[1])])
                t_fwd = timing.time_call(fwd, ri, rv, wi, wv, v, iters=args.iters)
                t_bwd = timing.time_call(bwd, rv, wv, v, ri, wi, ct, iters=args.iters)
                row = f"| B={batch} T={seq_len} M={num_slots} | {backend} | {chunk} | {warps} | {tile} | " \
                      f"{1e3 * t_fwd:.2f} | " \
                      f"{1e3 * t_bwd:.2f} | {error:.1e} |"
            except Exception as exc:  # a tiling that does not compile is a row, not the end of the sweep
                row = f"| B={batch} T={seq_len} M={num_slots} | {backend} | {chunk} | {warps} | {tile} | failed: " \
                      f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]} | | |"
            print(row, flush=True)
            lines.append(row)
    env = timing.environment()
    with open(args.results, "a") as f:
        f.write("\n## " + env["date"] + "\n\n" + timing.environment_lines() + "\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
