"""RAM-Net address decoder: sparse product-softmax addresses (docs/ramnet.md section 2).

A key of size U * d_p is split into U factors; each factor goes through a softmax over d_p entries and the
address is their Kronecker product, a distribution over M = d_p ** U slots. Only its top-K entries are kept.
The length-M vector is never built: a beam search over factors finds the exact top-K.

Implementations (`impl=`): "xla" (the beam search below in jax.numpy), "pallas" (`kernels.product_topk`: the
softmaxes, the beam search and the values fused into one kernel; interpret mode on the CPU) and "auto" (the
kernel on GPUs within PALLAS_MAX_TOP_K, PALLAS_MAX_CANDIDATES and PALLAS_MAX_ROUNDS, which bound its compile
time; it was measured 15x faster than XLA at K = 8, d_p = 4; XLA elsewhere). Both form every probability and product in the
same order, so they return the same slots (ties to the lower slot) and values equal to fp32 rounding; where two
products differ only by an ulp, an ulp of difference in exp between XLA and Triton can order them differently.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.shapes import next_pow2
from ramjax.ops.shared import checks

# Slot indices are int32, so M must stay below 2 ** 31.
_MAX_SLOTS = 2**31 - 1

IMPLS = ("auto", "xla", "pallas")

# Launch shape of the decoder kernel on GPUs (keys per program, warps), chosen by measurement on an H200
# (kernels/README.md).
PALLAS_GPU_OPTIONS = {"block_rows": 128, "num_warps": 4}
# The kernel unrolls its beam search (U stages of K selection rounds over K x d_p candidates), so its code and
# compile time grow with U x K. Measured on an H200 (2026-12-01, experiments/results/large_memory.md): a RAM-Net
# train step at U = 5, K = 8 compiles in about 10 s; at U = 5, K = 32 the K = 32 and K = 16 steps of a top-K
# schedule took about 4 minutes; at U = 6, K = 32 one step had not compiled after 7 minutes, and one at U = 5,
# K = 64 after 6. The XLA decoder compiled the same steps (U up to 10) in seconds. "auto" therefore takes the
# kernel only while all three limits hold:
PALLAS_MAX_TOP_K = 32  # K
PALLAS_MAX_CANDIDATES = 256  # K x d_p, each rounded up to a power of 2 (U = 1, d_p = 1024 would be 8192)
PALLAS_MAX_ROUNDS = 64  # U x K (K rounded up to a power of 2): U = 5, K = 8 is 40; U = 5, K = 32 is 160


def factor_size(key_size: int, num_factors: int) -> int:
    """d_p for a key of `key_size` = U * d_p entries split into `num_factors` = U factors."""
    if key_size % num_factors:
        raise ValueError(
            f"x: last dimension {key_size} must be num_factors * d_p, but num_factors={num_factors} "
            f"does not divide it"
        )
    return key_size // num_factors


# Above this K the kept positions are put in order by a sort rather than by comparing every pair: the pairwise
# rank materialises [rows, K, K], which at K = 512 (a top-K schedule's start at M = 65536) is 2^18 entries per
# row per factor, most of a ~4 s train step and tens of GB (experiments/results/large_memory.md). At and below it
# the measured comparison path stays (a K of a few dozen is what the model keeps).
RANK_BY_COMPARISON_MAX_K = 32


def _top_k_in_index_order(values: jax.Array, indices: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k largest of `values` (ties to the lower position), returned in position order.

    Callers keep `indices` increasing along the last axis, so position order is index order and the ties go
    to the lower index. `lax.top_k`, then for small k a rank computed by comparisons (no sort kernel, which on
    GPUs costs far more than rows of a few dozen entries are worth), for larger k a sort of the k positions.
    """
    _, pos = jax.lax.top_k(values, k)
    if k > RANK_BY_COMPARISON_MAX_K:
        in_order = jnp.sort(pos, axis=-1)  # the positions are distinct: their order is the rank order
    else:
        rank = jnp.sum(pos[..., None, :] < pos[..., :, None], axis=-1)  # where each kept position goes
        in_order = jnp.sum(jnp.where(rank[..., :, None] == jnp.arange(k), pos[..., :, None], 0), axis=-2)
    return jnp.take_along_axis(values, in_order, axis=-1), jnp.take_along_axis(indices, in_order, axis=-1)


