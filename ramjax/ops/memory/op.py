"""RAM-Net memory: the power-decay moving average (PDMA) over M slots per head (docs/ramnet.md sections 4 and 6).

For every slot m of one (batch, head), with dense write weights w_t and read weights r_t over the M slots:

    S_t[m] = (1 - w_t[m])^gamma * S_{t-1}[m] + w_t[m] * v_t          S_0 = 0
    z_t[m] = (1 - w_t[m])^gamma * z_{t-1}[m] + w_t[m]                z_0 = 1 / M
    o_t    = sum_m r_t[m] * S_t[m] / (z_t[m] + eps)                   (reads see the same step's write)

The addresses arrive sparse, as K (index, value) pairs per token. Repeated indices within one token add up
(w_t is the scatter-add of the pairs), so every implementation here agrees on codes with duplicates too.

Implementations (`impl=`):
  dense  the reference: materialises the M slots and runs the recurrence with `jax.lax.scan`.
  scan   never materialises M: sorts each sequence's write events by slot (stably, so time order holds within a
         slot) and runs each slot's recurrence as one segmented recurrence over the sorted events, in blocks
         (one small matrix product per block, then a scan over blocks; on GPUs the blocks run in a Pallas
         kernel); a second sort finds the write each read sees. The backward pass is the adjoint of that
         computation and reuses its sorts (`kernels.pdma_sorted`). Parallel over time, memory O(T * K * d_v)
         independent of M.
  pallas the Pallas kernels of `kernels.pdma` (a chunked Triton kernel on GPUs, a Mosaic kernel on TPUs, the
         Triton kernel in interpret mode elsewhere), forward and backward. Memory O(T * K * d_v) plus the
         M x d_v state per (batch, head), which the kernel touches only at the K slots of each token.
  auto   the fastest correct path on the current backend and size (`resolve_impl`).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ramjax.ops.shared import checks, numerics

IMPLS = ("auto", "dense", "scan", "pallas")


class PDMAState(NamedTuple):
    """The recurrent state of one PDMA layer: what `pdma_step` carries from token to token."""

    memory: jax.Array  # S: [batch, heads, M, d_v]
    normaliser: jax.Array  # z: [batch, heads, M]


# ----------------------------------------------------------------------------------------------------------
# The decay factor (1 - w)^gamma with the spec's backward proxy.


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def decay_factor(w: jax.Array, gamma: float, grad_eps: float) -> jax.Array:
    """(1 - w)^gamma, exact in the forward pass.

    The backward pass differentiates (grad_eps + (1 - grad_eps)(1 - w))^gamma instead, because the true
    derivative gamma (1 - w)^(gamma - 1) blows up as w -> 1 for gamma < 1. 1 - w is clipped at 0 so that
    duplicate writes whose weights sum past 1 empty the slot instead of producing NaN.
    """
    base = jnp.maximum(1 - w, 0)
    if float(gamma).is_integer():
        return base ** int(gamma)  # integer_pow: exact, and 0^0 = 1
    return base**gamma


@decay_factor.defjvp
def _decay_factor_jvp(gamma, grad_eps, primals, tangents):
    (w,), (w_dot,) = primals, tangents
    out = decay_factor(w, gamma, grad_eps)
    if gamma == 0:
        return out, jnp.zeros_like(w_dot)
    proxy_base = grad_eps + (1 - grad_eps) * jnp.maximum(1 - w, 0)
    if float(gamma - 1).is_integer():
        proxy_power = proxy_base ** int(gamma - 1)
    else:
        proxy_power = proxy_base ** (gamma - 1)
    return out, -gamma * (1 - grad_eps) * proxy_power * w_dot


# ----------------------------------------------------------------------------------------------------------
# Argument checks.


def _check_hyper(num_slots, gamma, eps, grad_eps) -> None:
    checks.require_positive_int("num_slots", num_slots)
    if not isinstance(gamma, numbers.Real) or not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma: must be a finite number >= 0 (a Python number, not an array), got {gamma!r}")
    if not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"eps: must be a number >= 0, got {eps!r}")
    if not isinstance(grad_eps, numbers.Real) or not 0 <= grad_eps < 1:
        raise ValueError(f"grad_eps: must be a number in [0, 1), got {grad_eps!r}")


def _check_codes(idx_name, idx, val_name, val, lead: tuple, lead_names: str, num_slots: int) -> None:
    """Checks one (indices, values) sparse code of shape lead + [K]."""
    checks.require_shape(idx_name, idx, lead + (None,), f"[{lead_names}, K]")
    checks.require_shape(val_name, val, tuple(idx.shape), f"[{lead_names}, K] like {idx_name}")
    checks.require_integer(idx_name, idx)
    checks.require_floating(val_name, val)
    top_k = idx.shape[-1]
    if top_k > num_slots:
        raise ValueError(f"{idx_name}: K = {top_k} slots per token is more than num_slots = {num_slots}")
    checks.require_index_range(idx_name, idx, num_slots)


def _check_pdma_args(read_idx, read_val, write_idx, write_val, v, num_slots, gamma, eps, grad_eps, impl):
    if impl not in IMPLS:
        raise ValueError(f"impl: must be one of {IMPLS}, got {impl!r}")
    _check_hyper(num_slots, gamma, eps, grad_eps)
    checks.require_floating("v", v)
    if v.ndim != 4:
        raise ValueError(f"v: expected shape [batch, time, heads, d_v], got {tuple(v.shape)}")
    lead = tuple(v.shape[:3])
    _check_codes("read_idx", read_idx, "read_val", read_val, lead, "batch, time, heads", num_slots)
    _check_codes("write_idx", write_idx, "write_val", write_val, lead, "batch, time, heads", num_slots)


# ----------------------------------------------------------------------------------------------------------
# impl="dense": the reference.


def _dense_weights(idx: jax.Array, val: jax.Array, num_slots: int) -> jax.Array:
    """Scatter-adds the K (index, value) pairs of `[..., K]` into dense `[..., M]` weights."""
    return jnp.einsum("...k,...km->...m", val, jax.nn.one_hot(idx, num_slots, dtype=val.dtype))


# The implementations are jitted so that eager calls compile once instead of dispatching op by op; inside an
# outer jit they inline.
_jit_with_static_hyper = functools.partial(jax.jit, static_argnums=(5, 6, 7, 8))


@_jit_with_static_hyper
def _pdma_dense(read_idx, read_val, write_idx, write_val, v, num_slots, gamma, eps, grad_eps):
    batch, _, heads, d_v = v.shape
    dtype = v.dtype

    def step(carry, inputs):
        memory, normaliser = carry  # [batch, heads, M, d_v], [batch, heads, M]
        r_idx, r_val, w_idx, w_val, v_t = inputs  # [batch, heads, K] x 4, [batch, heads, d_v]
        w = _dense_weights(w_idx, w_val, num_slots)
        r = _dense_weights(r_idx, r_val, num_slots)
        a = decay_factor(w, gamma, grad_eps)
        memory = a[..., None] * memory + w[..., None] * v_t[:, :, None, :]
        normaliser = a * normaliser + w
        o_t = jnp.einsum("bhm,bhmd->bhd", r / (normaliser + eps), memory)
        return (memory, normaliser), o_t

    init = (
        jnp.zeros((batch, heads, num_slots, d_v), dtype),
        jnp.full((batch, heads, num_slots), 1.0 / num_slots, dtype),
    )
    time_major = [jnp.moveaxis(a, 1, 0) for a in (read_idx, read_val, write_idx, write_val, v)]
    _, o = jax.lax.scan(step, init, time_major)
    return jnp.moveaxis(o, 0, 1)


# ----------------------------------------------------------------------------------------------------------
# impl="pallas": the kernels package.

# Kernel and tiling for impl="pallas" on GPUs (the sparse gated scan's Triton kernel; tokens per chunk, warps
# per program, state columns per program), chosen by measurement on an H200: see kernels/README.md. The token
# scan (backend "token") was measured slower as compiled so far (27 ms forward at B=8 T=4096 against 6.6 ms).
PALLAS_GPU_OPTIONS = {"chunk": 2, "num_warps": 4, "d_tile": 32}
PALLAS_GPU_BACKEND = "triton"


def pallas_backend() -> tuple[str, bool]:
    """(kernel backend, interpret) for the current default device."""
    platform = jax.default_backend()
    if platform == "gpu":
        return PALLAS_GPU_BACKEND, False
    if platform == "tpu":
        return "tpu", False
    return PALLAS_GPU_BACKEND, True  # interpret mode: the GPU's kernel, run by the CPU


@_jit_with_static_hyper
def _pdma_pallas(read_idx, read_val, write_idx, write_val, v, num_slots, gamma, eps, grad_eps):
    from kernels import pdma as kernel_pdma

    backend, interpret = pallas_backend()
    options = PALLAS_GPU_OPTIONS if backend == PALLAS_GPU_BACKEND else {}
    return kernel_pdma.pdma(read_idx, read_val, write_idx, write_val, v, num_slots=num_slots, gamma=gamma, eps=eps,
                            grad_eps=grad_eps, backend=backend, interpret=interpret, **options)


# ----------------------------------------------------------------------------------------------------------
# impl="scan": the sorted-event scan of the kernels package (plain jax.numpy, any backend).

# Sorted write events per block (one [block, block] matrix product per block), chosen on an H200 at B=8 T=4096
# H=16, fwd+bwd (experiments/results/pdma_kernel_tuning.md): in jax.numpy 16 / 32 / 64 / 128 -> 16.0 / 15.8 /
# 17.3 / 23.5 ms (2026-11-30); with the Pallas block kernel 16 / 32 / 64 -> 8.2 / 10.2 / 116 ms (2026-12-01; at 64
# the kernel's [64, 64] weights spill).
SCAN_BLOCK = 32
SCAN_KERNEL_BLOCK = 16
# Platforms on which impl="scan" runs its blocks by the Pallas kernel (kernels/sorted_blocks.py, Triton lowering)
# rather than jax.numpy.
SCAN_BLOCK_KERNEL_PLATFORMS = ("gpu",)


@_jit_with_static_hyper
def _pdma_scan(read_idx, read_val, write_idx, write_val, v, num_slots, gamma, eps, grad_eps):
    from kernels import pdma as kernel_pdma

    kernel = jax.default_backend() in SCAN_BLOCK_KERNEL_PLATFORMS
    return kernel_pdma.pdma(read_idx, read_val, write_idx, write_val, v, num_slots=num_slots, gamma=gamma, eps=eps,
                            grad_eps=grad_eps, backend="sorted", chunk=SCAN_KERNEL_BLOCK if kernel else SCAN_BLOCK,
                            block_kernel=kernel)


_IMPL_FUNCTIONS = {"dense": _pdma_dense, "scan": _pdma_scan, "pallas": _pdma_pallas}


# On the CPU the dense reference wins while the whole memory is small: its per-step work is M * d_v, the scan's
# is two sorts and a blocked recurrence over 3 T K events. Measured (experiments/results/ram_memory_cpu.md, d_v 64,
# K 8): dense is faster forward and backward at M = 32, the scan from M = 243 up (4x at 243, 20x at 1024, fwd+bwd).
_CPU_DENSE_MAX_STATE = 32 * 64
# On GPUs the Pallas kernel walks each (batch, head) sequence with one program per column tile (a chain of T / 2
# dependent steps); the scan is parallel over time. Measured on an H200 (experiments/results/pdma_kernel_tuning.md,
# 16 heads, fwd+bwd): B=8 T=4096 scan 15.8 ms / pallas 16.8 ms; B=2 T=16384 scan 19.8 / pallas 33.9 (2026-11-22);
# B=1 T=65536 scan 52 / pallas 113. So the scan is the GPU's default at every size measured.
_GPU_PALLAS_MIN_SEQUENCES = None  # batch x heads from which pallas would win; None: at no size measured


def resolve_impl(impl: str, num_slots: int, d_v: int, sequences: int = 1) -> str:
    """The implementation `impl="auto"` stands for at this size on the current default backend; `sequences` is
    batch x heads (the independent recurrences)."""
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "cpu" and num_slots * d_v <= _CPU_DENSE_MAX_STATE:
        return "dense"
    if backend == "gpu" and _GPU_PALLAS_MIN_SEQUENCES is not None and sequences >= _GPU_PALLAS_MIN_SEQUENCES:
        return "pallas"
    # The scan's memory does not grow with M, and it is parallel over time where dense is sequential.
    return "scan"


def pdma(
    read_idx: jax.Array,
    read_val: jax.Array,
    write_idx: jax.Array,
    write_val: jax.Array,
    v: jax.Array,
    *,
    num_slots: int,
    gamma: float = 1.0,
    eps: float = 1e-6,
    grad_eps: float = 1e-3,
    impl: str = "auto",
    sharding: jax.sharding.NamedSharding | None = None,
) -> jax.Array:
    """RAM-Net memory read-out for a whole sequence.

    Args:
      read_idx, read_val: `[batch, time, heads, K_read]` sparse read addresses (int indices in [0, M), weights).
      write_idx, write_val: `[batch, time, heads, K_write]` sparse write addresses.
      v: `[batch, time, heads, d_v]` values written.
      num_slots: M, the number of memory slots per head.
      gamma: decay power, >= 0 (1 = exponential moving average, 0 = cumulative mean).
      eps: added to the normaliser before dividing.
      grad_eps: smoothing of the backward proxy for (1 - w)^gamma; the forward pass is exact.
      impl: "auto", "dense", "scan" or "pallas" (see the module docstring).
      sharding: how the `[batch, time, heads, ...]` arguments are laid out on a device mesh (time unsplit).
        With impl "pallas" or "scan" the op then runs on each device's shard under `shard_map` (every
        (batch, head) is independent), instead of on arrays XLA would first gather; "dense" ignores it.

    Returns:
      o: `[batch, time, heads, d_v]` in v's dtype (computed in fp32 or wider).
    """
    read_idx, read_val, write_idx, write_val, v = map(jnp.asarray, (read_idx, read_val, write_idx, write_val, v))
    _check_pdma_args(read_idx, read_val, write_idx, write_val, v, num_slots, gamma, eps, grad_eps, impl)
    dtype = numerics.compute_dtype(read_val, write_val, v)  # fp32 at least: the state accumulates over the sequence
    chosen = resolve_impl(impl, num_slots, v.shape[-1], sequences=v.shape[0] * v.shape[2])
    run = functools.partial(_IMPL_FUNCTIONS[chosen], num_slots=num_slots, gamma=gamma, eps=eps, grad_eps=grad_eps)
    # Every (batch, head) is independent: under a mesh both kernels run per device shard. (The scan's flat sort
    # mixes rows, so left to GSPMD it would gather the batch first.)
    if chosen in ("pallas", "scan") and sharding is not None and sharding.mesh.size > 1:
        if len(sharding.spec) > 1 and sharding.spec[1] is not None:
            raise ValueError(f"sharding: the time axis must not be split, got {sharding.spec}")
        run = jax.shard_map(run, mesh=sharding.mesh, in_specs=(sharding.spec,) * 5, out_specs=sharding.spec,
                            check_vma=False)
    o = run(read_idx.astype(jnp.int32), read_val.astype(dtype), write_idx.astype(jnp.int32),
            write_val.astype(dtype), v.astype(dtype))
    return o.astype(v.dtype)


# ----------------------------------------------------------------------------------------------------------
# The recurrent (decode) form: O(K * d_v) work per token.


def pdma_init(batch: int, heads: int, num_slots: int, d_v: int, dtype=jnp.float32) -> PDMAState:
    """The state before the first token: S_0 = 0, z_0 = 1 / M."""
    for name, value in (("batch", batch), ("heads", heads), ("num_slots", num_slots), ("d_v", d_v)):
        checks.require_positive_int(name, value)
    return PDMAState(
        memory=jnp.zeros((batch, heads, num_slots, d_v), dtype),
        normaliser=jnp.full((batch, heads, num_slots), 1.0 / num_slots, dtype),
    )


@functools.partial(jax.jit, static_argnums=(8, 9, 10))
def _pdma_step_batched(memory, normaliser, layer, read_idx, read_val, write_idx, write_val, v, gamma, eps, grad_eps):
    """One token for every (batch, head): memory [(layers,) batch, heads, M, d_v], codes [batch, heads, K].

    One gather and one scatter by explicit ((layer,) batch, head, slot) indices, so that a state stacked over
    layers is updated at one layer's K rows per head: XLA does it in place when the state is loop-carried or
    donated, and nothing else in the step has a dimension M."""
    batch, heads = write_idx.shape[:2]
    prefix = (jnp.arange(batch)[:, None, None], jnp.arange(heads)[None, :, None])
    if layer is not None:
        prefix = (layer,) + prefix
    # Each write sees the total weight on its slot this step, so repeated indices act as one write.
    same_slot = write_idx[..., :, None] == write_idx[..., None, :]
    w_slot = jnp.einsum("...jk,...k->...j", same_slot.astype(write_val.dtype), write_val)
    a = decay_factor(w_slot, gamma, grad_eps)
    new_rows = a[..., None] * memory[(*prefix, write_idx)] + w_slot[..., None] * v[:, :, None, :]
    new_norms = a * normaliser[(*prefix, write_idx)] + w_slot
    # Repeated indices store identical rows, so the order of the stores does not matter.
    memory = memory.at[(*prefix, write_idx)].set(new_rows)
    normaliser = normaliser.at[(*prefix, write_idx)].set(new_norms)
    weights = read_val / (normaliser[(*prefix, read_idx)] + eps)
    o = jnp.einsum("...k,...kd->...d", weights, memory[(*prefix, read_idx)])
    return o, memory, normaliser


def pdma_step(
    state: PDMAState,
    read_idx: jax.Array,
    read_val: jax.Array,
    write_idx: jax.Array,
    write_val: jax.Array,
    v: jax.Array,
    *,
    gamma: float = 1.0,
    eps: float = 1e-6,
    grad_eps: float = 1e-3,
    layer: int | jax.Array | None = None,
) -> tuple[jax.Array, PDMAState]:
    """One token of PDMA: codes `[batch, heads, K]`, v `[batch, heads, d_v]` -> (o `[batch, heads, d_v]`, state).

    Touches K slots per (batch, head), in place where the state is a loop carry or a donated argument. With
    `layer` (an int scalar in [0, layers), may be traced), the state is stacked over layers (memory `[layers,
    batch, heads, M, d_v]`, normaliser `[layers, batch, heads, M]`, as a scan over layers carries it) and only
    that layer steps: slicing a layer out and stacking it back would copy its whole memory every token."""
    memory, normaliser = state
    read_idx, read_val, write_idx, write_val, v = map(jnp.asarray, (read_idx, read_val, write_idx, write_val, v))
    lead = () if layer is None else ("layers",)
    if memory.ndim != 4 + len(lead) or normaliser.shape != memory.shape[:-1]:
        names = ", ".join(lead + ("batch", "heads"))
        raise ValueError(
            f"state: expected memory [{names}, M, d_v] and normaliser [{names}, M], got "
            f"{tuple(memory.shape)} and {tuple(normaliser.shape)}"
        )
    if layer is not None:
        layer = jnp.asarray(layer)
        if layer.ndim or not jnp.issubdtype(layer.dtype, jnp.integer):
            raise ValueError(f"layer: expected an int scalar, got {layer.dtype}{list(layer.shape)}")
        layer = layer.astype(jnp.int32)
    batch, heads, num_slots, d_v = memory.shape[len(lead):]
    _check_hyper(num_slots, gamma, eps, grad_eps)
    checks.require_floating("v", v)
    checks.require_shape("v", v, (batch, heads, d_v), "[batch, heads, d_v]")
    _check_codes("read_idx", read_idx, "read_val", read_val, (batch, heads), "batch, heads", num_slots)
    _check_codes("write_idx", write_idx, "write_val", write_val, (batch, heads), "batch, heads", num_slots)

    dtype = memory.dtype
    o, memory, normaliser = _pdma_step_batched(
        memory,
        normaliser,
        layer,
        read_idx.astype(jnp.int32),
        read_val.astype(dtype),
        write_idx.astype(jnp.int32),
        write_val.astype(dtype),
        v.astype(dtype),
        gamma,
        eps,
        grad_eps,
    )
    return o.astype(v.dtype), PDMAState(memory, normaliser)
