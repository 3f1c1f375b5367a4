"""Pure JAX ops: each has a plain reference (`impl="dense"`) and fast paths tested against it."""

from ramjax.ops.addressing import cape_shift, product_topk
from ramjax.ops.fenwick import (
    FenwickState,
    level_index,
    loglinear_attention,
    loglinear_gated_delta,
    loglinear_gated_delta_step,
    loglinear_init,
    loglinear_step,
    num_levels,
)
from ramjax.ops.linear_attention import (
    gated_delta_rule,
    gated_delta_rule_step,
    gated_linear_attention,
    gated_linear_attention_step,
)
from ramjax.ops.ram_memory import PDMAState, pdma, pdma_init, pdma_step

__all__ = [
    "cape_shift",
    "product_topk",
    "FenwickState",
    "level_index",
    "loglinear_attention",
    "loglinear_gated_delta",
    "loglinear_gated_delta_step",
    "loglinear_init",
    "loglinear_step",
    "num_levels",
    "gated_delta_rule",
    "gated_delta_rule_step",
    "gated_linear_attention",
    "gated_linear_attention_step",
    "PDMAState",
    "pdma",
    "pdma_init",
    "pdma_step",
]
