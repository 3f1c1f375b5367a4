"""The language model: embeddings, pre-norm residual blocks (token mixer + SwiGLU MLP, RMSNorm), LM head.

Options that rebuild the adaptive-decay fork's synthetic-task model (docs/loglinear.md section 6), each off by
default: `model.block = "post_norm"` (x = norm(x + f(x))), `model.norm = "layer"` (LayerNorm), `model.feed_forward =
False` (the mixer alone), `model.weight_init = "normal"` (every Linear and the embedding N(0, init_std)).

The mixer of each layer comes from `model.pattern`, repeated over the depth (a hybrid such as
"ramnet,ramnet,ramnet,attention" gives three RAM-Net layers then one attention layer, and again). One period of
the pattern is a `BlockGroup`; with `model.scan_layers` the groups are created stacked (nnx.vmap, a leading
"layers" axis on every parameter) and run by nnx.scan, so compile time does not grow with depth.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ramjax.layers.axes import dense, logical_init
from ramjax.layers.embedding import TokenEmbedding
from ramjax.layers.fenwick_decay import FenwickDecay
from ramjax.layers.mlp import SwiGLU
from ramjax.layers.norm import LayerNorm, RMSNorm
from ramjax.layers.ramnet import RAMNetMixer, cape_heads_per_layer
from ramjax.models.mixers import compute_dtype, make_mixer, parse_pattern

BLOCKS = ("pre_norm", "post_norm")  # model.block
NORMS = ("rms", "layer")  # model.norm
WEIGHT_INITS = ("default", "normal")  # model.weight_init
# The projections that write into the residual stream: "normal" scales their std by 1 / sqrt(2 num_layers), as
# GPT-2 and the fork do (0.02 / sqrt(4) = 0.01 at 2 layers).
RESIDUAL_OUTPUTS = ("out_proj", "o_proj", "down")


def mlp_hidden(cfg) -> int:
    """model.mlp_hidden, or (when 0) 8/3 d_model rounded up to a multiple of 8: SwiGLU at the MLP cost of 4x."""
    if cfg.mlp_hidden:
        return cfg.mlp_hidden
    return -(-(8 * cfg.d_model) // 3 // 8) * 8


def cape_schedule(cfg) -> np.ndarray:
    """CAPE head count per layer (used by RAM-Net layers only)."""
    schedule = cfg.ramnet.cape
    if isinstance(schedule, str) and "," in schedule:
        schedule = [int(c) for c in schedule.split(",")]
    return np.asarray(cape_heads_per_layer(schedule, cfg.num_layers, cfg.num_heads), np.int32)


# model.remat_policy: what a rematerialised layer group (model.remat) keeps from its forward pass for the
# backward one. "nothing": only the group's input (the least memory; the whole forward runs twice); "dots": also
# every matrix product without a batch dimension (the projections), so the backward pass recomputes only the
# element-wise work and the ops' batched chunk products.
REMAT_POLICIES = {"nothing": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def check_model_options(cfg) -> None:
    """model.block, model.norm, model.feed_forward, model.weight_init and model.init_std, each error naming the
    field, its value and what is allowed (configs recorded before these fields existed read as the defaults)."""
    for field, allowed in (("block", BLOCKS), ("norm", NORMS), ("weight_init", WEIGHT_INITS)):
        value = cfg.get(field, allowed[0])
        if value not in allowed:
            raise ValueError(f"model.{field}: must be one of {allowed}, got {value!r}")
    if not isinstance(cfg.get("feed_forward", True), bool):
        raise ValueError(f"model.feed_forward: must be True or False, got {cfg.feed_forward!r}")
    if cfg.get("remat_policy", "nothing") not in REMAT_POLICIES:
        raise ValueError(f"model.remat_policy: must be one of {tuple(REMAT_POLICIES)}, got {cfg.remat_policy!r}")
    std = cfg.get("init_std", 0.02)
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not 0 < std < math.inf:
        raise ValueError(f"model.init_std: must be a finite number > 0, got {std!r}")


def residual_norm(cfg) -> nnx.Module:
    """The norm of the residual stream: model.norm's RMSNorm or LayerNorm."""
    if cfg.get("norm", "rms") == "layer":
        return LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    return RMSNorm(cfg.d_model, eps=cfg.norm_eps)


