"""Plain Gated DeltaNet: `gated_delta_rule` and its decode step.

`recurrent.py` holds the transition, the step and its scan (the reference), `chunked.py` the WY / UT chunked
training form, `op.py` the checked public functions (see its docstring).
"""

from ramjax.ops.gated_delta.op import IMPLS, gated_delta_rule, gated_delta_rule_step

__all__ = ["IMPLS", "gated_delta_rule", "gated_delta_rule_step"]