def _beam_search(probs: jax.Array, top_k: int) -> jax.Array:
    """Indices of the top-K entries of the Kronecker product of `probs` [..., U, d_p], by descending value,
    equal values by ascending index.

    Exact: every prefix (i_1..i_u) of a global top-K tuple is among the top-K prefixes of length u, because
    extending K better prefixes by the same suffix would give K better tuples (the probabilities are > 0).
    Partial products are formed left to right, exactly as a brute-force Kronecker product forms them. The beam
    is kept in index order, so that candidates are generated in index order and `lax.top_k`'s ties (lower
    position first) are the lower-index ties the contract asks for.
    """
    num_factors, d_p = probs.shape[-2:]
    digits = jnp.arange(d_p, dtype=jnp.int32)
    beam_val = probs[..., 0, :]
    beam_idx = jnp.broadcast_to(digits, beam_val.shape)
    if d_p > top_k:
        beam_val, beam_idx = _top_k_in_index_order(beam_val, beam_idx, top_k)
    for u in range(1, num_factors):
        cand_val = beam_val[..., :, None] * probs[..., u, None, :]
        cand_idx = beam_idx[..., :, None] * d_p + digits
        cand_val = cand_val.reshape(*cand_val.shape[:-2], -1)
        cand_idx = cand_idx.reshape(*cand_idx.shape[:-2], -1)
        beam_val, beam_idx = _top_k_in_index_order(cand_val, cand_idx, min(top_k, cand_val.shape[-1]))
    _, pos = jax.lax.top_k(beam_val, top_k)  # descending; ties keep index order
    return jnp.take_along_axis(beam_idx, pos, axis=-1)