class Block(nnx.Module):
    """pre_norm: x + mixer(norm(x)), then x + mlp(norm(x)). post_norm: norm(x + mixer(x)), then norm(x + mlp(x)).
    Without a feed-forward block (model.feed_forward False), the mixer half alone."""

    def __init__(self, kind: str, cfg, cape_heads, *, rngs: nnx.Rngs):
        dtype = compute_dtype(cfg)
        self.post_norm = cfg.get("block", "pre_norm") == "post_norm"
        self.mixer_norm = residual_norm(cfg)
        self.kind = kind
        self.mixer = make_mixer(kind, cfg, cape_heads, rngs=rngs)
        if cfg.get("feed_forward", True):
            self.mlp_norm = residual_norm(cfg)
            self.mlp = SwiGLU(cfg.d_model, mlp_hidden(cfg), dtype=dtype, rngs=rngs)
        else:
            self.mlp_norm = self.mlp = None

    def _mixer_input(self, x: jax.Array) -> jax.Array:
        return x if self.post_norm else self.mixer_norm(x)

    def _add(self, x: jax.Array, y: jax.Array, norm: nnx.Module) -> jax.Array:
        return norm(x + y) if self.post_norm else x + y

    def _feed_forward(self, x: jax.Array) -> jax.Array:
        if self.mlp is None:
            return x
        return self._add(x, self.mlp(x if self.post_norm else self.mlp_norm(x)), self.mlp_norm)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        # Scopes name each part's share of the step in profiles (experiments/profile_train_step.py).
        with jax.named_scope(f"mixer_{self.kind}"):
            x = self._add(x, self.mixer(self._mixer_input(x), positions), self.mixer_norm)
        with jax.named_scope("mlp"):
            return self._feed_forward(x)

    def extend(self, x: jax.Array, positions: jax.Array, cache, fresh: bool = False, layer=None):
        """`__call__` continuing from the mixer's decoding state `cache`; returns (output, the state after x).
        `layer`: `cache` is stacked over the scanned layer groups (leaves `[groups, ...]`) and this block's part is
        `layer`; the returned cache is the whole stack with that part replaced."""
        x_in = self._mixer_input(x)
        if layer is None:
            y, cache = self.mixer.extend(x_in, positions, cache, fresh)
        elif isinstance(self.mixer, RAMNetMixer):  # steps its M-slot memory in place in the stack
            y, cache = self.mixer.extend(x_in, positions, cache, fresh, layer=layer)
        else:
            # Slice the layer's state out and write it back into the carried stack (an in-place update).
            part = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False), cache)
            y, part = self.mixer.extend(x_in, positions, part, fresh)
            cache = jax.tree.map(lambda a, p: jax.lax.dynamic_update_index_in_dim(a, p, layer, 0), cache, part)
        return self._feed_forward(self._add(x, y, self.mixer_norm)), cache

    def with_addresses(self, x: jax.Array, positions: jax.Array):
        """(this block's output, the RAM-Net mixer's read and write codes, or None for other mixers)."""
        codes = (self.mixer.addresses(self._mixer_input(x), positions) if isinstance(self.mixer, RAMNetMixer)
                 else None)
        return self(x, positions), codes


class BlockGroup(nnx.Module):
    """One period of the layer pattern. `group_index` may be traced (when the groups are created stacked)."""

    def __init__(self, kinds: list[str], cfg, group_index, *, rngs: nnx.Rngs):
        cape = jnp.asarray(cape_schedule(cfg))
        period = len(kinds)
        self.blocks = nnx.List([
            Block(kind, cfg, cape[group_index * period + offset], rngs=rngs) for offset, kind in enumerate(kinds)
        ])

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x, positions)
        return x

    def init_cache(self, batch: int, max_len: int) -> list:
        return [block.mixer.init_cache(batch, max_len) for block in self.blocks]

    def extend(self, x: jax.Array, positions: jax.Array, caches: list, fresh: bool = False, layer=None):
        new = []
        for block, cache in zip(self.blocks, caches):
            x, cache = block.extend(x, positions, cache, fresh, layer)
            new.append(cache)
        return x, new

    def with_addresses(self, x: jax.Array, positions: jax.Array):
        """(the group's output, a list of the RAM-Net blocks' ((read_idx, read_val), (write_idx, write_val)))."""
        found = []
        for block in self.blocks:
            x, codes = block.with_addresses(x, positions)
            if codes is not None:
                found.append(codes)
        return x, found


