"""AdamW with linear warm-up and cosine decay, gradient clipping by global norm, weight decay on matrices only.

`optim.schedule = "constant"` holds the learning rate at optim.learning_rate from step 0 (no warm-up, no decay):
with optim.weight_decay = 0 it is the constant-rate Adam the adaptive-decay fork trains with."""

from __future__ import annotations

import jax
import optax
from flax import nnx

# Parameters whose name is one of these get weight decay; scales, biases, temperatures (alpha), decay rates
# (A_log, dt_bias) and FenwickDecay's Lscale do not.
DECAYED = ("kernel", "embedding")
SCHEDULES = ("warmup_cosine", "constant")


def learning_rate_schedule(optim_config, num_steps: int) -> optax.Schedule:
    o = optim_config
    if not o.learning_rate > 0:
        raise ValueError(f"optim.learning_rate: must be > 0, got {o.learning_rate}")
    if not 0 <= o.final_lr_ratio <= 1:
        raise ValueError(f"optim.final_lr_ratio: must be in [0, 1], got {o.final_lr_ratio}")
    if not 0 <= o.warmup_steps:
        raise ValueError(f"optim.warmup_steps: must be >= 0, got {o.warmup_steps}")
    schedule = o.get("schedule", "warmup_cosine")
    if schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule: must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        # A warm-up the constant schedule would silently ignore is refused rather than dropped.
        if o.warmup_steps:
            raise ValueError(f"optim.warmup_steps: schedule 'constant' has no warm-up, so it must be 0, got "
                             f"{o.warmup_steps}")
        return optax.constant_schedule(o.learning_rate)
    warmup = min(o.warmup_steps, num_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.learning_rate, warmup_steps=warmup, decay_steps=max(num_steps, warmup + 1),
        end_value=o.learning_rate * o.final_lr_ratio)


def weight_decay_mask(params):
    """True for the parameters weight decay applies to: an nnx.State of Params -> a bool per Param."""
    def decayed(path, _):
        last = path[-1]
        return getattr(last, "key", getattr(last, "name", None)) in DECAYED

    return jax.tree_util.tree_map_with_path(decayed, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(optim_config, num_steps: int) -> optax.GradientTransformation:
    o = optim_config
    if not o.clip_norm > 0:
        raise ValueError(f"optim.clip_norm: must be > 0, got {o.clip_norm}")
    return optax.chain(
        optax.clip_by_global_norm(o.clip_norm),
        optax.adamw(learning_rate_schedule(o, num_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                    weight_decay=o.weight_decay, mask=weight_decay_mask),
    )