def gather_product(probs: jax.Array, idx: jax.Array) -> jax.Array:
    """Entries `idx` [..., K] of the Kronecker product of `probs` [..., U, d_p], without building it.

    Differentiable in `probs`; `idx` is mixed radix, first factor most significant.
    """
    num_factors, d_p = probs.shape[-2:]
    val = None
    for u in range(num_factors):
        digit = (idx // d_p ** (num_factors - 1 - u)) % d_p
        factor = jnp.take_along_axis(probs[..., u, :], digit, axis=-1)
        val = factor if val is None else val * factor
    return val


def resolve_impl(impl: str, dtype, top_k: int, d_p: int = 1, num_factors: int = 1) -> str:
    """The implementation `impl="auto"` stands for on the current default backend."""
    if impl != "auto":
        return impl
    small = (top_k <= PALLAS_MAX_TOP_K and next_pow2(top_k) * next_pow2(d_p) <= PALLAS_MAX_CANDIDATES
             and num_factors * next_pow2(top_k) <= PALLAS_MAX_ROUNDS)
    if jax.default_backend() == "gpu" and jnp.dtype(dtype).itemsize <= 4 and small:
        return "pallas"
    return "xla"


def product_topk(
    x: jax.Array, *, num_factors: int, top_k: int, temperature: float = 1.0, impl: str = "auto",
    sharding: jax.sharding.NamedSharding | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Exact top-K of the product-softmax address of `x`.

    Args:
      x: `[..., U * d_p]` keys or queries.
      num_factors: U, the number of factors the last axis is split into.
      top_k: K, the number of slots kept, 1 <= K <= M = d_p ** U.
      temperature: tau in softmax(x_u / tau) for each factor.
      impl: "auto", "xla" or "pallas" (see the module docstring).
      sharding: how `x` is laid out on a device mesh. With impl "pallas" the kernel then runs on each
        device's shard under `shard_map` (rows are independent) instead of on arrays XLA would first gather.

    Returns:
      idx: int32 `[..., K]` slot indices (mixed radix, first factor most significant).
      val: `[..., K]` address weights (products of factor probabilities), sorted descending, equal values
        ordered by lower index. Gradients flow into `x` through `val`; `idx` carries none.
    """
    x = jnp.asarray(x)
    checks.require_positive_int("num_factors", num_factors)
    checks.require_positive_int("top_k", top_k)
    if x.ndim < 1:
        raise ValueError("x: expected shape [..., num_factors * d_p], got a scalar")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x: expected a floating dtype, got {x.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    d_p = factor_size(x.shape[-1], num_factors)
    num_slots = d_p**num_factors
    if num_slots > _MAX_SLOTS:
        raise ValueError(
            f"num_factors={num_factors} with d_p={d_p} gives M = {d_p}**{num_factors} = {num_slots} slots, "
            f"more than int32 indices can address ({_MAX_SLOTS})"
        )
    if top_k > num_slots:
        raise ValueError(f"top_k: must be <= M = d_p ** U = {num_slots}, got {top_k}")
    if impl not in IMPLS:
        raise ValueError(f"impl: must be one of {IMPLS}, got {impl!r}")
    chosen = resolve_impl(impl, x.dtype, top_k, d_p, num_factors)
    if chosen == "pallas":
        if jnp.dtype(x.dtype).itemsize > 4:
            raise ValueError(f"x: impl='pallas' computes in float32 and takes float16/bfloat16/float32 keys, got "
                             f"{x.dtype}; use impl='xla'")
        run = functools.partial(_product_topk_pallas, num_factors=num_factors, top_k=top_k,
                                temperature=temperature)
        if sharding is not None and sharding.mesh.size > 1:
            if len(sharding.spec) >= x.ndim and sharding.spec[x.ndim - 1] is not None:
                raise ValueError(f"sharding: the key axis (the last) must not be split, got {sharding.spec}")
            run = jax.shard_map(run, mesh=sharding.mesh, in_specs=(sharding.spec,),
                                out_specs=(sharding.spec, sharding.spec), check_vma=False)
        return run(x)
    return _product_topk(x, num_factors, top_k, temperature)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _product_topk_pallas(x, num_factors, top_k, temperature):
    from kernels import product_topk as kernel

    interpret = jax.default_backend() not in ("gpu", "tpu")  # the same kernel, run by the CPU
    options = PALLAS_GPU_OPTIONS if jax.default_backend() == "gpu" else {}
    return kernel.product_topk(x, num_factors=num_factors, top_k=top_k, temperature=temperature,
                               interpret=interpret, **options)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _product_topk(x, num_factors, top_k, temperature):
    d_p = x.shape[-1] // num_factors
    # Probabilities in at least fp32: a product of U bf16 probabilities would lose most of its bits.
    compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
    logits = x.astype(compute_dtype).reshape(*x.shape[:-1], num_factors, d_p) / temperature
    probs = factor_softmax(logits)
    idx = _beam_search(jax.lax.stop_gradient(probs), top_k)
    return idx, gather_product(probs, idx)


def factor_softmax(logits: jax.Array) -> jax.Array:
    """softmax over the last axis with its sum formed left to right, entry by entry: the order the decoder
    kernel uses, so that both paths agree to rounding (exp itself may still differ by an ulp between them).
    Factors wider than the kernel takes (d_p > PALLAS_MAX_CANDIDATES) are summed by jnp.sum: unrolled, the
    left-to-right sum of d_p = 1024 (the U = 1 ablation) made the value and gradient 30-90x slower and their
    compile 17 s on the CPU."""
    shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    e = jnp.exp(shifted)
    if e.shape[-1] > PALLAS_MAX_CANDIDATES:
        return e / jnp.sum(e, axis=-1, keepdims=True)
    total = e[..., 0]
    for j in range(1, e.shape[-1]):
        total = total + e[..., j]
    return e / total[..., None]
