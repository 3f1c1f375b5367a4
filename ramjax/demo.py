"""`ramjax demo`: RAM-Net's memory op end to end on random data, every implementation checked and timed.

Random queries and keys go through the product-softmax decoder (and CAPE), then PDMA reads the memory with
each implementation the config names. The first implementation is the reference; the others must agree with
it (outputs and gradients), and each is timed forward and forward + backward.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import tqdm

from ramjax import timing
from ramjax.errors import ConfigError
from ramjax.numerics import rel_rms
from ramjax.ops import cape_shift, pdma, product_topk
from ramjax.ops.memory import IMPLS, resolve_impl

def make_inputs(config):
    """Random q, k, v [batch, time, heads, ...] decoded into sparse read and write codes."""
    num_slots = config.factor_size**config.num_factors
    key_q, key_k, key_v = jax.random.split(jax.random.key(config.seed), 3)
    shape = (config.batch, config.seq_len, config.num_heads)
    key_size = config.num_factors * config.factor_size
    q = 2 * jax.random.normal(key_q, shape + (key_size,))
    k = 2 * jax.random.normal(key_k, shape + (key_size,))
    v = jax.random.normal(key_v, shape + (config.d_v,))
    decode = functools.partial(product_topk, num_factors=config.num_factors, top_k=config.top_k)
    (read_idx, read_val), (write_idx, write_val) = decode(q), decode(k)
    if config.cape:
        positions = jnp.arange(config.seq_len, dtype=jnp.int32)[None, :, None, None]
        read_idx = cape_shift(read_idx, positions, num_slots)
        write_idx = cape_shift(write_idx, positions, num_slots)
    return (read_idx, read_val, write_idx, write_val, v), num_slots


def make_functions(config, num_slots, impl):
    """Jitted forward, and forward + backward (gradients of a fixed random projection of o)."""
    run = functools.partial(
        pdma, num_slots=num_slots, gamma=config.gamma, eps=config.eps, grad_eps=config.grad_eps, impl=impl
    )

    def loss(read_val, write_val, v, read_idx, write_idx, cotangent):
        return jnp.sum(run(read_idx, read_val, write_idx, write_val, v) * cotangent)

    forward = jax.jit(run)
    backward = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return forward, backward


def check_config(config) -> None:
    for field in ("batch", "seq_len", "num_heads", "num_factors", "top_k", "d_v", "timing_iters"):
        value = config.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"config.{field}: must be an integer >= 1, got {value!r}")
    if config.factor_size < 2:
        raise ConfigError(f"config.factor_size: must be an integer >= 2 (M = factor_size ** num_factors slots), "
                          f"got {config.factor_size!r}")
    if config.top_k > config.factor_size**config.num_factors:
        raise ConfigError(f"config.top_k: must be <= M = factor_size ** num_factors = "
                          f"{config.factor_size ** config.num_factors}, got {config.top_k}")
    # The memory op's own rules (ramjax/ops/memory/op.py), here so that a bad value is one line, not a traceback.
    for field, low, high in (("gamma", 0, math.inf), ("eps", 0, math.inf), ("grad_eps", 0, 1)):
        value = config[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
            allowed = f">= {low} and < {high}" if high < math.inf else f">= {low}"
            raise ConfigError(f"config.{field}: must be a finite number {allowed}, got {value!r}")
    for impl in config.impls:
        if impl not in IMPLS:
            raise ConfigError(f"config.impls: {impl!r} is not an implementation; allowed: {IMPLS}")
    if not config.impls:
        raise ConfigError("config.impls: name at least one implementation")


def run_demo(config) -> list[dict]:
    check_config(config)
    codes, num_slots = make_inputs(config)
    read_idx, read_val, write_idx, write_val, v = codes
    cotangent = jax.random.normal(jax.random.key(config.seed + 1), v.shape)
    print(
        f"RAM-Net memory: batch {config.batch}, T {config.seq_len}, heads {config.num_heads}, "
        f"M = {config.factor_size}^{config.num_factors} = {num_slots} slots, K {config.top_k}, "
        f"d_v {config.d_v}, gamma {config.gamma}, CAPE {'on' if config.cape else 'off'}, "
        f"on {jax.devices()[0].device_kind}"
    )
    rows, reference = [], None
    for impl in tqdm.tqdm(config.impls, desc="implementations", unit="impl"):
        forward, backward = make_functions(config, num_slots, impl)
        o = forward(read_idx, read_val, write_idx, write_val, v)
        grad_args = (read_val, write_val, v, read_idx, write_idx, cotangent)
        _, grads = backward(*grad_args)
        if reference is None:
            reference = (impl, o, grads)
        ref_impl, ref_o, ref_grads = reference
        error = max([rel_rms(o, ref_o)] + [rel_rms(g, r) for g, r in zip(grads, ref_grads)])
        rows.append(
            {
                "impl": f"{impl} ({resolve_impl(impl, num_slots, config.d_v)})" if impl == "auto" else impl,
                "fwd_ms": 1e3 * timing.time_call(forward, *codes, iters=config.timing_iters),
                "fwd_bwd_ms": 1e3 * timing.time_call(backward, *grad_args, iters=config.timing_iters),
                "error": error,
                "reference": ref_impl,
            }
        )
    print(f"\n| impl | fwd ms | fwd+bwd ms | max rel RMS vs {rows[0]['reference']} (o, grads) |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['impl']} | {row['fwd_ms']:.2f} | {row['fwd_bwd_ms']:.2f} | {row['error']:.1e} |")
    worst = max(row["error"] for row in rows)
    if worst > 1e-4:
        raise SystemExit(f"FAILED: implementations disagree (relative RMS {worst:.1e} > 1e-4)")
    print(f"\nAll implementations agree (worst relative RMS {worst:.1e}).")
    return rows


def main(config) -> None:
    run_demo(config)
