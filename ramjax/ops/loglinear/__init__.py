"""Log-linear attention (docs/loglinear.md): a Fenwick-tree partition of the past with one state per level.

`fenwick.py` holds the partition and the machinery both bases share (levels, `FenwickState`, the binary-counter
merge, the chunk grid), `attention.py` the Mamba-2 base (`loglinear_attention`, `loglinear_step`) and
`gated_delta.py` the Gated DeltaNet base (`loglinear_gated_delta`, `loglinear_gated_delta_step`). They build on
`ramjax.ops.gated_delta` (the transition and the chunked WY / UT pieces) and `ramjax.ops.shared`; no other family
imports from here.
"""

from ramjax.ops.loglinear.attention import ATTENTION_IMPLS, loglinear_attention, loglinear_step
from ramjax.ops.loglinear.fenwick import IMPLS, FenwickState, level_index, loglinear_init, num_levels
from ramjax.ops.loglinear.gated_delta import DELTA_IMPLS, loglinear_gated_delta, loglinear_gated_delta_step

__all__ = [
    "ATTENTION_IMPLS",
    "DELTA_IMPLS",
    "IMPLS",
    "FenwickState",
    "level_index",
    "loglinear_attention",
    "loglinear_gated_delta",
    "loglinear_gated_delta_step",
    "loglinear_init",
    "loglinear_step",
    "num_levels",
]
