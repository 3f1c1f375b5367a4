"""Pure JAX ops: each has a plain reference (`impl="dense"`) and fast paths tested against it."""

from ramjax.ops.addressing import cape_shift, product_topk
from ramjax.ops.ram_memory import PDMAState, pdma, pdma_init, pdma_step

__all__ = ["cape_shift", "product_topk", "PDMAState", "pdma", "pdma_init", "pdma_step"]
