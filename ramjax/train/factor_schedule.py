"""Training RAM-Net with a memory that grows to the model's M = d_p^U slots, one address factor at a time.

The top-K schedule (top_k_schedule.py) widens the reads and writes so that they meet at initialisation, and its
decoder's work grows with K. This schedule instead narrows the memory at the model's own K:
while only A of the U factors are active, the first U - A factors (the most significant digits of a slot) are
held at digit 0 for every read and write, so the addresses range over d_p^A slots, where K slots per token meet
as often as in a memory that small. Each phase frees the next factor until all U are, the model's own memory.
A held factor's logits are replaced by fixed ones (FIXED_LOGIT on digit 0, 0 elsewhere), so they get no gradient
while held, and a freed factor starts from the projection as initialised. Holding the most significant factors
keeps CAPE's relative addresses: slot - position stays a local offset within the first d_p^A slots.

Config fields (`train`):

  ramnet_factors_start       factors active at step 0 (0, or any value >= the model's U: no schedule);
  ramnet_factors_grow_steps  the steps over which the active factors grow to U (one more per equal phase).

The active count is a function of the step alone, so a resumed run trains exactly as an uninterrupted one.
Each count is one compiled train step (with the top-K schedule: each (K, count) pair that occurs). Evaluation
always runs the model with all U factors.
"""

from __future__ import annotations

import warnings

from ramjax.errors import ConfigError
from ramjax.models import LanguageModel


def factors_at(step: int, start: int, num_factors: int, grow_steps: int) -> int:
    """Active factors for training step `step`: start, start + 1, ..., num_factors - 1 in equal phases over
    grow_steps, then num_factors."""
    if not 0 < start < num_factors or grow_steps <= 0 or step >= grow_steps:
        return num_factors
    return start + step * (num_factors - start) // grow_steps


def check(config) -> None:
    """Errors that name the field, the value and what is allowed."""
    t = config.train
    for name in ("ramnet_factors_start", "ramnet_factors_grow_steps"):
        value = t.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"train.{name}: must be an integer >= 0 (0: no schedule), got {value!r}")
    if start_factors(config) and not t.get("ramnet_factors_grow_steps", 0):
        raise ConfigError(f"train.ramnet_factors_grow_steps: must be > 0 when train.ramnet_factors_start = "
                          f"{t.ramnet_factors_start} (< model.ramnet.num_factors = {config.model.ramnet.num_factors}) "
                          "asks for a schedule; got 0")
    start, grow = start_factors(config), t.get("ramnet_factors_grow_steps", 0)
    if start and grow > 0 and t.num_steps <= grow:
        last = factors_at(t.num_steps - 1, start, config.model.ramnet.num_factors, grow)
        warnings.warn(f"train.ramnet_factors_grow_steps = {grow} >= train.num_steps = {t.num_steps}: training ends "
                      f"with {last} of model.ramnet.num_factors = {config.model.ramnet.num_factors} factors active, "
                      "but evaluation uses all of them; shorten the growth, or set train.ramnet_factors_start = 0 "
                      "to train with the whole memory", stacklevel=2)


def start_factors(config) -> int:
    """train.ramnet_factors_start; 0 (no schedule) for a model without RAM-Net layers or a start of U or more,
    so that it compiles one train step."""
    if "ramnet" not in config.model.pattern:
        return 0
    start = config.train.get("ramnet_factors_start", 0)
    return start if start < config.model.ramnet.num_factors else 0


def inert_fields(config) -> tuple[str, ...]:
    """This schedule's config fields when they change nothing for `config` (no RAM-Net layer, or no schedule):
    a resumed run recorded before they existed is the same run."""
    fields = ("train.ramnet_factors_start", "train.ramnet_factors_grow_steps")
    return fields if not start_factors(config) else ()


def with_factors(model: LanguageModel, active: int) -> LanguageModel:
    """Sets every RAM-Net layer of `model` to address with `active` factors (in place); returns the model."""
    for mixer in model.ramnet_mixers():
        mixer.active_factors = active
    return model
