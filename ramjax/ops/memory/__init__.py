"""RAM-Net memory: the power-decay moving average (PDMA) over M slots per head, `pdma` and its decode step.

Everything lives in `op.py` (see its docstring). Its tuning constants (SCAN_BLOCK, SCAN_KERNEL_BLOCK,
PALLAS_GPU_OPTIONS, ...) are read there, so set or monkeypatch them on `ramjax.ops.memory.op`. (The folder is
not called `pdma`: `ramjax.ops.pdma` is the function.)
"""

from ramjax.ops.memory.op import (IMPLS, PDMAState, decay_factor, pallas_backend, pdma, pdma_init, pdma_step,
                                  resolve_impl)

__all__ = ["IMPLS", "PDMAState", "decay_factor", "pallas_backend", "pdma", "pdma_init", "pdma_step", "resolve_impl"]
