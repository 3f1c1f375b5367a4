"""Times the stages of the sorted-event scan (kernels/sorted_scan.py) alone, on random events.

  python experiments/profile_sorted_scan.py                       # the PDMA forward's and backward's shapes
  python experiments/profile_sorted_scan.py --cases 2x64x8x16x1   # G x T x K_upd x K_read x rows_per_step

Stages: A sorts the updates by slot and gathers their rows; B runs the blocked recurrence (B1 its [C, C] weights,
B2 the batched products in each precision); C finds each read's last update (the second sort); D is the whole
scan. Prints one line per case (best of 5 calls, ms).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from kernels import sorted_scan
from ramjax import timing

# The forward pass of PDMA at B=8 T=4096 H=16 K=8 (K updates, 2K reads), its backward pass (2K updates with K
# rows, K reads), and B=1 T=65536.
DEFAULT_CASES = "128x4096x8x16x1,128x4096x16x8x8,16x65536x8x16x1"


def random_events(g, t, ku, kr, ru, num_slots, d=65):
    keys = jax.random.split(jax.random.key(0), 6)
    return (jax.random.randint(keys[0], (g, t, ku), 0, num_slots, jnp.int32),
            -0.3 * jax.random.uniform(keys[1], (g, t, ku)),
            jax.random.uniform(keys[2], (g, t, ku)),
            jax.random.randint(keys[3], (g, t, ku), 0, ru, jnp.int32),
            jax.random.normal(keys[4], (g, t, ru, d)),
            jax.random.randint(keys[5], (g, t, kr), 0, num_slots, jnp.int32),
            jnp.zeros((d,)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=DEFAULT_CASES, help="G x T x K_upd x K_read x rows_per_step, ...")
    parser.add_argument("--num_slots", type=int, default=1024)
    parser.add_argument("--block", type=int, default=32)
    args = parser.parse_args()
    block = args.block
    for case in args.cases.split(","):
        g, t, ku, kr, ru = map(int, case.split("x"))
        us, uld, usc, urow, rows, rs, init = random_events(g, t, ku, kr, ru, args.num_slots)
        stage_a = jax.jit(functools.partial(sorted_scan.sorted_updates, num_slots=args.num_slots))
        _, starts, ld_q, x_q = stage_a(us, uld, usc, urow, rows, init)
        if (t * ku) % block:
            raise SystemExit(f"--block {block} must divide T x K_upd = {t * ku} here (the stages run unpadded)")
        times = {"A sort + gather updates": timing.time_call(stage_a, us, uld, usc, urow, rows, init)}
        stage_b = jax.jit(functools.partial(sorted_scan.blocked_recurrence, block=block))
        times[f"B blocked recurrence (C {block})"] = timing.time_call(stage_b, starts, ld_q, x_q)
        stage_b1 = jax.jit(sorted_scan.block_weights)
        starts_b, ld_b = starts.reshape(g, -1, block), ld_q.reshape(g, -1, block)
        weights, _ = stage_b1(starts_b, ld_b)
        times["B1 weights"] = timing.time_call(stage_b1, starts_b, ld_b)
        x_b = x_q.reshape(g, -1, block, x_q.shape[-1])
        for precision in ("highest", "high", "default"):
            product = jax.jit(functools.partial(jnp.einsum, "gbij,gbjd->gbid", precision=precision))
            times[f"B2 products ({precision})"] = timing.time_call(product, weights, x_b)
        stage_c = jax.jit(functools.partial(sorted_scan.last_updates, num_slots=args.num_slots))
        times["C last updates (second sort)"] = timing.time_call(stage_c, us, rs)
        whole = jax.jit(functools.partial(sorted_scan.sorted_gated_scan, num_slots=args.num_slots, block=block))
        times["D whole scan"] = timing.time_call(whole, us, uld, usc, urow, rows, rs, init)
        print(f"G={g} T={t} K_upd={ku} K_read={kr}: " + ", ".join(f"{k} {1e3 * v:.2f}" for k, v in times.items()),
              flush=True)


if __name__ == "__main__":
    main()
