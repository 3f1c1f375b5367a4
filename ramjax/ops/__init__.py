"""Pure JAX ops: each has a plain reference (`impl="dense"`) and fast paths tested against it.

One package per op family: `addressing` (the RAM-Net address decoder and CAPE), `pdma` (the RAM-Net memory),
`gla` (gated linear attention, Mamba-2), `gated_delta` (Gated DeltaNet) and `loglinear` (log-linear attention
over the Mamba-2 and Gated DeltaNet bases); `shared` holds their argument checks and numerics. Dependencies
point one way: shared <- addressing, pdma, gla, gated_delta <- loglinear.
"""

from ramjax.ops.addressing import cape_shift, product_topk
from ramjax.ops.gated_delta import gated_delta_rule, gated_delta_rule_step
from ramjax.ops.gla import gated_linear_attention, gated_linear_attention_step
from ramjax.ops.loglinear import (
    FenwickState,
    level_index,
    loglinear_attention,
    loglinear_gated_delta,
    loglinear_gated_delta_step,
    loglinear_init,
    loglinear_step,
    num_levels,
)
from ramjax.ops.memory import PDMAState, pdma, pdma_init, pdma_step

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
