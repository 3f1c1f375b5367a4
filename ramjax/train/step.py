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


def masked_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array):
    """Mean cross-entropy over the masked positions, and the (correct, counted) totals for accuracy."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    mask = loss_mask.astype(jnp.float32)
    count = jnp.sum(mask)
    loss = jnp.sum(nll * mask) / jnp.maximum(count, 1.0)
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * mask)
    return loss, correct, count


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule):
    def train_step(state, rest, batch):
        def loss_fn(params):
            # Rebuild rest's Variables inside this trace: nnx refuses Variables made at an outer trace level.
            model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))
            loss, correct, count = masked_loss(model(batch["inputs"]), batch["targets"], batch["loss_mask"])
            return loss, (correct, count)

        (loss, (correct, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            "loss": loss,
            "accuracy": correct / jnp.maximum(count, 1.0),
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state["step"]),
        }
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return train_step


def make_eval_step(graphdef):
    def eval_step(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        loss, correct, count = masked_loss(model(batch["inputs"]), batch["targets"], batch["loss_mask"])
        return {"loss_sum": loss * count, "correct": correct, "count": count}

    return eval_step
