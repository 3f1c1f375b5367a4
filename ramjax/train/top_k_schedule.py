"""Training RAM-Net with more slots per token than the model keeps, annealed down to the model's K.

At initialisation a query's K read slots rarely meet the K slots its value was written to (about K^2 / M), and a
slot that is not kept carries no gradient, so training may never start with a large memory. Training with a
larger K early gives the addresses a chance to meet; the schedule then halves K in equal phases until it reaches
the model's K, which evaluation always uses. Config fields (`train`):

  ramnet_top_k_start          K at step 0 (0, or any value <= the model's K: no schedule; a value above the
                              memory's M slots means M, so one default serves every memory size);
  ramnet_top_k_anneal_steps   the steps over which K falls to the model's K (halving in equal phases).

K is a function of the step alone, so a resumed run trains exactly as an uninterrupted one. Each distinct K is
one compiled train step (log2(start / K) + 1 of them).
"""

from __future__ import annotations

import math

from ramjax.errors import ConfigError
from ramjax.models import LanguageModel


def phases(start: int, model_k: int) -> list[int]:
    """The K of each phase: start, halved (rounded up) until the next would be <= model_k, then model_k."""
    ks = []
    k = start
    while k > model_k:
        ks.append(k)
        k = math.ceil(k / 2)
    return ks + [model_k]


def top_k_at(step: int, start: int, model_k: int, anneal_steps: int) -> int:
    """K for training step `step`."""
    if start <= model_k or anneal_steps <= 0 or step >= anneal_steps:
        return model_k
    ks = phases(start, model_k)[:-1]  # the annealing phases; the model's K follows them
    return ks[min(step * len(ks) // anneal_steps, len(ks) - 1)]


def check(config) -> None:
    """Errors that name the field, the value and what is allowed."""
    t = config.train
    start, steps = t.get("ramnet_top_k_start", 0), t.get("ramnet_top_k_anneal_steps", 0)
    for name, value in (("ramnet_top_k_start", start), ("ramnet_top_k_anneal_steps", steps)):
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"train.{name}: must be an integer >= 0, got {value!r}")


def start_k(config) -> int:
    """train.ramnet_top_k_start, capped at the memory's M = factor_size ** num_factors slots; 0 (no schedule)
    for a model without RAM-Net layers, so that it compiles one train step."""
    r = config.model.ramnet
    if "ramnet" not in config.model.pattern:
        return 0
    return min(config.train.get("ramnet_top_k_start", 0), r.factor_size**r.num_factors)


def inert_fields(config) -> tuple[str, ...]:
    """This schedule's config fields when they change nothing for `config` (no RAM-Net layer, or no schedule):
    a resumed run recorded before they existed is the same run."""
    fields = ("train.ramnet_top_k_start", "train.ramnet_top_k_anneal_steps")
    return fields if not start_k(config) else ()


def with_top_k(model: LanguageModel, k: int) -> LanguageModel:
    """Sets every RAM-Net layer of `model` to keep `k` slots per token (in place); returns the model."""
    for mixer in model.ramnet_mixers():
        mixer.active_top_k = k
    return model