def init_normal(model: nnx.Module, std: float, num_layers: int, key: jax.Array) -> None:
    """Re-initialise, in place, every Linear's kernel N(0, std) (the residual outputs N(0, std / sqrt(2
    num_layers))) and bias 0, and the embedding N(0, std): the fork's `_init_weights`, for any mixer. The
    log-linear decay's Linears keep their own initialisation (model.loglinear.lambda_init says which)."""
    modules = list(nnx.iter_modules(model))
    decay_paths = [path for path, module in modules if isinstance(module, FenwickDecay)]
    targets = [(path, module) for path, module in modules
               if isinstance(module, (nnx.Linear, nnx.Embed))
               and not any(path[:len(d)] == d for d in decay_paths)]
    for (path, module), k in zip(targets, jax.random.split(key, len(targets))):
        if isinstance(module, nnx.Embed):
            module.embedding.set_value(std * jax.random.normal(k, jnp.shape(module.embedding[...]), jnp.float32))
            continue
        scale = std / math.sqrt(2 * num_layers) if path[-1] in RESIDUAL_OUTPUTS else std
        module.kernel.set_value(scale * jax.random.normal(k, jnp.shape(module.kernel[...]), jnp.float32))
        if module.bias is not None:
            module.bias.set_value(jnp.zeros(jnp.shape(module.bias[...]), jnp.float32))


