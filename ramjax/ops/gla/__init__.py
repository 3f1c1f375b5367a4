"""Plain gated linear attention (GLA, Mamba-2 / SSD): `gated_linear_attention` and its decode step.

`reference.py` holds the step, its scan and the dense form, `chunked.py` the chunked training form (its sub-chunk
size, GLA_SUBCHUNK, is read there), `op.py` the checked public functions (see its docstring).
"""

from ramjax.ops.gla.op import IMPLS, gated_linear_attention, gated_linear_attention_step

__all__ = ["IMPLS", "gated_linear_attention", "gated_linear_attention_step"]
