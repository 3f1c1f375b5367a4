"""The RAM-Net token mixer (docs/ramnet.md sections 2-5).

Per head: q = exp(alpha_h) W_q x and k = exp(alpha_h) W_k x (the learnable temperature of section 5),
v = W_v x; write and read addresses are the top-K product-softmax codes of k and q, shifted by CAPE on the heads
the schedule names; the PDMA memory is written with v and read; W_o maps the heads back to d_model.
Every number (U, d_p, K, gamma, eps, d_v, heads) is an argument, and so a config field of `model.ramnet`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ramjax import ops
from ramjax.layers.axes import dense, logical_param
from ramjax.layers.conv import ShortConv, convolve_all
from ramjax.layers.norm import GatedRMSNorm, RMSNorm

CAPE_SCHEDULES = ("paper", "half", "all", "none")
# The logit of digit 0 in a factor the training schedule holds (ramjax/train/factor_schedule.py): its softmax
# puts all but ~(d_p - 1) e^-30 (about 1e-13 each) of the mass there, so a held factor multiplies every product by
# ~1 and no slot with another digit enters the top K while K <= d_p^active.
FIXED_LOGIT = 30.0


def cape_heads_per_layer(schedule: str | Sequence[int], num_layers: int, num_heads: int) -> list[int]:
    """How many heads (the first ones) of each layer use CAPE.

    "paper": all heads in layers 1-4, half in layers 5-8, none after (absolute addressing); "half" (half the
    heads, rounded up, in every layer); "all"; "none"; or one count per layer."""
    if isinstance(schedule, str):
        if schedule not in CAPE_SCHEDULES:
            raise ValueError(f"model.ramnet.cape: must be one of {CAPE_SCHEDULES} or one head count per layer, "
                             f"got {schedule!r}")
        if schedule == "all":
            return [num_heads] * num_layers
        if schedule == "none":
            return [0] * num_layers
        if schedule == "half":
            return [(num_heads + 1) // 2] * num_layers
        return [num_heads if layer < 4 else num_heads // 2 if layer < 8 else 0 for layer in range(num_layers)]
    counts = [int(c) for c in schedule]
    if len(counts) != num_layers or any(not 0 <= c <= num_heads for c in counts):
        raise ValueError(f"model.ramnet.cape: an explicit schedule needs {num_layers} counts (one per layer), each "
                         f"in [0, {num_heads}], got {tuple(schedule)}")
    return counts


def cape_offset_biases(num_heads: int, num_factors: int, factor_size: int, cape_mask: jax.Array, scale: float):
    """W_q and W_k biases `[num_heads * U * d_p]` under which CAPE head h (the first ones, `cape_mask`) reads at
    initialisation the slot written h + 1 tokens before: k's bias favours slot 0 (digit 0 of every factor) and q's
    the slot h + 1 (its mixed-radix digits, the first factor most significant), each favoured digit by a logit of
    `scale`. With CAPE a write at position s lands in slot (0 - s) mod M and a read at t in (h + 1 - t) mod M: the
    same slot when t = s + h + 1. Other heads get no bias."""
    num_slots = factor_size**num_factors
    digits = np.zeros((num_heads, num_factors), np.int64)  # q's target slot per head, one digit per factor
    for h in range(num_heads):
        offset = (h + 1) % num_slots
        for u in range(num_factors - 1, -1, -1):
            offset, digits[h, u] = divmod(offset, factor_size)
    q_bias = scale * jax.nn.one_hot(jnp.asarray(digits), factor_size)  # [heads, U, d_p]
    k_bias = scale * jax.nn.one_hot(jnp.zeros((num_heads, num_factors), jnp.int32), factor_size)
    mask = jnp.asarray(cape_mask)[:, None, None]
    return tuple(jnp.where(mask, b, 0.0).reshape(-1) for b in (q_bias, k_bias))


class CapeHeads(nnx.Variable):
    """A fixed bool mask `[heads]`: which heads shift their addresses by position. Not trained."""


class RAMNetMixer(nnx.Module):
    """x `[batch, time, d_model]`, positions int `[batch, time]` -> `[batch, time, d_model]`."""

    def __init__(self, d_model: int, *, num_heads: int, num_factors: int, factor_size: int, top_k: int, d_v: int,
                 gamma: float = 1.0, eps: float = 1e-6, grad_eps: float = 1e-3, cape_heads: int | jax.Array = 0,
                 alpha_init: float = 0.0, output_norm: bool = False, output_gate: bool = False,
                 short_conv: int = 0, qk_bias: bool = False, cape_offset_bias: float = 0.0, impl: str = "auto",
                 decoder_impl: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        num_slots = factor_size**num_factors
        if top_k > num_slots:
            raise ValueError(f"model.ramnet.top_k: must be <= M = factor_size ** num_factors = {num_slots}, "
                             f"got {top_k}")
        self.num_heads, self.num_factors, self.top_k, self.d_v = num_heads, num_factors, top_k, d_v
        self.num_slots, self.gamma, self.eps, self.grad_eps, self.impl = num_slots, gamma, eps, grad_eps, impl
        self.decoder_impl = decoder_impl
        # The K the addresses keep: the model's K, except while a training schedule asks for a larger one
        # (ramjax/train/top_k_schedule.py). Static: a train step compiled for another K has another graph.
        self.active_top_k = top_k
        # The factors the addresses use: all U, except while a training schedule grows the memory
        # (ramjax/train/factor_schedule.py) and holds the first U - active_factors at digit 0. Static, as K.
        self.active_factors = num_factors
        d_k = num_factors * factor_size
        self.d_k = d_k
        # Ours, off by default (the paper's W_q, W_k have none): a bias lets an address depend on position alone
        # (with CAPE: "the slot the previous token wrote"), which a bias-free projection of x cannot form.
        self.q_proj = dense(d_model, num_heads * d_k, "embed", "heads", dtype=dtype, rngs=rngs, bias=qk_bias)
        self.k_proj = dense(d_model, num_heads * d_k, "embed", "heads", dtype=dtype, rngs=rngs, bias=qk_bias)
        self.v_proj = dense(d_model, num_heads * d_v, "embed", "heads", dtype=dtype, rngs=rngs)
        self.o_proj = dense(num_heads * d_v, d_model, "heads", "embed", dtype=dtype, rngs=rngs)
        # log temperature per head, shared by W_q and W_k (w_ij = exp(alpha_h) w'_ij).
        self.alpha = logical_param(jnp.full((num_heads,), alpha_init, jnp.float32), "heads")
        self.cape_heads = CapeHeads(jnp.arange(num_heads) < cape_heads, out_sharding=("heads",),
                                    eager_sharding=False)
        if cape_offset_bias:
            # Ours, off by default: CAPE heads that start as "read what was written h + 1 tokens ago" (a relative
            # address the optimiser did not find from a zero bias; docs/ramnet.md section 7).
            if not qk_bias:
                raise ValueError(f"model.ramnet.cape_offset_bias: sets the W_q / W_k biases, so it needs "
                                 f"model.ramnet.qk_bias = True; got cape_offset_bias {cape_offset_bias} with no bias")
            q_bias, k_bias = cape_offset_biases(num_heads, num_factors, factor_size, self.cape_heads[...],
                                                cape_offset_bias)
            self.q_proj.bias.set_value(q_bias.astype(self.q_proj.bias.dtype))
            self.k_proj.bias.set_value(k_bias.astype(self.k_proj.bias.dtype))
        self.gate_proj = (dense(d_model, num_heads * d_v, "embed", "heads", dtype=dtype, rngs=rngs)
                          if output_gate else None)
        # Ours, off by default (the paper has none): a short causal conv on the q, k and v projections, the
        # token shift that Mamba-2 / Gated DeltaNet have and that recall tasks need (see configs/mqar.py).
        self.convs = nnx.List([ShortConv(width, short_conv, activation=False, dtype=dtype, rngs=rngs)
                               for width in (num_heads * d_k, num_heads * d_k, num_heads * d_v)]
                              if short_conv else [])
        norm_type = GatedRMSNorm if output_gate else RMSNorm
        self.out_norm = norm_type(d_v, axis_name=None) if (output_norm or output_gate) else None
        # The mesh layout of [batch, time, heads, ...] inside this layer (set by LanguageModel.shard_activations):
        # the Pallas memory kernel then runs per device shard.
        self.kernel_sharding = None

    def _projections(self, x: jax.Array, windows=None):
        """q, k `[batch, time, heads, d_k]` (scaled by the temperature), v `[batch, time, heads, d_v]`, and the
        short convs' windows after x (decoding: `windows` holds those before x; None in training)."""
        batch, seq_len, _ = x.shape
        outputs = [projection(x) for projection in (self.q_proj, self.k_proj, self.v_proj)]
        new_windows = []
        if self.convs:
            outputs, new_windows = convolve_all(self.convs, outputs, windows)
            new_windows = new_windows or []
        scale = jnp.exp(self.alpha[...])[:, None].astype(x.dtype)
        q = outputs[0].reshape(batch, seq_len, self.num_heads, self.d_k) * scale
        k = outputs[1].reshape(batch, seq_len, self.num_heads, self.d_k) * scale
        v = outputs[2].reshape(batch, seq_len, self.num_heads, self.d_v)
        return q, k, v, new_windows

    def _held_factors(self, x: jax.Array) -> jax.Array:
        """q or k with the first U - active_factors factors' logits replaced by fixed ones on digit 0 (no gradient
        reaches them): the addresses then range over the first d_p^active_factors slots."""
        held = self.num_factors - self.active_factors
        if held <= 0:
            return x
        factors = x.reshape(*x.shape[:-1], self.num_factors, -1)
        fixed = FIXED_LOGIT * jax.nn.one_hot(0, factors.shape[-1], dtype=x.dtype)
        is_held = (jnp.arange(self.num_factors) < held)[:, None]
        return jnp.where(is_held, fixed, factors).reshape(x.shape)

    def _codes(self, q: jax.Array, k: jax.Array, positions: jax.Array):
        """Read codes of q and write codes of k, (idx, val) each `[batch, time, heads, K]`, CAPE applied."""
        q, k = self._held_factors(q), self._held_factors(k)
        decode = functools.partial(ops.product_topk, num_factors=self.num_factors, top_k=self.active_top_k,
                                   impl=self.decoder_impl, sharding=self.kernel_sharding)
        with jax.named_scope("decoder"):  # names its share in profiles (experiments/profile_train_step.py)
            read_idx, read_val = decode(q)
            write_idx, write_val = decode(k)
        shifted = self.cape_heads[...][None, None, :, None]
        position = positions.astype(jnp.int32)[:, :, None, None]
        read_idx = jnp.where(shifted, ops.cape_shift(read_idx, position, self.num_slots), read_idx)
        write_idx = jnp.where(shifted, ops.cape_shift(write_idx, position, self.num_slots), write_idx)
        return (read_idx, read_val), (write_idx, write_val)

    def addresses(self, x: jax.Array, positions: jax.Array):
        """Sparse read and write codes (idx, val), each `[batch, time, heads, K]`, with CAPE applied."""
        q, k, _, _ = self._projections(x)
        return self._codes(q, k, positions)

    def _output(self, x: jax.Array, o: jax.Array) -> jax.Array:
        batch, seq_len, _ = x.shape
        if self.gate_proj is not None:
            o = self.out_norm(o, self.gate_proj(x).reshape(o.shape))
        elif self.out_norm is not None:
            o = self.out_norm(o)
        return self.o_proj(o.reshape(batch, seq_len, -1))

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        q, k, v, _ = self._projections(x)
        (read_idx, read_val), (write_idx, write_val) = self._codes(q, k, positions)
        with jax.named_scope("op"):
            o = ops.pdma(read_idx, read_val, write_idx, write_val, v, num_slots=self.num_slots, gamma=self.gamma,
                         eps=self.eps, grad_eps=self.grad_eps, impl=self.impl, sharding=self.kernel_sharding)
        return self._output(x, o)

    def init_cache(self, batch: int, max_len: int) -> dict:
        """The decoding state: the PDMA memory and normaliser (`[batch, heads, M, d_v]`, `[batch, heads, M]`,
        fp32; its size does not depend on max_len) and the short convs' windows."""
        del max_len
        return {"memory": ops.pdma_init(batch, self.num_heads, self.num_slots, self.d_v),
                "windows": [conv.init_window(batch) for conv in self.convs]}

    def extend(self, x: jax.Array, positions: jax.Array, cache: dict, fresh: bool = False,
               layer: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """`__call__` over x `[batch, time, d_model]` continuing from `cache`; returns (y, the cache after x).
        The memory is carried token by token with `pdma_step` (K slots touched per token, whatever M).

        `layer`: `cache` is stacked over the scanned layer groups (every leaf `[groups, ...]`, as
        LanguageModel.extend carries it) and this layer's part is `layer`; the memory is then stepped in place
        in the stack (slicing it out and back would copy all M slots every token)."""
        del fresh
        windows = cache["windows"]
        if layer is not None:
            windows = [jax.lax.dynamic_index_in_dim(w, layer, keepdims=False) for w in windows]
        q, k, v, windows = self._projections(x, windows)
        (read_idx, read_val), (write_idx, write_val) = self._codes(q, k, positions)

        def step(state, inputs):
            o, state = ops.pdma_step(state, *inputs, gamma=self.gamma, eps=self.eps, grad_eps=self.grad_eps,
                                     layer=layer)
            return state, o

        time_major = [jnp.moveaxis(a, 1, 0) for a in (read_idx, read_val, write_idx, write_val, v)]
        memory, o = jax.lax.scan(step, cache["memory"], time_major)
        o = jnp.moveaxis(o, 0, 1).astype(v.dtype)
        if layer is not None:
            windows = [jax.lax.dynamic_update_index_in_dim(stack, w, layer, 0)
                       for stack, w in zip(cache["windows"], windows, strict=True)]
        return self._output(x, o), {"memory": memory, "windows": windows}