class LanguageModel(nnx.Module):
    """tokens int `[batch, time]` (and optional positions `[batch, time]`) -> fp32 logits `[batch, time, vocab]`."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.dtype = compute_dtype(cfg)
        for name in ("vocab_size", "d_model", "num_layers", "num_heads"):
            value = cfg[name]
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name}: must be a positive integer, got {value!r}")
        check_model_options(cfg)
        layer_kinds = parse_pattern(cfg.pattern, cfg.num_layers)
        period = len(cfg.pattern.split(","))
        kinds, num_groups = layer_kinds[:period], cfg.num_layers // period
        self.scan_layers, self.remat, self.num_groups = cfg.scan_layers, cfg.remat, num_groups
        self.remat_policy = cfg.get("remat_policy", "nothing")
        self.embed = TokenEmbedding(cfg.vocab_size, cfg.d_model, grad=cfg.get("embedding_grad", "auto"),
                                    dtype=self.dtype, param_dtype=jnp.float32, rngs=rngs,
                                    embedding_init=logical_init(nnx.initializers.normal(1.0), "vocab", "embed"))
        if cfg.scan_layers:
            @nnx.split_rngs(splits=num_groups)
            @nnx.vmap(in_axes=(0, 0), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def create_groups(rngs, group_index):
                return BlockGroup(kinds, cfg, group_index, rngs=rngs)

            self.groups = create_groups(rngs, jnp.arange(num_groups))
        else:
            self.groups = nnx.List([BlockGroup(kinds, cfg, g, rngs=rngs) for g in range(num_groups)])
        self.final_norm = residual_norm(cfg)
        self.lm_head = dense(cfg.d_model, cfg.vocab_size, "embed", "vocab", dtype=self.dtype, rngs=rngs)
        if cfg.get("weight_init", "default") == "normal":
            init_normal(self, cfg.get("init_std", 0.02), cfg.num_layers, rngs.params())
        # Where the residual stream [batch, time, d_model] lives on a device mesh (set by the trainer). Without
        # it, XLA may follow the FSDP sharding of the weights into the activations and give every device the
        # whole batch (measured: 8x the temporaries on a (1, 8, 1) mesh).
        self.activation_sharding = None

    def shard_activations(self, mesh, batch_axes, heads_axes) -> None:
        """Lay the residual stream out as (batch over `batch_axes`) on `mesh`, and tell the layers with custom
        kernels (RAM-Net, GLA, Mamba-2, Gated DeltaNet: those with a `kernel_sharding`) how their per-head
        tensors are laid out (batch over `batch_axes`, heads over `heads_axes`)."""
        self.activation_sharding = NamedSharding(mesh, PartitionSpec(batch_axes, None, None))
        per_head = NamedSharding(mesh, PartitionSpec(batch_axes, None, heads_axes, None))
        modules = nnx.iter_modules(self) if hasattr(nnx, "iter_modules") else self.iter_modules()
        for _, module in modules:
            if hasattr(module, "kernel_sharding"):
                module.kernel_sharding = per_head

    def ramnet_mixers(self) -> list[RAMNetMixer]:
        """Every RAM-Net mixer in the model (one module per pattern position when the layers are scanned)."""
        modules = nnx.iter_modules(self) if hasattr(nnx, "iter_modules") else self.iter_modules()
        return [module for _, module in modules if isinstance(module, RAMNetMixer)]

    def _constrain(self, x: jax.Array) -> jax.Array:
        if self.activation_sharding is None:
            return x
        return jax.lax.with_sharding_constraint(x, self.activation_sharding)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        return self.logits(self.features(tokens, positions))

    def logits(self, features: jax.Array) -> jax.Array:
        """The LM head: final features `[..., d_model]` -> fp32 logits `[..., vocab]`."""
        return self.lm_head(features).astype(jnp.float32)

    def features(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """What the LM head reads: the final-normed residual stream `[batch, time, d_model]` (compute dtype). The
        training loss takes the head over chunks of it (train.loss_chunk_tokens) rather than whole logits."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        x = self._constrain(self.embed(tokens))

        def run_group(group, x):
            return self._constrain(group(x, positions))

        if self.remat:
            run_group = nnx.remat(run_group, policy=REMAT_POLICIES[self.remat_policy])
        if self.scan_layers:
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
            def run_all(group, x):
                return run_group(group, x)

            x = run_all(self.groups, x)
        else:
            for group in self.groups:
                x = run_group(group, x)
        return self.final_norm(x)

    # --- decoding (ramjax/models/decode.py) -------------------------------------------------------------

    def init_cache(self, batch: int, max_len: int):
        """Every layer's decoding state before the first token: a list over the pattern's positions of the
        mixers' states, each with a leading [groups] axis when the layers are scanned, else a list per group."""
        if self.scan_layers:
            one = self.groups.init_cache(batch, max_len)  # shapes only: the same for every group
            return jax.tree.map(lambda a: jnp.broadcast_to(a, (self.num_groups, *jnp.shape(a))), one)
        return [group.init_cache(batch, max_len) for group in self.groups]

    def extend(self, tokens: jax.Array, positions: jax.Array, cache, fresh: bool = False):
        """The logits of `tokens` `[batch, time]` following the tokens the decoding state `cache` has seen, and the
        state after them. Equal to the full forward pass over the concatenated sequence. `fresh`: `cache` is
        `init_cache`'s (lets the log-linear mixers use their chunked form)."""
        x = self.embed(tokens)
        if self.scan_layers:
            # The stacked cache rides in the carry and each group updates its own part of it in place. Scanned
            # over as xs -> ys instead, every token would slice each layer's state out (a copy), write it into
            # a fresh stack and copy that out: several passes over all M slots of every layer per token.
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
            def run_all(group, carry):
                x, cache, layer = carry
                x, cache = group.extend(x, positions, cache, fresh, layer)
                return x, cache, layer + 1

            x, cache, _ = run_all(self.groups, (x, cache, jnp.int32(0)))
        else:
            new = []
            for group, group_cache in zip(self.groups, cache):
                x, group_cache = group.extend(x, positions, group_cache, fresh)
                new.append(group_cache)
            cache = new
        return self.lm_head(self.final_norm(x)).astype(jnp.float32), cache

    def ramnet_addresses(self, tokens: jax.Array, positions: jax.Array | None = None) -> list:
        """The read and write codes of every RAM-Net layer, in layer order: a list of
        ((read_idx, read_val), (write_idx, write_val)), each `[batch, time, heads, K]` (CAPE applied). For
        diagnostics (the address metrics); the forward pass is the model's own."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        x = self._constrain(self.embed(tokens))
        if self.scan_layers:
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))
            def run_all(group, x):
                return group.with_addresses(x, positions)

            _, stacked = run_all(self.groups, x)  # each leaf [groups, ...]; layer = group * period + offset
            num_groups = jax.tree.leaves(stacked)[0].shape[0] if stacked else 0
            return [jax.tree.map(lambda a, g=g: a[g], codes) for g in range(num_groups) for codes in stacked]
        found = []
        for group in self.groups:
            x, codes = group.with_addresses(x, positions)
            found += codes
        return found
