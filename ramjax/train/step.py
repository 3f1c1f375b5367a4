"""The loss, the train step and the evaluation step, as pure functions of (state, batch).

The train state is {"params": nnx.State of Params, "opt_state": optax state, "step": int32}. The model's other
variables (fixed buffers such as RAM-Net's CAPE head masks) come from the config, not from checkpoints, and are
passed beside it. The loss is computed in fp32 whatever the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross-entropy of every position `[batch, time]`, in fp32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def masked_totals(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array):
    """Over the masked positions: the summed cross-entropy, the correct predictions and the count."""
    mask = loss_mask.astype(jnp.float32)
    nll_sum = jnp.sum(token_nll(logits, targets) * mask)
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * mask)
    return nll_sum, correct, jnp.sum(mask)


def chunked_masked_totals(logits_fn, features: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                          chunk_tokens: int):
    """masked_totals(logits_fn(features), targets, loss_mask) with at most `chunk_tokens` positions' logits formed
    at once (features `[batch, time, d]`, targets and loss_mask `[batch, time]`). The time axis is cut into chunks
    of chunk_tokens // batch positions (the batch axis, the one sharded over devices, stays whole), each chunk's
    logits are formed, reduced to its three totals and dropped, and the backward pass forms them again
    (jax.checkpoint): [batch, time, vocab] fp32 logits and their gradient never exist whole. At vocabulary 8192,
    batch 256 and length 1024 they are 8 GiB per copy. chunk_tokens <= 0, or a batch that fits in one chunk: the
    plain computation. The totals are sums over chunks, equal to the plain ones up to float rounding."""
    batch, time = targets.shape
    if chunk_tokens <= 0 or batch * time <= chunk_tokens:
        return masked_totals(logits_fn(features), targets, loss_mask)
    chunk = max(1, chunk_tokens // batch)
    num_chunks = -(-time // chunk)
    pad = num_chunks * chunk - time

    def split(x):  # [batch, time, ...] -> [chunks, batch, chunk, ...], padded positions masked out
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(batch, num_chunks, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_totals(pieces):
        chunk_features, chunk_targets, chunk_mask = pieces
        return masked_totals(logits_fn(chunk_features), chunk_targets, chunk_mask)

    totals = jax.lax.map(chunk_totals, (split(features), split(targets), split(loss_mask.astype(jnp.float32))))
    return tuple(jnp.sum(t) for t in totals)


def microbatch_split(batch: dict, microbatches: int) -> dict:
    """Each `[batch, ...]` array as `[microbatches, batch / microbatches, ...]`, microbatch i holding rows
    i, i + n, i + 2n, ... (strided, not contiguous: with the batch axis split over devices in contiguous blocks,
    every microbatch then keeps an equal share of each device's rows, so none runs on a subset of the devices)."""
    def split(x):
        rows = x.shape[0] // microbatches
        return jnp.swapaxes(x.reshape(rows, microbatches, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, *, microbatches: int = 1,
                    inject_nan_at_step: int = -1, loss_chunk_tokens: int = 0):
    """The jitted-to-be train step. A step whose loss or gradient norm is not finite changes neither the
    parameters nor the optimizer state (only the step counter moves on, past the bad batch), and reports
    metrics["finite"] = 0; the loop decides whether to go on or stop. `inject_nan_at_step` (>= 0, tests and
    drills only) turns that step's loss and gradients into NaN.

    `microbatches` > 1 (train.microbatches): the batch's gradient is accumulated over that many slices of it in a
    `jax.lax.scan`, so only one slice's activations are alive at a time; then one optimizer update. Every slice's
    loss is its masked NLL sum over the whole batch's count, so the sum over slices is the same loss and gradient
    as one pass over the batch (up to float rounding).

    `loss_chunk_tokens` > 0 (train.loss_chunk_tokens): the LM head and the loss over chunks of that many positions
    (chunked_masked_totals), so the whole batch's logits are never formed at once."""

    def loss_fn(params, rest, batch, count):
        """The masked mean NLL's share of this batch (its NLL sum / count), and its correct predictions."""
        # Rebuild rest's Variables inside this trace: nnx refuses Variables made at an outer trace level.
        model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))
        features = model.features(batch["inputs"], batch.get("positions"))
        nll_sum, correct, _ = chunked_masked_totals(model.logits, features, batch["targets"], batch["loss_mask"],
                                                    loss_chunk_tokens)
        return nll_sum / jnp.maximum(count, 1.0), correct

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def loss_and_grads(params, rest, batch):
        count = jnp.sum(batch["loss_mask"].astype(jnp.float32))
        if microbatches == 1:
            (loss, correct), grads = grad_fn(params, rest, batch, count)
            return loss, correct, count, grads

        def accumulate(totals, microbatch):
            (loss, correct), grads = grad_fn(params, rest, microbatch, count)
            return jax.tree.map(jnp.add, totals, (loss, correct, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, correct, grads), _ = jax.lax.scan(accumulate, zeros, microbatch_split(batch, microbatches))
        return loss, correct, count, grads

    def train_step(state, rest, batch):
        loss, correct, count, grads = loss_and_grads(state["params"], rest, batch)
        if inject_nan_at_step >= 0:
            poison = jnp.where(state["step"] == inject_nan_at_step, jnp.nan, 1.0)
            loss, grads = loss * poison, jax.tree.map(lambda g: g * poison, grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        keep_if_bad = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        metrics = {
            "loss": loss,
            "accuracy": correct / jnp.maximum(count, 1.0),
            "grad_norm": grad_norm,
            "learning_rate": schedule(state["step"]),
            "finite": finite.astype(jnp.float32),
        }
        return {"params": jax.tree.map(keep_if_bad, params, state["params"]),
                "opt_state": jax.tree.map(keep_if_bad, opt_state, state["opt_state"]),
                "step": state["step"] + 1}, metrics

    return train_step


def make_eval_step(graphdef, *, loss_chunk_tokens: int = 0):
    def eval_step(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        features = model.features(batch["inputs"], batch.get("positions"))
        loss_sum, correct, count = chunked_masked_totals(model.logits, features, batch["targets"],
                                                         batch["loss_mask"], loss_chunk_tokens)
        return {"loss_sum": loss_sum, "correct": correct, "count": count}

    return eval_step
