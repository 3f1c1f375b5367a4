"""Times the address decoder (product top-K + CAPE, for q and k) per implementation and kernel launch shape.

  python experiments/tune_decoder_kernel.py --shapes 8x4096,2x16384,1x65536 --rows 64,128,256 --warps 4,8

Random q and k [batch, time, heads, U * d_p] (bf16 by default, as the bf16 model produces them), 16 heads,
U 5, d_p 4, K 8; CAPE on every head. Every kernel setting is checked against impl="xla" first (the share of
slots that differ, the relative RMS of the values and of the gradient of q and k) and then timed, forward and
forward + backward. Prints a table and writes it, with device, versions and date, to --results.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from kernels.product_topk import product_topk as kernel_topk
from ramjax import timing
from ramjax.numerics import rel_rms
from ramjax.ops import cape_shift, product_topk


def decoder(num_factors, top_k, num_slots, options):
    """options None: the XLA decoder; else the kernel's launch options (block_rows, num_warps)."""
    def decode(q, k):
        positions = jnp.arange(q.shape[1], dtype=jnp.int32)[None, :, None, None]
        out = []
        for x in (q, k):
            if options is None:
                idx, val = product_topk(x, num_factors=num_factors, top_k=top_k, impl="xla")
            else:
                idx, val = kernel_topk(x, num_factors=num_factors, top_k=top_k,
                                       interpret=jax.default_backend() != "gpu", **options)
            out.append((cape_shift(idx, positions, num_slots), val))
        return out

    def loss(q, k, g):
        return sum(jnp.sum(val * g) for _, val in decode(q, k))

    return jax.jit(decode), jax.jit(jax.grad(loss, argnums=(0, 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8x4096,2x16384,1x65536")
    parser.add_argument("--rows", default="64,128,256", help="kernel block_rows values to try")
    parser.add_argument("--warps", default="4,8", help="kernel num_warps values to try (GPU)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--num_factors", type=int, default=5)
    parser.add_argument("--factor_size", type=int, default=4)
    parser.add_argument("--top_k", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--results", default="experiments/results/decoder_kernel_tuning.md")
    args = parser.parse_args()
    num_slots = args.factor_size**args.num_factors
    settings = [(r, w) for r in map(int, args.rows.split(",")) for w in map(int, args.warps.split(","))]
    lines = ["| shape | impl | block_rows | warps | fwd ms | fwd+bwd ms | slots differing | rel RMS val | "
             "rel RMS grad (keys with equal slots) |", "|---|---|---|---|---|---|---|---|---|"]
    for shape in args.shapes.split(","):
        batch, seq_len = map(int, shape.split("x"))
        keys = jax.random.split(jax.random.key(0), 3)
        size = (batch, seq_len, args.heads, args.num_factors * args.factor_size)
        q, k = ((2 * jax.random.normal(key, size)).astype(args.dtype) for key in keys[:2])
        g = jax.random.normal(keys[2], size[:3] + (args.top_k,))
        ref_fwd, ref_bwd = decoder(args.num_factors, args.top_k, num_slots, None)
        ref_out, ref_grad = ref_fwd(q, k), ref_bwd(q, k, g)
        runs = [("xla", None, None)] + [("pallas", r, w) for r, w in settings]
        for impl, rows, warps in runs:
            options = None if impl == "xla" else dict(block_rows=rows, num_warps=warps)
            fwd, bwd = decoder(args.num_factors, args.top_k, num_slots, options)
            try:
                out, grad = fwd(q, k), bwd(q, k, g)
            except Exception as error:  # a launch shape that does not compile is a row, not the end of the run
                lines.append(f"| {shape} | {impl} | {rows} | {warps} | failed: {str(error).splitlines()[0][:80]} |"
                             " | | | |")
                print(lines[-1], flush=True)
                continue
            differ = sum(float(jnp.mean(a[0] != b[0])) for a, b in zip(out, ref_out)) / 2
            # Values sorted descending agree to rounding even where near-equal slots are ordered differently
            # (GPU exp and division round differently in Triton and XLA), so this error shows a wrong top-K.
            val_err = max(rel_rms(a[1], b[1]) for a, b in zip(out, ref_out))
            # Gradients are compared on the keys whose K slots agree (elsewhere they are gradients of
            # different, equally valid selections).
            same = [jnp.all(a[0] == b[0], axis=-1, keepdims=True) for a, b in zip(out, ref_out)]
            grad_err = max(rel_rms(jnp.where(m, a, 0), jnp.where(m, b, 0)) for a, b, m in zip(grad, ref_grad, same))
            fwd_ms = 1e3 * timing.time_call(fwd, q, k, iters=args.iters)
            bwd_ms = 1e3 * timing.time_call(bwd, q, k, g, iters=args.iters)
            lines.append(f"| {shape} | {impl} | {rows or '-'} | {warps or '-'} | {fwd_ms:.3f} | {bwd_ms:.3f} | "
                         f"{differ:.1e} | {val_err:.1e} | {grad_err:.1e} |")
            print(lines[-1], flush=True)
    header = (f"# Address decoder (product top-K + CAPE, q and k) timings\n\n{timing.environment_lines()}\n"
              f"heads {args.heads}, U {args.num_factors}, d_p {args.factor_size}, K {args.top_k}, keys "
              f"{args.dtype}; median of {args.iters} calls after warm-up. Checks are against impl=xla.\n\n")
    text = header + "\n".join(lines) + "\n"
    print(text)
    with open(args.results, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
